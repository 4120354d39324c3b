"""The dense bundle on the same phantom subjects at their own thin slices and at thick slices: per-class Dice and
recall, to see what slice thickness costs the model (the real clinical CTs in ../shared are 4-5 mm).

Each seed is generated twice with ``generate_phantom(seed, subtypes=..., severity="moderate", resolution_scale=1)``:
with its drawn spacing (0.6-0.8 mm in-plane, 0.625-2.5 mm slices) and with the same in-plane spacing and
``--thick_mm`` slices.
Both go through ``inference.json`` (``scripts/real_ct_lesions.run_bundle``); the labels are compared with the
phantom's own label map at that resolution (lesion voxels: mostly destroyed as that scanner sees them). Writes
``thick_vs_thin.json`` and prints a Markdown table. The seeds are outside every training and validation range of
the shipped weights (1000-1899 training, 1900-1999 validation) and outside the test sets 9000-9015 and 9100-9115.

    python scripts/benchmark_slice_thickness.py --out /tmp/thick [--seeds 9300:centrilobular+paraseptal,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct_lesions import run_bundle  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "drasclr_emphysema_subtype"
CLASSES = {2: "centrilobular", 3: "paraseptal", 4: "panlobular"}
DEFAULT_SEEDS = "9300:centrilobular+paraseptal,9301:panlobular"


def write_cases(out: Path, seeds: list[tuple[int, str]], thick_mm: float, resolution_scale: float) -> list[str]:
    """The phantoms (NIfTI) and their label maps (``.npy``) under ``out``; their names."""
    from drasclr_ext.data.phantom import draw_subject, generate_phantom
    from drasclr_ext.fileio import write_nifti

    names = []
    for seed, mix in seeds:
        options = {"subtypes": mix, "severity": "moderate", "resolution_scale": resolution_scale}
        drawn = draw_subject(seed, **options).spacing
        for tag, spacing in (("thin", None), ("thick", (drawn[0], drawn[1], thick_mm))):
            name = f"p{seed}_{tag}"
            names.append(name)
            if not (out / f"{name}_label.npy").is_file():
                phantom = generate_phantom(seed, spacing=spacing, **options)
                write_nifti(out / f"{name}.nii.gz", phantom["image"], phantom["affine"], np.int16)
                np.save(out / f"{name}_label.npy", phantom["label"])
    return names


def scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Dice and recall of each subtype present in ``truth``, and the share of normal lung called emphysema."""
    row: dict[str, Any] = {}
    for value, name in CLASSES.items():
        t, p = truth == value, pred == value
        if t.any():
            row[name] = {
                "dice": round(float(2 * (t & p).sum() / (t.sum() + p.sum())), 3),
                "recall": round(float((t & p).sum() / t.sum()), 3),
                "recall_any_emphysema": round(float((t & (pred >= 2)).sum() / t.sum()), 3),
                "truth_voxels": int(t.sum()),
            }
    normal = truth == 1
    row["normal_called_emphysema"] = round(float((normal & (pred >= 2)).sum() / max(normal.sum(), 1)), 4)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default=DEFAULT_SEEDS, help="seed:subtype mix, comma separated")
    ap.add_argument("--thick_mm", type=float, default=5.0)
    ap.add_argument("--resolution_scale", type=float, default=1.0, help="1: full scanner resolution")
    ap.add_argument("--ckpt_path", default=None, help="other weights than the bundle's model.pt")
    args = ap.parse_args(argv)
    import nibabel as nib

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [(int(s.split(":")[0]), s.split(":")[1]) for s in args.seeds.split(",")]
    names = write_cases(out, seeds, args.thick_mm, args.resolution_scale)
    (out / "datalist.json").write_text(json.dumps([str(out / f"{n}.nii.gz") for n in names]))
    start = time.perf_counter()
    run_bundle(BUNDLE, out / "datalist.json", out / "bundle", args.ckpt_path)
    rows = {}
    for name in names:
        pred = np.asarray(nib.load(out / "bundle" / name / "subtype_label.nii.gz").dataobj)
        rows[name] = scores(np.load(out / f"{name}_label.npy"), pred)
    result = {"thick_mm": args.thick_mm, "seconds": round(time.perf_counter() - start, 1), "cases": rows}
    (out / "thick_vs_thin.json").write_text(json.dumps(result, indent=1))
    print("| case | class | Dice | recall | recall as any emphysema | truth voxels |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        for cls in CLASSES.values():
            if cls in row:
                r = row[cls]
                cells = [name, cls, r["dice"], r["recall"], r["recall_any_emphysema"], r["truth_voxels"]]
                print("| " + " | ".join(str(c) for c in cells) + " |")
        print(f"| {name} | normal called emphysema | {row['normal_called_emphysema']} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
