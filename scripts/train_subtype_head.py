"""Make the emphysema subtype bundle's ``models/model.pt``: the pretrained DrasCLR encoder (frozen) plus a subtype
head trained on dense windows of synthetic phantoms.

Per phantom (seeds ``--seed`` ..): generate it, register its ground-truth lung mask to the atlas, cut dense windows
(``--stride``), compute each window's target (class fractions of its lung voxels, see
``drasclr_ext.networks.heads``) and its frozen encoder representation ``h``. The head is then trained with soft
cross-entropy (Adam, full batch) on the training phantoms and scored on the held-out ones.

    python scripts/train_subtype_head.py --n 16 --val 4 --seed 3000 \\
        --encoder bundles/drasclr_lung_ct_ssl/models/model.pt \\
        --out bundles/drasclr_emphysema_subtype/models/model.pt --json head_training.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from drasclr_ext.checkpoint import encoder_config, load_encoder, save_atomic
from drasclr_ext.data.phantom import generate_phantom
from drasclr_ext.inference.dense import blend_window_probabilities, grid_to_image, subtype_labels, window_targets
from drasclr_ext.networks.heads import SUBTYPE_CLASSES, DrasCLRSubtypeNet, soft_cross_entropy
from drasclr_ext.transforms.patches import dense_windows
from drasclr_ext.transforms.registration import AtlasRegistration

SEVERITIES = ("healthy", "mild", "moderate", "severe")
MIXES = ("centrilobular", "paraseptal", "panlobular", "centrilobular+paraseptal")


@torch.no_grad()
def features(net: DrasCLRSubtypeNet, windows, batch: int = 32) -> np.ndarray:
    net.eval()
    loc = torch.as_tensor(windows.locations, dtype=torch.float32)
    out = []
    for start in range(0, len(windows), batch):
        idx = np.arange(start, min(start + batch, len(windows)))
        out.append(net.represent(torch.from_numpy(windows.windows(idx))[:, None], loc[idx]))
    return torch.cat(out).numpy()


def phantom_windows(net, seed: int, stride: int, resolution_scale: float) -> tuple:
    """(h, targets, phantom, windows) of one phantom; severity and subtype mix cycle with the seed."""
    i = seed
    severity = SEVERITIES[i % 4]
    mix = MIXES[(i // 4) % 4]
    phantom = generate_phantom(seed, severity=severity, subtypes=mix, resolution_scale=resolution_scale)
    affine = phantom["affine"]
    registration = AtlasRegistration()(phantom["lung_mask"], affine)
    windows = dense_windows(phantom["image"], phantom["lung_mask"], registration, stride=stride, affine=affine)
    return features(net, windows), window_targets(phantom["label"], affine, windows), phantom, windows


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else None


def voxel_scores(probabilities: np.ndarray, phantom: dict, windows, decision: str, min_probability: float) -> dict:
    """Per-class voxel Dice of the blended map of one phantom against its ground-truth labels (its own lung mask)."""
    lung = phantom["lung_mask"] > 0
    grid = blend_window_probabilities(windows, probabilities)
    prob = grid_to_image(grid, windows.grid_affine, phantom["affine"], lung.shape, lung)
    label = subtype_labels(prob, phantom["image"], lung, decision, min_probability=min_probability)
    return {c: dice(label == v, phantom["label"] == v) for v, c in enumerate(SUBTYPE_CLASSES, start=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="bundles/drasclr_lung_ct_ssl/models/model.pt")
    parser.add_argument("--out", default="bundles/drasclr_emphysema_subtype/models/model.pt")
    parser.add_argument("--n", type=int, default=16, help="phantoms in all")
    parser.add_argument("--val", type=int, default=4, help="held-out phantoms (the last ones)")
    parser.add_argument("--seed", type=int, default=3000)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--resolution-scale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--cache", default=None, help="npz of the windows' features and targets (reused if present)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    state = load_encoder(args.encoder).state_dict()
    config = encoder_config(state)
    net = DrasCLRSubtypeNet(**config, hidden=args.hidden, freeze_encoder=True)
    net.encoder.load_state_dict(state, strict=True)

    start = time.perf_counter()
    seeds = [args.seed + i for i in range(args.n)]
    rows, held_out = [], []
    cached = np.load(args.cache) if args.cache and Path(args.cache).is_file() else None
    for i, s in enumerate(tqdm(seeds, desc="phantoms")):
        if cached is not None and i < args.n - args.val:  # training phantoms: features from the cache
            continue
        h, t, phantom, windows = phantom_windows(net, s, args.stride, args.resolution_scale)
        rows.append((i, h, t))
        if i >= args.n - args.val:
            held_out.append((i, phantom, windows))
    if cached is not None:
        keep = cached["subject"] < args.n - args.val
        hs = np.concatenate([cached["h"][keep]] + [r[1] for r in rows])
        ts = np.concatenate([cached["t"][keep]] + [r[2] for r in rows])
        subject = np.concatenate([cached["subject"][keep]] + [np.full(len(r[1]), r[0]) for r in rows])
    else:
        hs = np.concatenate([r[1] for r in rows])
        ts = np.concatenate([r[2] for r in rows])
        subject = np.concatenate([np.full(len(r[1]), r[0]) for r in rows])
        if args.cache:
            np.savez(args.cache, h=hs, t=ts, subject=subject)
    prep_s = time.perf_counter() - start

    train = subject < args.n - args.val
    h = torch.from_numpy(hs).float()
    t = torch.from_numpy(ts).float()
    optimizer = torch.optim.Adam(net.head.parameters(), lr=args.lr, weight_decay=1e-4)
    net.head.train()
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = soft_cross_entropy(net.head(h[train]), t[train])
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net.head(h), dim=1)
    result = {
        "command": "python scripts/train_subtype_head.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "windows_train": int(train.sum()),
        "windows_val": int((~train).sum()),
        "feature_seconds": round(prep_s, 1),
    }
    for name, sel in (("train", train), ("val", ~train)):
        result[f"{name}_soft_ce"] = float(soft_cross_entropy(torch.log(p[sel] + 1e-12), t[sel]))
        err = (p[sel] - t[sel]).abs().mean(0).numpy()
        result[f"{name}_fraction_mae"] = {c: float(e) for c, e in zip(SUBTYPE_CLASSES, err)}
        # the constant predictor (training mean composition) as the baseline
        base = (t[train].mean(0) - t[sel]).abs().mean(0).numpy()
        result[f"{name}_fraction_mae_constant_baseline"] = {c: float(e) for c, e in zip(SUBTYPE_CLASSES, base)}
    # voxel-level Dice on the held-out phantoms (their own lung masks), per decision rule
    p_np = p.numpy()
    for decision, min_probability in (("argmax", 0.0), ("attenuation", 0.02), ("attenuation", 0.05)):
        per_class = {c: [] for c in SUBTYPE_CLASSES}
        for i, phantom, windows in held_out:
            for c, d in voxel_scores(p_np[subject == i], phantom, windows, decision, min_probability).items():
                if d is not None:
                    per_class[c].append(d)
        result[f"val_voxel_dice_{decision}_{min_probability}"] = {
            c: (float(np.mean(v)) if v else None) for c, v in per_class.items()
        }
    net_state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_atomic(net_state, args.out)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
