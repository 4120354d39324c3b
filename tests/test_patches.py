"""HU window, landmark patches and dense windows on small synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from drasclr_ext.atlas import Atlas, build_landmarks, normalise_corners
from drasclr_ext.transforms.patches import (
    AnatomicalPatches,
    AnatomicalPatchesd,
    DenseWindows,
    HUWindow,
    HUWindowd,
    hu_window,
)
from drasclr_ext.transforms.registration import RegistrationResult, apply_affine


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    """A 1 mm atlas with two box 'lungs' and an x-flipped affine like the DrasCLR atlas."""
    mask = np.zeros((100, 80, 90), np.uint8)
    mask[10:45, 15:65, 10:80] = 1
    mask[55:90, 15:65, 10:80] = 1
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [50.0, -40.0, -45.0]
    return Atlas(name="boxes", mask=mask, affine=affine, corners=build_landmarks(mask))


def _shifted(offset) -> RegistrationResult:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return RegistrationResult(matrix)


def test_hu_window_clips_and_scales_like_the_reference():
    hu = np.array([-2000.0, -1024.0, -392.0, 0.0, 240.0, 3000.0], dtype=np.float32)
    expected = np.array([-1.0, -1.0, 0.0, 1024.0 / 632.0 - 1.0, 1.0, 1.0], dtype=np.float32)
    np.testing.assert_allclose(hu_window(hu), expected, atol=1e-6)
    np.testing.assert_allclose(HUWindow()(torch.from_numpy(hu)).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(HUWindowd(keys="x")({"x": hu})["x"], expected, atol=1e-6)


def test_patch_values_equal_a_ramp_at_the_mapped_points(atlas):
    affine = np.diag([-0.8, -0.9, 1.5, 1.0])  # a subject grid unlike the atlas's (LPS-ordered, anisotropic)
    affine[:3, 3] = [70.0, 60.0, -70.0]
    ijk = np.indices((180, 140, 100), dtype=np.float64)
    world = np.tensordot(affine[:3, :3], ijk, axes=(1, 0)) + affine[:3, 3, None, None, None]
    hu = (2.0 * world[0] - 1.5 * world[1] + world[2] - 400.0).astype(np.float32)
    out = AnatomicalPatches(atlas)(
        MetaTensor(torch.from_numpy(hu), affine=torch.from_numpy(affine)), _shifted([3, -2, 5])
    )
    assert out["patches"].shape == (atlas.num_landmarks, 32, 32, 32) and out["patches"].dtype == np.float32
    axes = atlas.affine[:3, :3]
    for landmark, index in [(0, (0, 0, 0)), (len(atlas.corners) - 1, (31, 7, 19)), (5, (16, 31, 2))]:
        point = out["centres_world"][landmark] + axes @ (np.array(index) - 15.5)
        expected = hu_window(np.float32(2.0 * point[0] - 1.5 * point[1] + point[2] - 400.0))
        assert out["patches"][landmark][index] == pytest.approx(float(expected), abs=1e-4)


def test_patch_centres_are_mapped_atlas_centres(atlas):
    out = AnatomicalPatches(atlas)(np.zeros((10, 10, 10), np.float32), _shifted([3, -2, 5]), affine=np.eye(4))
    expected = apply_affine(atlas.affine, atlas.corners + 15.5) + [3, -2, 5]
    np.testing.assert_allclose(out["centres_world"], expected)


def test_outside_volume_reads_minus_one(atlas):
    out = AnatomicalPatches(atlas)(np.full((20, 20, 20), 100.0, np.float32), _shifted([500, 0, 0]), affine=np.eye(4))
    assert np.all(out["patches"] == -1.0)


def test_locations_and_neighbours_are_the_atlas_ones(atlas):
    data = {"image": MetaTensor(torch.zeros(1, 8, 8, 8)), "registration": _shifted([0, 0, 0])}
    out = AnatomicalPatchesd(keys="image", atlas=atlas, k=3)(data)
    np.testing.assert_array_equal(out["locations"], normalise_corners(atlas.corners))
    np.testing.assert_array_equal(out["neighbours"], atlas.neighbours(3))


@pytest.fixture(scope="module")
def dense(atlas):
    """Dense windows of the atlas itself seen as a subject (identity registration)."""
    hu = np.where(atlas.mask > 0, -850.0, 40.0).astype(np.float32)
    image = MetaTensor(torch.from_numpy(hu), affine=torch.from_numpy(atlas.affine))
    lung = MetaTensor(torch.from_numpy(atlas.mask), affine=torch.from_numpy(atlas.affine))
    return DenseWindows(atlas, window=32, stride=16)(image, lung, _shifted([0, 0, 0]))


def test_dense_windows_cover_every_lung_voxel(atlas, dense):
    covered = np.zeros(dense.grid_shape, bool)
    for x, y, z in dense.origins:
        covered[x : x + 32, y : y + 32, z : z + 32] = True
    assert dense.lung.sum() == atlas.mask.sum()  # the grid holds the whole lung
    assert np.all(covered[dense.lung > 0])
    assert np.all(np.array(dense.grid_shape) - 32 >= dense.origins.max(0))
    assert np.all((dense.origins % 16) == 0)


def test_dense_window_locations_normalise_like_landmarks(atlas, dense):
    corners = apply_affine(np.linalg.inv(atlas.affine) @ dense.grid_affine, dense.origins)
    np.testing.assert_allclose(dense.locations, normalise_corners(corners, atlas.corners), atol=1e-5)


def test_dense_blend_of_windows_restores_the_grid(dense):
    restored = dense.blend(dense.windows())[0]
    inside = np.zeros(dense.grid_shape, bool)
    for x, y, z in dense.origins:
        inside[x : x + 32, y : y + 32, z : z + 32] = True
    np.testing.assert_allclose(restored[inside], dense.grid[inside], atol=1e-6)
