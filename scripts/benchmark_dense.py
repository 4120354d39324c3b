"""End-to-end benchmark of the dense emphysema bundle on a 512x512x300 CT, with a breakdown per stage.

A synthetic chest phantom (``generate_phantom(5, shape=(512, 512, 300), spacing=(0.75, 0.75, 1.0))``, the one of
``scripts/benchmark_read_mask.py``) is written as an int16 .nii.gz. Each repeat runs in a fresh Python process
that imports torch and MONAI, builds the bundle's inference workflow (shipped weights) and times every stage of one
scan: read, lung mask, registration, dense windows, network, blending, resampling to the input grid, writing. Also
reported per run: the imports, the workflow set-up, and the wall time of the whole process as its parent sees it
(interpreter start to exit), and the load average of the machine before and after the run (other jobs on the cores
make every figure slower). Peak resident memory is ``VmHWM`` of that process (the imported libraries included).
Prints medians as a Markdown table.

Usage: python scripts/benchmark_dense.py [--repeats 3] [--stride 16] [--batch_size N] [--workdir /tmp/drasclr_bench]
(``--batch_size`` overrides the bundle's ``batch_size``, windows per forward pass; by default the bundle's own.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "drasclr_emphysema_subtype"

_RUN = r"""
import time
T0 = time.perf_counter()
import json, sys
from pathlib import Path
import torch
from monai.bundle import ConfigWorkflow
imports = time.perf_counter() - T0
path, out, stride, bundle = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
override = {"batch_size": int(sys.argv[5])} if len(sys.argv) > 5 else {}
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
t = time.perf_counter()
wf = ConfigWorkflow(config_file=f"{bundle}/configs/inference.json", meta_file=f"{bundle}/configs/metadata.json",
                    workflow_type="infer", bundle_root=bundle, output_dir=out, dataset_dir=path, window_stride=stride,
                    **override)
wf.initialize()
pre, inferer, writer = wf.parser.get_parsed_content("preprocessing"), wf.inferer, wf.parser.get_parsed_content("writer")
setup = time.perf_counter() - t
t0 = time.perf_counter()
d = {"image": path, "subject": "bench"}
times = {}
for tr in pre.transforms:
    t = time.perf_counter(); d = tr(d); times[type(tr).__name__] = time.perf_counter() - t
t = time.perf_counter(); d = inferer(d); inference = time.perf_counter() - t
times.update(d["dense_info"]["timings"])
t = time.perf_counter(); writer(d, Path(out) / "bench"); times["writing"] = time.perf_counter() - t
times["total"] = time.perf_counter() - t0
times["imports"], times["setup"] = imports, setup
print(json.dumps({"times": times, "windows": d["dense_info"]["windows"], "peak_mb": hwm_mb()}))
"""


def _run(path: Path, out: Path, stride: int, batch_size: Optional[int] = None) -> dict:
    args = [sys.executable, "-c", _RUN, str(path), str(out), str(stride), str(BUNDLE)]
    args += [] if batch_size is None else [str(batch_size)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(args, check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["times"]["process_wall"] = time.perf_counter() - start
    result["load"] = (load_before, os.getloadavg()[0])
    return result


def benchmark(
    repeats: int = 3, stride: int = 16, batch_size: Optional[int] = None, workdir: str = "/tmp/drasclr_bench"
) -> dict:
    """Time the bundle's stages on a 512x512x300 phantom; returns and prints the medians."""
    import nibabel as nib

    from drasclr_ext.data.phantom import generate_phantom

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "phantom_512x512x300.nii.gz"
    if not path.exists():
        ph = generate_phantom(5, shape=(512, 512, 300), spacing=(0.75, 0.75, 1.0))
        nib.save(nib.Nifti1Image(np.round(ph["image"]).astype(np.int16), ph["affine"]), path)
    runs = [_run(path, work / f"dense_out_{i}", stride, batch_size) for i in range(repeats)]
    stages = list(runs[0]["times"])
    medians = {s: statistics.median(r["times"][s] for r in runs) for s in stages}
    peak = statistics.median(r["peak_mb"] for r in runs)
    loads = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in (r["load"] for r in runs))
    batches = "the bundle's batch size" if batch_size is None else f"batch size {batch_size}"
    print(f"stride {stride}, {batches}: {runs[0]['windows']} windows, {repeats} runs")
    print(f"peak RSS median {peak / 1024:.2f} GB")
    print(f"1-minute load average before -> after each run: {loads}")
    print("| stage | median s | runs |\n|---|---|---|")
    for s in stages:
        each = ", ".join(f"{r['times'][s]:.2f}" for r in runs)
        print(f"| {s} | {medians[s]:.2f} | {each} |")
    return {"medians": medians, "peak_mb": peak, "windows": runs[0]["windows"]}


if __name__ == "__main__":
    fire.Fire(benchmark)
