"""The emphysema bundle's inference under ``torchrun`` with 2 CPU processes: each rank takes its share of the
cohort, rank 0 writes the one summary and failures.csv, and the union equals a single-process run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.bundle_utils import PYTHON, bundle_dir, run_bundle_cli, write_small_phantom

BUNDLE = bundle_dir("drasclr_emphysema_subtype")


def _inference(output: Path, dataset: Path, cwd: Path, processes: int = 1) -> str:
    args = [PYTHON, "-m", "monai.bundle", "run"]
    if processes > 1:
        args = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
        args += ["monai.bundle", "run"]
    args += ["--config_file", str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE)]
    args += ["--dataset_dir", str(dataset), "--output_dir", str(output), "--overview", "False", "--overlap", "0"]
    proc = run_bundle_cli(args, cwd=cwd)
    return proc.stdout + proc.stderr


def test_two_processes_share_the_cohort_and_rank_0_merges(tmp_path):
    data = tmp_path / "data"
    for seed in (21, 22):  # with the broken scan: rank 0 takes two scans, rank 1 one
        write_small_phantom(data, seed=seed, name=f"p{seed}")
    (data / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    (tmp_path / "cwd").mkdir()
    _inference(tmp_path / "one", data, tmp_path / "cwd")
    log = _inference(tmp_path / "two", data, tmp_path / "cwd", processes=2)
    assert log.count("subjects: 100%") >= 2 and "3/3" not in log  # two ranks share the scans

    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sorted(two["processed"]) == sorted(one["processed"]) == ["p21", "p22"]
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

    # resumable: a second 2-process run skips everything
    _inference(tmp_path / "two", data, tmp_path / "cwd", processes=2)
    again = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert again["processed"] == [] and sorted(again["skipped"]) == ["p21", "p22"]


def test_preprocessing_under_torchrun_equals_one_process(tmp_path):
    """``drasclr preprocess`` with 2 processes: same subjects, same patches, one failures.csv, one store."""
    from tests.synthetic_chest import make_chest

    scans = tmp_path / "scans"
    scans.mkdir()
    for i, spacing in enumerate([(3.0, 3.0, 3.0), (2.5, 2.5, 4.0), (3.0, 3.0, 2.5)]):
        chest = make_chest(spacing=spacing, seed=i)
        nib.save(nib.Nifti1Image(chest.hu, chest.affine), scans / f"chest{i}.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    cli = ["-m", "drasclr_ext.cli", "preprocess", str(scans)]
    run_bundle_cli([PYTHON, *cli, str(tmp_path / "one")], cwd=tmp_path)
    launch = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_bundle_cli([*launch, *cli, str(tmp_path / "two")], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count("preprocess: 100%") >= 2 and "4/4" not in log  # two ranks, two scans each
    for name in ("chest0", "chest1", "chest2"):
        a, b = (np.load(tmp_path / run / name / "patches.npy") for run in ("one", "two"))
        np.testing.assert_array_equal(a, b)
    for run in ("one", "two"):
        with open(tmp_path / run / "failures.csv") as f:
            assert [row["subject"] for row in csv.DictReader(f)] == ["broken"]
    stores = [sorted(p.name for p in (tmp_path / run / "store").iterdir()) for run in ("one", "two")]
    assert stores[0] == stores[1] and stores[0]
    assert not list((tmp_path / "two").glob(".drasclr.lock*"))
