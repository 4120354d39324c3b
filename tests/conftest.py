"""Shared pytest fixtures: the ../shared folder beside the checkout, skipped with a reason where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
