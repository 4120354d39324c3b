"""HU window, landmark patches and dense windows on small synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from drasclr_ext.atlas import Atlas, box_counts, build_landmarks, normalise_corners
from drasclr_ext.transforms.patches import (
    AnatomicalPatches,
    AnatomicalPatchesd,
    DenseWindows,
    HUWindow,
    HUWindowd,
    _windows_with_lung,
    dense_windows,
    hu_window,
    mask_bounding_box,
    resample_affine,
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


def _scipy_resample(volume, matrix, offset, shape, order, cval):
    return ndimage.affine_transform(
        volume, matrix, offset, output_shape=shape, order=order, mode="constant", cval=cval, prefilter=False
    )


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_resample_affine_equals_scipy_for_axis_aligned_maps(order, layout):
    rng = np.random.default_rng(order)
    volume = rng.normal(size=(20, 25, 30)).astype(np.float32)
    for trial in range(40):  # scalings, flips and axis permutations; samples partly outside the volume
        matrix = np.zeros((3, 3))
        matrix[rng.permutation(3), np.arange(3)] = rng.choice([-1, 1], 3) * rng.uniform(0.5, 2.0, 3)
        shape, offset = tuple(int(n) for n in rng.integers(5, 30, 3)), rng.uniform(-10, 40, 3)
        source = np.asfortranarray(volume) if trial % 2 else volume
        out = resample_affine(source, matrix, offset, shape, order=order, cval=-5.0, layout=layout)
        np.testing.assert_allclose(out, _scipy_resample(volume, matrix, offset, shape, order, -5.0), atol=1e-5)
        assert out.flags.f_contiguous if layout == "F" else out.flags.c_contiguous


def test_resample_affine_nearest_ties_and_edges_match_scipy():
    volume = np.arange(6 * 5 * 4, dtype=np.uint8).reshape(6, 5, 4)
    matrix, offset = np.diag([0.5, 1.0, 1.5]), np.array([-0.5, 0.5, -1e-9])  # exact .5 ties, a sample just outside
    out = resample_affine(volume, matrix, offset, (14, 6, 4), order=0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _scipy_resample(volume, matrix, offset, (14, 6, 4), 0, 0))


def test_resample_affine_oblique_maps_go_to_scipy():
    volume = np.random.default_rng(0).normal(size=(15, 16, 17)).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    matrix = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    out = resample_affine(volume, matrix, [2.0, -1.0, 0.5], (12, 13, 14), order=1, layout="F")
    np.testing.assert_allclose(out, _scipy_resample(volume, matrix, [2.0, -1.0, 0.5], (12, 13, 14), 1, 0.0))
    assert out.flags.f_contiguous


def test_mask_bounding_box():
    mask = np.zeros((7, 8, 9), bool)
    assert mask_bounding_box(mask) is None
    mask[2, 3:5, 8] = mask[4, 3, 1] = True
    lo, hi = mask_bounding_box(np.asfortranarray(mask))
    assert lo.tolist() == [2, 3, 1] and hi.tolist() == [5, 5, 9]


@pytest.mark.parametrize("stride, window", [(4, 8), (4, 12), (8, 8), (4, 6)])
def test_windows_with_lung_equals_the_summed_volume_table(stride, window):
    rng = np.random.default_rng(window)
    counts = np.array([5, 4, 3])
    shape = tuple((counts - 1) * stride + window)
    lung = np.zeros(shape, np.uint8)
    lung[tuple(rng.integers(0, shape, (3, 3)).T)] = 1  # three lung voxels
    starts = [np.arange(c) * stride for c in counts]
    origins = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.int64)
    expected = box_counts(lung, origins, window) > 0
    assert expected.any() and not expected.all()
    for array in (lung, np.asfortranarray(lung)):
        np.testing.assert_array_equal(_windows_with_lung(array, origins, window, stride), expected)


def test_dense_windows_do_not_depend_on_the_memory_order(atlas):
    affine = np.diag([-0.8, -0.9, 1.5, 1.0])
    affine[:3, 3] = [70.0, 60.0, -70.0]
    ijk = np.indices((180, 140, 100), dtype=np.float64)
    hu = (3.0 * ijk[0] - 2.0 * ijk[1] + ijk[2] - 900.0).astype(np.float32)
    lung = np.zeros(hu.shape, np.uint8)
    lung[30:150, 20:120, 10:90] = 1
    results = [
        dense_windows(order(hu), order(lung), _shifted([3, -2, 5]), atlas, affine=affine)
        for order in (np.ascontiguousarray, np.asfortranarray)
    ]
    c, f = results
    np.testing.assert_array_equal(c.origins, f.origins)
    np.testing.assert_array_equal(c.lung, f.lung)
    np.testing.assert_allclose(c.grid, f.grid, atol=1e-6)
    np.testing.assert_allclose(c.locations, f.locations)
    assert f.grid.flags.f_contiguous and c.grid.flags.c_contiguous
