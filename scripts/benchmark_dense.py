"""End-to-end benchmark of the dense emphysema bundle on a 512x512x300 CT, with a breakdown per stage.

A synthetic chest phantom (``generate_phantom(5, shape=(512, 512, 300), spacing=(0.75, 0.75, 1.0))``, the one of
``scripts/benchmark_read_mask.py``) is written as an int16 .nii.gz. Each repeat runs in a fresh Python process
that imports torch and MONAI, builds the bundle's inference workflow (shipped weights) and times every stage of one
scan: read, lung mask, registration, the 1 mm atlas grid, the network (MONAI sliding-window inference), resampling to
the input grid with the labels, writing. Also
reported per run: the imports, the workflow set-up, and the wall time of the whole process as its parent sees it
(interpreter start to exit), and the load average of the machine before and after the run (other jobs on the cores
make every figure slower). Peak resident memory is ``VmHWM`` of that process (the imported libraries included).
Prints medians as a Markdown table.

Then, in this process and on the same scan (``--variants``, on by default), the network stage alone three ways, one
after the other: the shipped network in float32, the same under bfloat16 autocast, and the plain-``Conv3d`` floor
(the same architecture with every location-conditioned convolution replaced by an ordinary ``nn.Conv3d`` of the
same shape: what the conditioning costs). The bfloat16 labels are compared with the float32 ones on the lung
voxels of the input grid (the bundle keeps autocast off unless they agree on at least 99.9 %).

Usage: python scripts/benchmark_dense.py [--repeats 3] [--overlap 0.25] [--sw_batch_size N] [--autocast]
[--variants True] [--workdir /tmp/drasclr_bench]  (unset options: the bundle's inference.json values)
"""

from __future__ import annotations

import copy
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
import torch

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
path, out, bundle, override = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
t = time.perf_counter()
wf = ConfigWorkflow(config_file=f"{bundle}/configs/inference.json", meta_file=f"{bundle}/configs/metadata.json",
                    workflow_type="infer", bundle_root=bundle, output_dir=out, dataset_dir=path, **override)
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


def _run(path: Path, out: Path, override: dict) -> dict:
    args = [sys.executable, "-c", _RUN, str(path), str(out), str(BUNDLE), json.dumps(override)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(args, check=True, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["times"]["process_wall"] = time.perf_counter() - start
    result["load"] = (load_before, os.getloadavg()[0])
    return result


def plain_conv_floor(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` whose location-conditioned convolutions are plain ``nn.Conv3d`` of the same shapes."""
    from drasclr_ext.networks.condconv import CondConv3d

    class PlainConv(torch.nn.Module):
        def __init__(self, cond: CondConv3d) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(
                cond.in_channels,
                cond.out_channels,
                cond.kernel_size,
                cond.stride,
                cond.padding,
                cond.dilation,
                cond.groups,
                bias=cond.bias is not None,
            )

        def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    floor = copy.deepcopy(network)
    for module in list(floor.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, CondConv3d):
                setattr(module, name, PlainConv(child))
    return floor.eval()


def network_variants(path: Path, override: dict) -> dict:
    """The network stage on one scan: float32, bfloat16 autocast and the plain-Conv3d floor (seconds), and the
    share of lung voxels whose bfloat16 label equals the float32 label."""
    from monai.bundle import ConfigWorkflow

    from drasclr_ext.geometry import array_and_affine, grid_to_image
    from drasclr_ext.inference.dense import subtype_labels
    from drasclr_ext.transforms.atlas_grid import atlas_grid

    wf = ConfigWorkflow(
        config_file=f"{BUNDLE}/configs/inference.json",
        meta_file=f"{BUNDLE}/configs/metadata.json",
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        output_dir="/tmp/drasclr_bench_variants",
        dataset_dir=str(path),
        **override,
    )
    wf.initialize()
    d = wf.parser.get_parsed_content("preprocessing")({"image": str(path)})
    inferer = wf.inferer
    grid = atlas_grid(
        d["image"], d["lung_mask"], d["registration"], inferer.atlas, inferer.margin, min_size=inferer.window
    )
    _, affine = array_and_affine(d["image"])
    lung = array_and_affine(d["lung_mask"], affine)[0] > 0
    out, labels = {}, {}
    network = inferer.network
    for name, net, autocast in (
        ("float32", network, False),
        ("bfloat16", network, True),
        ("plain_conv3d_float32", plain_conv_floor(network), False),
    ):
        inferer.network, inferer.autocast = net, autocast
        t = time.perf_counter()
        probabilities, windows = inferer.predict(grid)
        out[f"{name}_s"] = time.perf_counter() - t
        if name != "plain_conv3d_float32":
            labels[name] = subtype_labels(grid_to_image(probabilities, grid.affine, affine, lung.shape, lung), lung)
    out["windows"] = windows
    out["bfloat16_label_agreement"] = float(np.mean(labels["bfloat16"][lung] == labels["float32"][lung]))
    return out


def benchmark(
    repeats: int = 3,
    overlap: Optional[float] = None,
    sw_batch_size: Optional[int] = None,
    autocast: Optional[bool] = None,
    variants: bool = True,
    workdir: str = "/tmp/drasclr_bench",
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
    override = {
        k: v
        for k, v in (("overlap", overlap), ("sw_batch_size", sw_batch_size), ("autocast", autocast))
        if v is not None
    }
    runs = [_run(path, work / f"dense_out_{i}", override) for i in range(repeats)]
    stages = list(runs[0]["times"])
    medians = {s: statistics.median(r["times"][s] for r in runs) for s in stages}
    peak = statistics.median(r["peak_mb"] for r in runs)
    loads = ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in (r["load"] for r in runs))
    print(f"settings {override or 'of inference.json'}: {runs[0]['windows']} windows computed, {repeats} runs")
    print(f"peak RSS median {peak / 1024:.2f} GB")
    print(f"1-minute load average before -> after each run: {loads}")
    print("| stage | median s | runs |\n|---|---|---|")
    for s in stages:
        each = ", ".join(f"{r['times'][s]:.2f}" for r in runs)
        print(f"| {s} | {medians[s]:.2f} | {each} |")
    result = {"medians": medians, "peak_mb": peak, "windows": runs[0]["windows"]}
    if variants:
        result["variants"] = network_variants(path, override)
        v = result["variants"]
        print(
            f"network stage, same run: float32 {v['float32_s']:.2f} s, bfloat16 autocast {v['bfloat16_s']:.2f} s, "
            f"plain Conv3d floor {v['plain_conv3d_float32_s']:.2f} s "
            f"(conditioning costs {v['float32_s'] / v['plain_conv3d_float32_s']:.2f}x); "
            f"bfloat16 labels equal float32 on {100 * v['bfloat16_label_agreement']:.3f} % of lung voxels"
        )
        print(f"network share of the stages: {medians['network_s'] / medians['total']:.2f}")
    return result


if __name__ == "__main__":
    fire.Fire(benchmark)
