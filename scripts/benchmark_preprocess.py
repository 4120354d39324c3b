"""Time the preprocessing of one 512x512x300 chest CT: reading, lung mask, registration, patch extraction.

Makes a synthetic chest with the phantom generator, saves it as .nii.gz, then runs the pipeline ``--runs`` times,
each in a fresh process (honest peak memory: ``ru_maxrss`` of that process). ITK's one-off module loading (paid once
per process, e.g. once per cohort worker) is timed separately. Medians are printed and, with ``--record``, appended to
docs/BENCHMARKS.md.

Usage: ``python scripts/benchmark_preprocess.py [--runs 3] [--atlas default|drasclr --atlas_path DIR] [--record]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("itk_load_s", "read_s", "lung_mask_s", "registration_s", "patches_s")


def make_volume(path: Path, shape=(512, 512, 300)) -> dict:
    import nibabel as nib

    from drasclr_ext.data.phantom import generate_phantom

    phantom = generate_phantom(0, shape=shape, resolution_scale=1.0)
    nib.save(nib.Nifti1Image(phantom["image"].astype("int16"), phantom["affine"]), path)
    return {"shape": list(phantom["image"].shape), "affine": phantom["affine"].tolist()}


def run_once(path: str, atlas: str, atlas_path: str | None) -> dict:
    """One pipeline run in this process; returns the stage times (s) and the peak RSS (MB)."""
    import resource

    import numpy as np

    from drasclr_ext.transforms.registration import _itk_classes

    times = {}
    t = time.perf_counter()
    _itk_classes()  # the ITK classes the registration uses, loaded as it loads them
    times["itk_load_s"] = time.perf_counter() - t

    from drasclr_ext.transforms.io import load_ct
    from drasclr_ext.transforms.lung_mask import compute_lung_mask
    from drasclr_ext.transforms.patches import AnatomicalPatches
    from drasclr_ext.transforms.registration import AtlasRegistration

    registration = AtlasRegistration(atlas, atlas_path=atlas_path)
    patcher = AnatomicalPatches(registration.atlas)
    _ = registration.atlas_grid  # atlas-side work, done once per process

    t = time.perf_counter()
    image = load_ct(path)
    hu, affine = image.numpy(), np.asarray(image.affine, dtype=np.float64)
    times["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lung = compute_lung_mask(hu, affine)
    times["lung_mask_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = registration(lung, affine)
    times["registration_s"] = time.perf_counter() - t
    t = time.perf_counter()
    patches = patcher(hu, result, affine=affine)
    times["patches_s"] = time.perf_counter() - t
    times["dice"] = result.dice
    times["landmarks"] = int(len(patches["patches"]))
    times["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--atlas", default="default")
    parser.add_argument("--atlas_path", default=None)
    parser.add_argument("--record", action="store_true", help="append the results to docs/BENCHMARKS.md")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_once(args._child, args.atlas, args.atlas_path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chest.nii.gz"
        t = time.perf_counter()
        info = make_volume(path)
        print(f"volume {info['shape']} written in {time.perf_counter() - t:.1f} s", flush=True)
        runs = []
        for i in range(args.runs):
            cmd = [sys.executable, __file__, "--_child", str(path), "--atlas", args.atlas]
            if args.atlas_path:
                cmd += ["--atlas_path", args.atlas_path]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"run {i + 1}: {runs[-1]}", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in (*STAGES, "dice", "peak_rss_mb")}
    pipeline = sum(med[k] for k in STAGES[1:])
    lines = [
        "",
        f"## Preprocessing of one 512x512x300 CT (`scripts/benchmark_preprocess.py`, atlas `{args.atlas}`)",
        "",
        f"Command: `python scripts/benchmark_preprocess.py --runs {args.runs} --atlas {args.atlas}"
        + (" --atlas_path DIR" if args.atlas_path else "")
        + " --record`. Machine: 2-core CPU sandbox "
        + f"({platform.processor() or platform.machine()}, Python {platform.python_version()}; other jobs may share "
        "the cores). Volume: phantom seed 0, 512x512x300, int16 .nii.gz. Each run in a fresh process; medians of "
        f"{args.runs} runs.",
        "",
        "| stage | median (s) |",
        "|---|---|",
        *[f"| {k[:-2].replace('_', ' ')} | {med[k]:.2f} |" for k in STAGES[1:]],
        f"| **pipeline total** (read + mask + registration + patches) | **{pipeline:.2f}** |",
        f"| ITK module loading, once per process (not in the total) | {med['itk_load_s']:.2f} |",
        "",
        f"Peak memory (max RSS of the process): {med['peak_rss_mb']:.0f} MB. Registration Dice: {med['dice']:.3f}; "
        f"{runs[0]['landmarks']} landmark patches.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        with open(REPO / "docs" / "BENCHMARKS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
