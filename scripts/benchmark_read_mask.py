"""Benchmark of CT reading (``load_ct``) and the classical lung mask (``compute_lung_mask``) on a 512x512x300 volume.

A synthetic chest phantom (``generate_phantom``, 0.75 x 0.75 x 1.0 mm) is written as an int16 .nii.gz; each step then
runs ``--repeats`` times in a fresh Python process, which reports its wall time and its peak resident memory
(``VmHWM``, including the imported libraries). Prints medians as a Markdown table.

Usage: python scripts/benchmark_read_mask.py [--repeats 3] [--workdir /tmp/drasclr_bench]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np

_STEP = r"""
import json, sys, time
import numpy as np
from drasclr_ext.transforms.io import load_ct
from drasclr_ext.transforms.lung_mask import compute_lung_mask
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
step, path = sys.argv[1], sys.argv[2]
base = hwm_mb()
if step == "load_ct":
    t = time.perf_counter(); image = load_ct(path); seconds = time.perf_counter() - t
else:
    image = load_ct(path); hu, affine = image.numpy(), image.affine.numpy()
    base = hwm_mb()
    t = time.perf_counter(); labels = compute_lung_mask(hu, affine); seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_mb": hwm_mb(), "before_mb": base}))
"""


def _run(step: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP, step, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def benchmark(repeats: int = 3, workdir: str = "/tmp/drasclr_bench") -> dict:
    """Time ``load_ct`` and ``compute_lung_mask`` on a 512x512x300 phantom; returns and prints the medians."""
    import nibabel as nib

    from drasclr_ext.data.phantom import generate_phantom

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "phantom_512x512x300.nii.gz"
    if not path.exists():
        t = time.perf_counter()
        ph = generate_phantom(5, shape=(512, 512, 300), spacing=(0.75, 0.75, 1.0))
        img = nib.Nifti1Image(np.round(ph["image"]).astype(np.int16), ph["affine"])
        nib.save(img, str(work / "tmp.nii.gz"))
        (work / "tmp.nii.gz").replace(path)
        print(f"phantom written in {time.perf_counter() - t:.1f} s: {path}")
    results = {}
    for step in ("load_ct", "compute_lung_mask"):
        runs = [_run(step, path) for _ in range(repeats)]
        results[step] = {
            "median_s": statistics.median(r["seconds"] for r in runs),
            "peak_mb": max(r["peak_mb"] for r in runs),
            "before_mb": statistics.median(r["before_mb"] for r in runs),
        }
    print("| step | median time (s) | peak RSS of the process (MB) | peak RSS before the step (MB) |")
    print("|---|---|---|---|")
    for step, r in results.items():
        print(f"| `{step}` | {r['median_s']:.2f} | {r['peak_mb']:.0f} | {r['before_mb']:.0f} |")
    return results


if __name__ == "__main__":
    fire.Fire(benchmark)
