"""Convert an official DrasCLR training checkpoint into a bundle-ready ``model.pt``.

The output is a plain CPU state dict of ``drasclr_ext.networks.DrasCLREncoder`` (the query encoder), with the
architecture inferred from the tensor shapes. The input is read with ``weights_only=True``.

    python scripts/convert_official_checkpoint.py checkpoint_0020.pth.tar bundles/<bundle>/models/model.pt
"""

from __future__ import annotations

import argparse

from drasclr_ext.checkpoint import convert_official_checkpoint, encoder_config, load_encoder, sha256sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official checkpoint (.pth.tar with state_dict/module.encoder_q.*)")
    parser.add_argument("dst", help="output model.pt")
    parser.add_argument("--sha256", default=None, help="expected sha256 of src (checked before loading)")
    args = parser.parse_args()
    if args.sha256:
        load_encoder(args.src, expected_sha256=args.sha256)
    out = convert_official_checkpoint(args.src, args.dst)
    config = encoder_config(load_encoder(out).state_dict())
    print(f"wrote {out} (sha256 {sha256sum(out)})")
    print("encoder: " + ", ".join(f"{k}={v}" for k, v in config.items()))


if __name__ == "__main__":
    main()
