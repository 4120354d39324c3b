"""Render truth-vs-map overview images of labelled phantoms from the emphysema bundle's inference outputs.

    python -m monai.bundle run --config_file bundles/drasclr_emphysema_subtype/configs/inference.json \
        --bundle_root bundles/drasclr_emphysema_subtype --dataset_dir /data/test_cohort --output_dir /data/maps
    python scripts/render_truth_vs_map.py --maps /data/maps --cohort /data/test_cohort --seeds 9004 9005 9012

Each image (``<out>/emphysema_phantom_<seed>_truth_vs_map.png``) shows the phantom's true labels (top row) and the
bundle's map (bottom row) on the same slices (:func:`drasclr_ext.inference.overview.render_overview`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from drasclr_ext.inference.overview import render_overview

REPO = Path(__file__).resolve().parents[1]


def render(maps: Path, cohort: Path, seed: int, out: Path) -> Path:
    """One truth-vs-map image of phantom ``seed``."""
    case = f"phantom_{seed:05d}"
    ct = nib.load(str(cohort / f"{case}_image.nii.gz"))
    truth = np.asarray(nib.load(str(cohort / f"{case}_label.nii.gz")).dataobj).astype(np.uint8)
    label = np.asarray(nib.load(str(maps / f"{case}_image" / "subtype_label.nii.gz")).dataobj).astype(np.uint8)
    info = json.loads((cohort / f"{case}.json").read_text())["subject"]
    title = f"{case}: {info['subtype_mix']}, {info['severity']}, {info['spacing'][2]:g} mm slices, {info['kernel']}"
    path = out / f"emphysema_phantom_{seed}_truth_vs_map.png"
    return render_overview(np.asarray(ct.dataobj, np.float32), label, ct.affine, path, title=title, truth=truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", required=True, help="the bundle's output_dir")
    parser.add_argument("--cohort", required=True, help="folder of the phantoms (image, label, json)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    args = parser.parse_args()
    for seed in args.seeds:
        print(render(Path(args.maps), Path(args.cohort), seed, Path(args.out)))


if __name__ == "__main__":
    main()
