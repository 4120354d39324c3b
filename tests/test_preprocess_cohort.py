"""Cohort preprocessing: outputs, failures, resume, store, datalists; one real CT with the DrasCLR atlas."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from drasclr_ext.atlas import load_atlas
from drasclr_ext.preprocess.cohort import preprocess_cohort, preprocess_subject
from drasclr_ext.subjects import read_datalist

SUBJECT_FILES = {
    "lung_mask.nii.gz",
    "patches.npy",
    "locations.npy",
    "neighbours.npy",
    "centres_world.npy",
    "transform.json",
    "meta.json",
}


@pytest.fixture(scope="module")
def cohort(preprocessed_chests):
    """Two chests and a broken file, preprocessed once per session (``tests/conftest.py``)."""
    return preprocessed_chests


def test_cohort_writes_every_output_of_good_scans(cohort):
    scans, out, summary = cohort
    assert (summary["total"], summary["done"], summary["failed"]) == (3, 2, 1)
    n = load_atlas("default").num_landmarks
    for name in ("chest0", "chest1"):
        assert SUBJECT_FILES <= {p.name for p in (out / name).iterdir()}
        assert np.load(out / name / "patches.npy").shape == (n, 32, 32, 32)
        meta = json.loads((out / name / "meta.json").read_text())
        assert 0.5 <= meta["registration"]["dice"] <= 1.0 and meta["atlas"] == "default"
        mask = nib.load(out / name / "lung_mask.nii.gz")
        source = nib.load(scans / f"{name}.nii.gz")
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        assert mask.shape == source.shape and set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}


def test_bad_scan_lands_in_failures_csv_with_a_reason(cohort):
    _, out, _ = cohort
    with open(out / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["broken"]
    assert rows[0]["error"] == "InputImageError" and "could not read" in rows[0]["reason"]
    assert not (out / "broken" / "meta.json").exists()


def test_store_holds_all_finished_subjects(cohort):
    _, out, summary = cohort
    patches = np.load(out / "store" / "patches.npy", mmap_mode="r")
    assert patches.shape == (load_atlas("default").num_landmarks, 2, 32, 32, 32)
    assert json.loads((out / "store" / "subjects.json").read_text()) == ["chest0", "chest1"]


def test_second_run_skips_finished_subjects(cohort):
    scans, out, _ = cohort
    stamp = (out / "chest0" / "patches.npy").stat().st_mtime_ns
    summary = preprocess_cohort(scans, out, progress=False)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 2, 1)
    assert (out / "chest0" / "patches.npy").stat().st_mtime_ns == stamp


def test_datalist_json_resolves_relative_images(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    datalist = {"training": [{"image": "a.nii.gz"}, {"image": "a.nii.gz"}], "test": [{"image": "/abs/b.nii"}]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    assert read_datalist(tmp_path / "list.json") == [tmp_path / "a.nii.gz", Path("/abs/b.nii")]


def test_datalist_folder_lists_files_and_dicom_folders(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"")
    assert read_datalist(tmp_path) == [tmp_path / "b.nii.gz", tmp_path / "series"]


def test_real_ct_with_drasclr_atlas(tmp_path, lung_ct_dir, drasclr_atlas_dir):
    # TCIA Lung-PET-CT-Dx, subject A0001 (CC BY 4.0): 64 axial slices of 5 mm
    status = preprocess_subject(lung_ct_dir, tmp_path, atlas="drasclr", atlas_path=str(drasclr_atlas_dir))
    assert status["status"] == "done"
    meta = json.loads((tmp_path / "Lung_Dx-A0001" / "meta.json").read_text())
    assert 0.5 <= meta["registration"]["dice"] <= 1.0
    patches = np.load(tmp_path / "Lung_Dx-A0001" / "patches.npy")
    assert patches.shape == (581, 32, 32, 32) and np.all(np.isfinite(patches))
    assert patches.min() >= -1.0 and patches.max() <= 1.0
