"""Atlas: reference normalisation, neighbours, landmark grid, loading and hash checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from drasclr_ext.atlas import Atlas, build_landmarks, load_atlas
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import sha256sum

REPO = Path(__file__).resolve().parents[1]


def _atlas(corners) -> Atlas:
    return Atlas(name="tiny", mask=np.ones((4, 4, 4), np.uint8), affine=np.eye(4), corners=np.array(corners))


def test_locations_follow_reference_normalisation():
    atlas = _atlas([[26, 0, 52], [52, 26, 26], [104, 52, 0]])
    expected = np.array([[-0.5, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]], dtype=np.float32)
    np.testing.assert_array_equal(atlas.locations, expected)


def test_neighbours_are_nearest_others_with_index_tie_break():
    atlas = _atlas([[0, 0, 0], [26, 0, 0], [52, 0, 0], [78, 0, 0], [0, 26, 0]])
    expected = [[1, 4], [0, 2], [1, 3], [2, 1], [0, 1]]
    np.testing.assert_array_equal(atlas.neighbours(2), expected)


def test_build_landmarks_keeps_patches_with_more_than_ten_percent_lung():
    mask = np.zeros((58, 32, 32), np.uint8)  # two patches along x, at 0 and 26; lung kept out of their overlap
    mask[:26].reshape(-1)[:3277] = 1  # 3277 / 32^3 > 0.1: kept
    mask[32:].reshape(-1)[:3276] = 1  # 3276 / 32^3 < 0.1: dropped
    np.testing.assert_array_equal(build_landmarks(mask), [[0, 0, 0]])


def test_build_landmarks_on_drasclr_atlas_gives_reference_corners_except_six(drasclr_atlas_dir):
    atlas = load_atlas("drasclr", drasclr_atlas_dir)
    corners = build_landmarks(atlas.mask)
    reference = atlas.corners.tolist()
    # the published 581 corners were computed on a mask that still held the central airways; from the published
    # (airway-free) mask, the same grid (origin 0, step 26, x-major) and rule give those corners minus six medial ones
    assert len(corners) == 575
    assert [c for c in reference if c in corners.tolist()] == corners.tolist()
    missing = [c for c in reference if c not in corners.tolist()]
    assert len(missing) == 6 and all(c[0] in (182, 208) for c in missing)


def test_drasclr_atlas_loads_581_binary_landmarks(drasclr_atlas_dir):
    atlas = load_atlas("drasclr", drasclr_atlas_dir)
    assert atlas.num_landmarks == 581 and atlas.mask.shape == (387, 387, 319)
    assert set(np.unique(atlas.mask).tolist()) == {0, 1}


def test_drasclr_atlas_with_wrong_hash_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "atlas_lung_mask.nii.gz")
    np.save(tmp_path / "atlas_patch_loc.npy", np.zeros((3, 3), np.int64))
    with pytest.raises(DrasCLRError, match="sha256"):
        load_atlas("drasclr", tmp_path)


def test_unknown_atlas_name_is_refused():
    with pytest.raises(DrasCLRError, match="unknown atlas"):
        load_atlas("nonexistent")


def test_default_atlas_assets_match_the_generator():
    spec = importlib.util.spec_from_file_location("make_default_atlas", REPO / "scripts" / "make_default_atlas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mask, affine, corners = module.make_default_atlas()
    atlas = load_atlas("default")
    np.testing.assert_array_equal(atlas.mask, mask)
    np.testing.assert_allclose(atlas.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(atlas.corners, corners)
    assert sha256sum(REPO / "drasclr_ext" / "assets" / "default_atlas_patch_loc.npy")
