"""HU window, landmark patches and the dense model's atlas grid with its location channels on small synthetic
volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialCropd
from scipy import ndimage

from drasclr_ext.atlas import Atlas, build_landmarks, normalise_corners
from drasclr_ext.errors import InputImageError
from drasclr_ext.geometry import apply_affine, mask_bounding_box, resample_affine
from drasclr_ext.transforms.atlas_grid import AtlasGrid, AtlasLocationd, atlas_grid, location_channels, location_scale
from drasclr_ext.transforms.patches import (
    AnatomicalPatches,
    AnatomicalPatchesd,
    HUWindow,
    HUWindowd,
    hu_window,
)
from drasclr_ext.transforms.registration import RegistrationResult


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


def _atlas_map(offset=(3.0, -2.0, 5.0), angle=0.0) -> RegistrationResult:
    """A subject -> atlas world map: a rotation about z by ``angle`` then a shift."""
    matrix = np.eye(4)
    c, s = np.cos(angle), np.sin(angle)
    matrix[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    matrix[:3, 3] = offset
    return RegistrationResult(matrix)


@pytest.fixture(scope="module")
def grid(atlas) -> AtlasGrid:
    """The atlas grid of the atlas itself seen as a subject (identity registration)."""
    hu = np.where(atlas.mask > 0, -850.0, 40.0).astype(np.float32)
    image = MetaTensor(torch.from_numpy(hu), affine=torch.from_numpy(atlas.affine))
    lung = MetaTensor(torch.from_numpy(atlas.mask), affine=torch.from_numpy(atlas.affine))
    return atlas_grid(image, lung, _shifted([0, 0, 0]), atlas, margin=4, min_size=32)


def test_atlas_grid_holds_the_whole_lung_with_its_margin(atlas, grid):
    assert grid.lung.sum() == atlas.mask.sum()  # 1 mm voxels along the atlas axes: the lung is copied exactly
    np.testing.assert_array_equal(grid.affine[:3, :3], np.diag([-1.0, 1.0, 1.0]))
    lo, hi = mask_bounding_box(grid.lung)
    # margin 4 mm around the lung's voxel boxes, rounded outwards to whole grid voxels
    assert np.all((lo >= 4) & (lo <= 5)) and np.all((np.array(grid.shape) - hi >= 4) & (np.array(grid.shape) - hi <= 5))
    # image and lung on the grid are the atlas voxels they sit on
    voxel = np.rint(apply_affine(np.linalg.inv(atlas.affine) @ grid.affine, np.argwhere(grid.lung > 0))).astype(int)
    assert np.all(atlas.mask[tuple(voxel.T)] > 0)
    np.testing.assert_allclose(grid.image[grid.lung > 0], hu_window(np.float32(-850.0)))
    np.testing.assert_allclose(grid.world_to_atlas, np.linalg.inv(atlas.affine))


def test_atlas_grid_is_at_least_min_size_and_centres_the_lung(atlas):
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[10:14, 12:20, 5:25] = 1  # 4 x 8 x 20 mm of lung
    grid = atlas_grid(
        mask.astype(np.float32) * -900.0, mask, _shifted([0, 0, 0]), atlas, margin=2, min_size=32, affine=np.eye(4)
    )
    assert grid.shape == (32, 32, 32)
    lo, hi = mask_bounding_box(grid.lung)
    assert np.all(np.abs(lo - (32 - hi)) <= 1)  # the enlargement is split evenly on both sides
    with pytest.raises(InputImageError, match="empty"):
        atlas_grid(
            np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8), _shifted([0, 0, 0]), atlas, affine=np.eye(4)
        )
    with pytest.raises(InputImageError, match="differs"):
        atlas_grid(np.zeros((8, 8, 8), np.float32), mask, _shifted([0, 0, 0]), atlas, affine=np.eye(4))


def test_location_channels_average_to_the_normalised_corner_of_each_window_centre(atlas):
    """For any window, the mean of the location channels is the location the encoder is conditioned on: the
    normalised corner of the 32^3 atlas patch centred at the window centre (as for the landmark patches)."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, 1.0, 1.0]) @ np.array([[0.9, 0.1, 0.0], [0.0, 1.0, 0.05], [0.0, 0.0, 1.1]])
    affine[:3, 3] = [40.0, -30.0, -35.0]
    registration = _atlas_map((4.0, -3.0, 2.0), angle=0.2)
    world_to_atlas = np.linalg.inv(atlas.affine) @ registration.subject_to_atlas
    shape = (70, 66, 80)
    loc = location_channels(affine, shape, world_to_atlas, location_scale(atlas))
    assert loc.shape == (3, *shape) and loc.dtype == np.float32
    rng = np.random.default_rng(0)
    for size in (32, 64, 17):
        for _ in range(4):
            start = rng.integers(0, np.array(shape) - size + 1)
            window = loc[(slice(None), *(slice(s, s + size) for s in start))]
            centre_world = apply_affine(affine, start + (size - 1) / 2.0)
            corner = apply_affine(world_to_atlas, centre_world) - (atlas.patch_size - 1) / 2.0
            expected = normalise_corners(corner[None], atlas.corners)[0]
            np.testing.assert_allclose(window.reshape(3, -1).mean(1), expected, atol=2e-5)
    # a single voxel's location is that of the patch centred on it
    corner = apply_affine(world_to_atlas, apply_affine(affine, np.array([5.0, 6.0, 7.0]))) - 15.5
    np.testing.assert_allclose(loc[:, 5, 6, 7], normalise_corners(corner[None], atlas.corners)[0], atol=1e-5)


