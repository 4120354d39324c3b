"""Shared pytest fixtures: the ../shared folder beside the checkout, skipped with a reason where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` (the README's test command): two workers share 2 cores
    import torch

    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DRASCLR_SHARED_DIR", REPO_ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test with a reason when it is not there (a user's clone)."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the test needs the project's shared data folder beside the checkout")
    return path


@pytest.fixture
def reference_fixture_dir() -> Path:
    return shared_path("fixtures", "drasclr_reference")


@pytest.fixture
def lung_ct_dir() -> Path:
    return shared_path("data", "lung_ct", "Lung_Dx-A0001")


@pytest.fixture
def abdomen_ct_dir() -> Path:
    return shared_path("data", "abdomen_ct_dicom")


@pytest.fixture
def drasclr_atlas_dir() -> Path:
    return shared_path("data", "drasclr_atlas")


@pytest.fixture(scope="session")
def preprocessed_chests(tmp_path_factory):
    """Two synthetic chests (3 mm and 2.5 x 2.5 x 4 mm) and a broken file, preprocessed once in this process with
    the default settings of ``drasclr preprocess``: ``(scans, out, summary)``. Shared by the cohort tests and the
    torchrun comparison; treat the outputs as read-only."""
    import nibabel as nib

    from drasclr_ext.preprocess.cohort import preprocess_cohort
    from tests.synthetic_chest import make_chest

    scans = tmp_path_factory.mktemp("chest_scans")
    for i, spacing in enumerate([(3.0, 3.0, 3.0), (2.5, 2.5, 4.0)]):
        chest = make_chest(spacing=spacing, seed=i)
        nib.save(nib.Nifti1Image(chest.hu, chest.affine), scans / f"chest{i}.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path_factory.mktemp("chest_preprocessed")
    summary = preprocess_cohort(scans, out, progress=False)
    return scans, out, summary
