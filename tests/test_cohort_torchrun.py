"""The emphysema bundle's inference and ``drasclr preprocess`` under ``torchrun`` with 2 CPU processes: each rank
takes its share of the cohort, rank 0 writes the one summary and failures.csv, and the union equals a single-process
run. The single-process references run in this process (in a full test run MONAI and ITK are loaded here already:
no start-up of another process), the preprocessing one shared with tests/test_preprocess_cohort.py
(``preprocessed_chests`` in ``tests/conftest.py``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.bundle_utils import PYTHON, bundle_dir, run_bundle_cli, run_workflow, write_small_phantom

BUNDLE = bundle_dir("drasclr_emphysema_subtype")


def _overrides(output: Path, dataset: Path) -> dict:
    return {"dataset_dir": str(dataset), "output_dir": str(output), "overview": False, "overlap": 0}


def _inference_here(output: Path, dataset: Path) -> None:
    """The single-process reference: the bundle's ``run`` in this process, with the overrides of :func:`_inference`."""
    run_workflow(str(BUNDLE / "configs" / "inference.json"), BUNDLE, **_overrides(output, dataset))


def _inference(output: Path, dataset: Path, cwd: Path) -> str:
    """``torchrun --nproc_per_node=2 -m monai.bundle run`` of the bundle's inference; returns the output."""
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run"]
    args += ["--config_file", str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE)]
    args += [f"--{key}={value}" for key, value in _overrides(output, dataset).items()]
    proc = run_bundle_cli(args, cwd=cwd)
    return proc.stdout + proc.stderr


def test_two_processes_share_the_cohort_and_rank_0_merges(tmp_path):
    data = tmp_path / "data"
    write_small_phantom(data, seed=21, name="p21")  # one scan and a broken one: one for each rank
    (data / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    (tmp_path / "cwd").mkdir()
    _inference_here(tmp_path / "one", data)
    log = _inference(tmp_path / "two", data, tmp_path / "cwd")
    assert log.count("subjects: 100%") >= 2 and "2/2" not in log  # two ranks share the scans

    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processed"] == one["processed"] == ["p21"]
    assert two["failed"] == one["failed"] == ["broken"]
    with open(tmp_path / "two" / "failures.csv") as f:
        assert [row["subject"] for row in csv.DictReader(f)] == ["broken"]
    for name in one["processed"]:
        a = json.loads((tmp_path / "one" / name / "report.json").read_text())
        b = json.loads((tmp_path / "two" / name / "report.json").read_text())
        assert a["laa950_percent"] == b["laa950_percent"] and a["subtype_fractions"] == b["subtype_fractions"]
        labels = [
            np.asarray(nib.load(root / name / "subtype_label.nii.gz").dataobj)
            for root in (tmp_path / "one", tmp_path / "two")
        ]
        np.testing.assert_array_equal(*labels)
    assert not list((tmp_path / "two").glob(".drasclr.lock*"))  # every rank released its lock

    # resumable: a rerun over what the two ranks wrote (here in this process) skips everything
    _inference_here(tmp_path / "two", data)
    again = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert again["processed"] == [] and again["skipped"] == ["p21"]


def test_preprocessing_under_torchrun_equals_one_process(preprocessed_chests, tmp_path):
    """``drasclr preprocess`` with 2 processes: same subjects, same patches, one failures.csv, one store, as the
    session's single-process run of the same defaults on the same scans."""
    scans, one, _ = preprocessed_chests
    launch = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_bundle_cli([*launch, "-m", "drasclr_ext.cli", "preprocess", str(scans), str(tmp_path / "two")], tmp_path)
    log = proc.stdout + proc.stderr
    # broken, chest0, chest1: rank 0 takes broken and chest1, rank 1 chest0
    assert log.count("preprocess: 100%") >= 2 and "3/3" not in log
    two = tmp_path / "two"
    assert sorted(p.name for p in one.iterdir() if p.is_dir()) == sorted(p.name for p in two.iterdir() if p.is_dir())
    for name in ("chest0", "chest1"):
        a, b = (np.load(root / name / "patches.npy") for root in (one, two))
        np.testing.assert_array_equal(a, b)
    for root in (one, two):
        with open(root / "failures.csv") as f:
            assert [row["subject"] for row in csv.DictReader(f)] == ["broken"]
    stores = [sorted(p.name for p in (root / "store").iterdir()) for root in (one, two)]
    assert stores[0] == stores[1] and stores[0]
    assert not list(two.glob(".drasclr.lock*"))
