"""DICOM geometry from every slice's ImagePositionPatient: order and spacing tags never decide it, and incomplete or
uneven series are refused with a reason instead of being averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drasclr_ext.errors import InputImageError
from drasclr_ext.transforms.io import load_ct
from tests.dicom_utils import write_dicom_series

SHAPE = (24, 20, 12)


def _rewrite_real_series(src: Path, dst: Path, descending: bool, spacing_tag: float | None) -> Path:
    """The real series with files and instance numbers ordered by position, ``SpacingBetweenSlices`` set or removed."""
    pydicom = pytest.importorskip("pydicom")
    datasets = [pydicom.dcmread(f) for f in sorted(src.iterdir()) if f.is_file()]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]), reverse=descending)
    dst.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        if spacing_tag is None:
            if "SpacingBetweenSlices" in ds:
                del ds.SpacingBetweenSlices
        else:
            ds.SpacingBetweenSlices = spacing_tag
        ds.InstanceNumber = i + 1
        ds.save_as(dst / f"{i:03d}.dcm")
    return dst


def _world_of_voxels(image, voxels: np.ndarray) -> np.ndarray:
    return (image.affine.numpy() @ np.c_[voxels, np.ones(len(voxels))].T).T[:, :3]


def test_descending_positions_and_negative_spacing_tag_give_the_true_geometry(lung_ct_dir, tmp_path):
    plain = load_ct(_rewrite_real_series(lung_ct_dir, tmp_path / "plain", descending=False, spacing_tag=None))
    flipped = load_ct(_rewrite_real_series(lung_ct_dir, tmp_path / "flipped", descending=True, spacing_tag=-5.0))
    np.testing.assert_allclose(flipped.affine.numpy(), plain.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(flipped.numpy(), plain.numpy())
    # the slices span z = -439 (feet) to -124 mm (head) in the headers; the last voxel is the head end
    corners = _world_of_voxels(flipped, np.array([[0, 0, 0], [0, 0, 63]]))
    np.testing.assert_allclose(corners[:, 2], [-439.0, -124.0], atol=1e-3)


def _series(tmp_path: Path, positions) -> Path:
    stored = np.random.default_rng(0).integers(0, 3000, size=(*SHAPE[:2], len(positions))).astype(np.uint16)
    write_dicom_series(tmp_path / "series", len(positions), "1.2.3.4.1", 1.0, -1024.0, stored, positions=positions)
    return tmp_path / "series"


def test_even_series_in_shuffled_file_order_is_read_in_position_order(tmp_path):
    positions = [100.0 + 2.5 * k for k in (3, 0, 5, 1, 4, 2, 8, 6, 9, 7, 11, 10)]
    image = load_ct(_series(tmp_path, positions))
    np.testing.assert_allclose(image.affine.numpy()[:3, 2:], [[0, 10.0], [0, 20.0], [2.5, 100.0]], atol=1e-6)


def test_series_with_a_missing_slice_is_refused(tmp_path):
    positions = [100.0 + 2.0 * k for k in range(13) if k != 6]
    with pytest.raises(InputImageError, match=r"1 slice\(s\) are missing.*1 missing between 110.00 and 114.00 mm"):
        load_ct(_series(tmp_path, positions))


def test_series_with_slices_moved_to_another_series_is_refused(tmp_path):
    positions = [100.0 + 2.0 * k for k in range(20) if not 8 <= k < 13]
    with pytest.raises(InputImageError, match=r"5 slice\(s\) are missing.*split into another series"):
        load_ct(_series(tmp_path, positions))


def test_series_with_uneven_spacing_is_refused(tmp_path):
    positions = [100.0 + 2.0 * k for k in range(6)] + [111.0 + 3.0 * k for k in range(6)]
    with pytest.raises(InputImageError, match=r"unevenly spaced.*a gap of 3.000 mm"):
        load_ct(_series(tmp_path, positions))


def test_series_with_duplicate_positions_is_refused(tmp_path):
    positions = [100.0 + 2.0 * k for k in range(12)]
    positions[5] = positions[4]
    with pytest.raises(InputImageError, match=r"share a position.*at 108.00 mm"):
        load_ct(_series(tmp_path, positions))
