"""The one cohort loop (CohortRunner) with a pool of worker processes, and step timings: the same outputs,
failures and resumability as one process; preprocessing runs on it."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from monai.transforms import Compose, Lambdad

from drasclr_ext.errors import InputImageError
from drasclr_ext.inference import runner
from drasclr_ext.inference.runner import TIMINGS_KEY, CohortRunner, run_timed


def _refuse_bad(data: dict) -> dict:
    if data["subject"].startswith("bad"):
        raise InputImageError(f"{data['image']}: bad scan")
    return data


def _identity(data: dict) -> dict:
    return data


def _write(data: dict, subject_dir: Path) -> None:
    subject_dir.mkdir(parents=True)
    (subject_dir / "done.json").write_text(json.dumps({"pid": os.getpid(), "image": data["image"]}))


def _scans(folder: Path, *names: str) -> list[Path]:
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")
    return [folder / n for n in names]


def _runner(scans, out, **options) -> CohortRunner:
    return CohortRunner(scans, out, _refuse_bad, _identity, _write, done_file="done.json", progress=False, **options)


def _no_pool(*args, **kwargs):
    raise AssertionError("a worker pool was started")


def _failures(out: Path) -> list[dict]:
    with open(out / "failures.csv") as f:
        return list(csv.DictReader(f))


def test_worker_pool_gives_the_cohort_of_one_process(tmp_path, monkeypatch):
    scans = _scans(tmp_path / "scans", "a.nii.gz", "bad1.nii.gz", "b.nii.gz", "c.nii.gz", "bad2.nii.gz")
    one = _runner(scans, tmp_path / "one").run()
    two = _runner(scans, tmp_path / "two", workers=2).run()
    assert one["processed"] == two["processed"] == ["a", "b", "c"]
    assert one["failed"] == two["failed"] == ["bad1", "bad2"]
    assert _failures(tmp_path / "one") == [{**row} for row in _failures(tmp_path / "two")]
    pids = {json.loads((tmp_path / "two" / n / "done.json").read_text())["pid"] for n in two["processed"]}
    assert os.getpid() not in pids  # the scans ran in the workers
    # resumed on the finished scans: all skipped, without starting a worker process (about 10 s each) to skip them
    monkeypatch.setattr(runner, "ProcessPoolExecutor", _no_pool)
    again = _runner([s for s in scans if not s.name.startswith("bad")], tmp_path / "two", workers=2).run()
    assert again["processed"] == [] and again["skipped"] == ["a", "b", "c"] and again["failed"] == []


def test_run_timed_times_each_step_and_keeps_the_result():
    chain = Compose([Lambdad("x", lambda v: v + 1), Lambdad("x", lambda v: v * 3)])
    data = run_timed(chain, {"x": 1})
    assert data["x"] == chain({"x": 1})["x"] == 6
    assert list(data[TIMINGS_KEY]) == ["Lambdad"] and data[TIMINGS_KEY]["Lambdad"] >= 0.0
