"""Cohort throughput of the emphysema bundle's inference with 1 and 2 processes, on an idle and a loaded machine.

Writes ``--n`` phantoms (``write_phantom_cohort(seed=31, resolution_scale=2.0)``, about 1.3 mm in-plane) once,
then times the whole command ``python -m monai.bundle run`` (1 process) or ``torchrun --standalone
--nproc_per_node=2 -m monai.bundle run`` (2 processes) of ``inference.json`` (``--overview False``), each into a
fresh output folder. The thread rule (``drasclr_ext.parallel.set_threads``) is on: processes x threads = the usable
cores. "loaded" runs with one other busy process (a Python busy loop, one core); there the override
``DRASCLR_THREADS=1`` is timed too. The 1-minute load average is read before each run (other users of the machine
show up there). Prints a Markdown table and writes ``results.json`` to ``--out``. ``--bundle_args`` are added to
every run (e.g. ``"--autocast False"`` on a CPU without native bfloat16, where autocast is many times slower).

    python scripts/benchmark_cohort.py --out /tmp/cohort_bench [--n 4] [--runs idle_1,idle_2,...] [--bundle_args ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "drasclr_emphysema_subtype"
# name: (load, processes, extra environment)
RUNS = {
    "idle_1": ("idle", 1, {}),
    "idle_2": ("idle", 2, {}),
    "idle_1_threads1": ("idle", 1, {"DRASCLR_THREADS": "1"}),
    "loaded_1": ("loaded", 1, {}),
    "loaded_2": ("loaded", 2, {}),
    "loaded_1_threads1": ("loaded", 1, {"DRASCLR_THREADS": "1"}),
    "loaded_1_threads2": ("loaded", 1, {"DRASCLR_THREADS": "2"}),  # the rule before it looked at the load
}
BUSY_LOOP = "while True: pass"


def command(processes: int, dataset: Path, output: Path, extra: list[str]) -> list[str]:
    """The bundle's inference command with ``processes`` processes."""
    args = [sys.executable, "-m", "monai.bundle", "run"]
    if processes > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
        args = [sys.executable, *launch, "monai.bundle", "run"]
    args += ["--config_file", str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE)]
    return args + ["--dataset_dir", str(dataset), "--output_dir", str(output), "--overview", "False", *extra]


def time_run(name: str, dataset: Path, out: Path, n: int, bundle_args: list[str]) -> dict:
    """One timed run (with a busy process beside it when loaded); its wall time, scans/min and thread count."""
    load, processes, extra = RUNS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DRASCLR_THREADS")}
    env.update(extra, PYTHONUNBUFFERED="1")
    output = out / name
    shutil.rmtree(output, ignore_errors=True)
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if load == "loaded" else None
    try:
        time.sleep(2.0 if busy else 0.0)  # let the busy loop start
        load_1min = os.getloadavg()[0]
        start = time.perf_counter()
        args = command(processes, dataset, output, bundle_args)
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{log[-3000:]}")
    summary = json.loads((output / "summary.json").read_text())
    if len(summary["processed"]) != n:
        raise SystemExit(f"{name}: processed {summary['processed']}, expected {n} scans")
    threads = sorted({int(t) for t in re.findall(r"torch threads per process: (\d+)", log)})
    return {
        "run": name,
        "load": load,
        "processes": processes,
        "threads": threads,
        "env": extra,
        "load_1min_before": round(load_1min, 2),
        "wall_s": round(wall, 1),
        "scans_per_min": round(60.0 * n / wall, 2),
    }


def table(results: list[dict]) -> str:
    rows = [
        "| machine | processes x threads | override | 1-min load before | wall s | scans/min |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        override = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "-"
        threads = "/".join(map(str, r["threads"])) or "?"
        rows.append(
            f"| {r['load']} | {r['processes']} x {threads} | {override} | {r['load_1min_before']:.2f} | "
            f"{r['wall_s']:.1f} | {r['scans_per_min']:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the phantoms, outputs and results.json")
    parser.add_argument("--n", type=int, default=4, help="phantoms in the cohort")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated runs out of {list(RUNS)}")
    parser.add_argument("--bundle_args", default="", help="extra arguments of every monai.bundle run")
    args = parser.parse_args()
    from drasclr_ext.data.phantom import write_phantom_cohort

    datalist = Path(write_phantom_cohort(args.out / "phantoms", n=args.n, seed=31, resolution_scale=2.0))
    dataset = args.out / "scans"
    dataset.mkdir(parents=True, exist_ok=True)
    for entry in [e for section in json.loads(datalist.read_text()).values() for e in section]:
        target = dataset / Path(entry["image"]).name
        if not target.exists():
            shutil.copyfile(datalist.parent / entry["image"], target)
    results = []
    for name in args.runs.split(","):
        results.append(time_run(name, dataset, args.out / "outputs", args.n, shlex.split(args.bundle_args)))
        print(json.dumps(results[-1]), flush=True)
    info = {"cores": os.cpu_count(), "bundle_args": args.bundle_args, "results": results}
    (args.out / "results.json").write_text(json.dumps(info, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