def test_grid_locations_are_the_landmark_locations_at_the_landmarks(atlas, grid):
    """On the atlas's own grid, the voxel at the centre of landmark patch k has landmark k's location."""
    loc = grid.locations()
    world_to_grid = np.linalg.inv(grid.affine)
    checked = 0
    for k in range(len(atlas.corners)):
        centre = apply_affine(world_to_grid, apply_affine(atlas.affine, atlas.corners[k] + 15.5))
        if not np.all((centre >= 0) & (centre < np.array(grid.shape) - 1)):
            continue  # a landmark patch centred outside the grid
        lo = np.floor(centre).astype(int)
        window = loc[:, lo[0] : lo[0] + 2, lo[1] : lo[1] + 2, lo[2] : lo[2] + 2]  # the 2^3 voxels around it
        np.testing.assert_allclose(window.reshape(3, -1).mean(1), atlas.locations[k], atol=1e-5)
        checked += 1
    assert checked >= len(atlas.corners) // 2


def test_atlas_location_channels_of_a_crop_are_the_full_grid_channels_there(atlas):
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, 1.0, 1.0])
    affine[:3, 3] = [60.0, -20.0, -40.0]
    world_to_atlas = np.linalg.inv(atlas.affine) @ _atlas_map(angle=-0.1).subject_to_atlas
    scale = location_scale(atlas)
    image = MetaTensor(torch.rand(1, 48, 40, 56), affine=torch.from_numpy(affine))
    full = location_channels(affine, (48, 40, 56), world_to_atlas, scale)
    data = {"image": image, "world_to_atlas": world_to_atlas, "location_scale": scale}
    out = AtlasLocationd("image")(data)["image"]
    assert isinstance(out, MetaTensor) and out.shape == (4, 48, 40, 56)
    np.testing.assert_array_equal(out[0].numpy(), image[0].numpy())
    np.testing.assert_allclose(out[1:].numpy(), full, atol=1e-6)
    np.testing.assert_allclose(out.affine.numpy(), affine)
    crop = SpatialCropd("image", roi_start=(5, 12, 20), roi_end=(37, 36, 52))(data)
    cropped = AtlasLocationd("image")(crop)["image"]
    assert cropped.shape == (4, 32, 24, 32)
    np.testing.assert_allclose(cropped[1:].numpy(), full[:, 5:37, 12:36, 20:52], atol=1e-5)
    with pytest.raises(InputImageError, match="MetaTensor"):
        AtlasLocationd("image")({**data, "image": torch.rand(1, 4, 4, 4)})


def test_location_scale_normalises_like_the_landmarks(atlas):
    scale = location_scale(atlas)
    np.testing.assert_allclose(atlas.corners * scale - 1.0, normalise_corners(atlas.corners), atol=1e-6)


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


def test_atlas_grid_does_not_depend_on_the_memory_order(atlas):
    affine = np.diag([-0.8, -0.9, 1.5, 1.0])
    affine[:3, 3] = [70.0, 60.0, -70.0]
    ijk = np.indices((180, 140, 100), dtype=np.float64)
    hu = (3.0 * ijk[0] - 2.0 * ijk[1] + ijk[2] - 900.0).astype(np.float32)
    lung = np.zeros(hu.shape, np.uint8)
    lung[30:150, 20:120, 10:90] = 1
    c, f = (
        atlas_grid(order(hu), order(lung), _shifted([3, -2, 5]), atlas, affine=affine)
        for order in (np.ascontiguousarray, np.asfortranarray)
    )
    assert c.shape == f.shape
    np.testing.assert_array_equal(c.lung, f.lung)
    np.testing.assert_allclose(c.image, f.image, atol=1e-6)
    np.testing.assert_array_equal(c.affine, f.affine)
    assert f.image.flags.f_contiguous and c.image.flags.c_contiguous
