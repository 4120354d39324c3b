"""Write a bundle's ``large_files.yml``: its weights and the optional DrasCLR COPDGene atlas, with sha256.

    python scripts/write_large_files.py bundles/drasclr_lung_ct_ssl [--weights-url URL]

The weights ship inside the bundle (``models/model.pt``, and for the emphysema bundle the pretrained encoder it
fine-tunes from, ``models/pretrained_encoder.pt``); their entries record the hashes that loading checks. The
atlas is downloaded only on demand (``python -m monai.bundle download_large_files``) into ``data/drasclr_atlas``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from drasclr_ext.atlas import DRASCLR_ATLAS_CORNERS_SHA256, DRASCLR_ATLAS_MASK_SHA256
from drasclr_ext.checkpoint import sha256sum
from drasclr_ext.fileio import atomic_write_bytes

DRASCLR_ATLAS_URL = "https://raw.githubusercontent.com/batmanlab/DrasCLR/main/preprocess/misc"


def large_files(bundle: Path, weights_url: str = "", pretrained_url: str = "") -> dict:
    entries = [
        {
            "path": "models/model.pt",
            "url": weights_url,
            "hash_val": sha256sum(bundle / "models" / "model.pt"),
            "hash_type": "sha256",
        },
        {
            "path": "data/drasclr_atlas/atlas_lung_mask.nii.gz",
            "url": f"{DRASCLR_ATLAS_URL}/atlas_lung_mask.nii.gz",
            "hash_val": DRASCLR_ATLAS_MASK_SHA256,
            "hash_type": "sha256",
        },
        {
            "path": "data/drasclr_atlas/atlas_patch_loc.npy",
            "url": f"{DRASCLR_ATLAS_URL}/atlas_patch_loc.npy",
            "hash_val": DRASCLR_ATLAS_CORNERS_SHA256,
            "hash_type": "sha256",
        },
    ]
    pretrained = bundle / "models" / "pretrained_encoder.pt"
    if pretrained.is_file():  # the emphysema bundle's copy of the pretraining bundle's encoder, for fine-tuning
        entries.insert(
            1,
            {
                "path": "models/pretrained_encoder.pt",
                "url": pretrained_url,
                "hash_val": sha256sum(pretrained),
                "hash_type": "sha256",
            },
        )
    return {"large_files": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--weights-url", default="", help="where the released model.pt can be downloaded")
    parser.add_argument(
        "--pretrained-url", default="", help="where the released pretrained_encoder.pt can be downloaded"
    )
    args = parser.parse_args()
    text = yaml.safe_dump(large_files(args.bundle, args.weights_url, args.pretrained_url), sort_keys=False)
    print(f"wrote {atomic_write_bytes(args.bundle / 'large_files.yml', text.encode())}")


if __name__ == "__main__":
    main()
