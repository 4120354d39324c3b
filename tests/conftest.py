"""Shared pytest fixtures: the ../shared folder beside the checkout, skipped with a reason where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` (the README's test command): two workers share 2 cores
    import torch

    torch.set_num_threads(1)
    # and so do the bundle runs in these workers (``set_threads`` would take a core the other worker leaves idle for
    # a moment) and every process they start: OpenMP threads waiting for a busy core stall each other
    os.environ.setdefault("DRASCLR_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("DRASCLR_SHARED_DIR", REPO_ROOT.parent / "shared"))

# The longest test files, longest first (seconds of test time in docs/BENCHMARKS.md, "Test suite"). With
# `pytest -n 2 --dist loadfile` each worker takes the next file in collection order when it is free: these start
# first, and the many short files fill the end of the run instead of one worker finishing a long file alone.
LONGEST_FILES_FIRST = (
    "test_bundle_emphysema_training.py",
    "test_cohort_torchrun.py",
    "test_stranger_install.py",
    "test_bundle_emphysema_subtype.py",
    "test_bundle_lung_ct_ssl.py",
    "test_monailabel_app.py",
    "test_distribution.py",
    "test_cohort_workers.py",
    "test_phantom.py",
    "test_registration.py",
    "test_run_checks.py",
    "test_preprocess_cohort.py",
    "test_airways.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Keep the collection order below for xdist (by default it starts the files with the most tests first)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files of :data:`LONGEST_FILES_FIRST` first, in that order; the others after them, as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
