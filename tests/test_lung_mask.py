"""The classical lung mask: both lungs labelled right/left, airways out, vessels in, any orientation and slice."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.transforms.lung_mask import (
    LEFT_LUNG,
    RIGHT_LUNG,
    LungMask,
    LungMaskd,
    compute_lung_mask,
    lung_volumes_ml,
)
from tests.synthetic_chest import dice, make_chest


@pytest.fixture(scope="module")
def chest():
    return make_chest()


@pytest.fixture(scope="module")
def chest_mask(chest):
    return compute_lung_mask(chest.hu, chest.affine, return_airways=True)


def _world_x(mask: np.ndarray, affine: np.ndarray) -> float:
    return float((affine @ np.array([*np.argwhere(mask).mean(axis=0), 1.0]))[0])


def test_both_lungs_found(chest, chest_mask):
    labels, _ = chest_mask
    assert labels.dtype == np.uint8 and labels.shape == chest.hu.shape
    assert set(np.unique(labels)) == {0, 1, 2}
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        assert dice(labels == lab, chest.lungs == lab) > 0.97


def test_right_lung_is_on_the_patients_right(chest, chest_mask):
    """RAS: world x grows towards the patient's right, so the right lung (1) has the larger x."""
    labels, _ = chest_mask
    assert _world_x(labels == RIGHT_LUNG, chest.affine) > 0 > _world_x(labels == LEFT_LUNG, chest.affine)


def test_trachea_and_main_bronchi_excluded(chest, chest_mask):
    labels, airways = chest_mask
    assert np.count_nonzero(labels[chest.trachea]) == 0
    assert airways[chest.trachea].mean() > 0.95


def test_vessels_inside_lung_filled(chest, chest_mask):
    labels, _ = chest_mask
    assert chest.vessels.sum() > 100
    assert (labels[chest.vessels] > 0).mean() > 0.98


def test_flipped_orientation_labels_same_world_points(chest, chest_mask):
    """The same scan stored LPS-flipped (x and y reversed, affine adjusted) gets the same labels in the world."""
    labels, _ = chest_mask
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [chest.hu.shape[0] - 1, chest.hu.shape[1] - 1]
    flipped = compute_lung_mask(chest.hu[::-1, ::-1].copy(), chest.affine @ flip)
    back = flipped[::-1, ::-1]
    assert (back == labels).mean() > 0.999
    assert _world_x(back == RIGHT_LUNG, chest.affine) > 0


def test_thick_slices():
    thick = make_chest(spacing=(2.5, 2.5, 7.5))
    labels = compute_lung_mask(thick.hu, thick.affine)
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        assert dice(labels == lab, thick.lungs == lab) > 0.95
    assert np.count_nonzero(labels[thick.trachea]) == 0


def test_touching_lungs_are_split():
    touching = make_chest(lung_gap_mm=-20.0)
    labels = compute_lung_mask(touching.hu, touching.affine)
    vol = lung_volumes_ml(labels, touching.affine)
    assert 0.4 < vol["right"] / vol["total"] < 0.6
    assert _world_x(labels == RIGHT_LUNG, touching.affine) > 0 > _world_x(labels == LEFT_LUNG, touching.affine)


def test_lung_volumes_ml_exact():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 1  # 200 voxels
    labels[5:8] = 2  # 300 voxels
    vol = lung_volumes_ml(labels, np.diag([2.0, 2.0, 2.5, 1.0]))  # 10 mm^3 = 0.01 ml per voxel
    assert vol == pytest.approx({"right": 2.0, "left": 3.0, "total": 5.0})


def test_lungmask_transform_keeps_geometry(chest, chest_mask):
    image = MetaTensor(torch.from_numpy(chest.hu)[None], affine=torch.as_tensor(chest.affine))
    out = LungMask()(image)
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8 and tuple(out.shape) == (1, *chest.hu.shape)
    np.testing.assert_allclose(out.affine.numpy(), chest.affine)
    np.testing.assert_array_equal(out.numpy()[0], chest_mask[0])


def test_lungmaskd_writes_mask_key(chest):
    image = MetaTensor(torch.from_numpy(chest.hu)[None], affine=torch.as_tensor(chest.affine))
    d = LungMaskd(keys="image", mask_key="lungs")({"image": image})
    assert d["image"] is image and set(np.unique(d["lungs"].numpy())) == {0, 1, 2}


@pytest.mark.skipif(importlib.util.find_spec("lungmask") is not None, reason="lungmask is installed")
def test_lungmask_backend_without_package_says_how_to_get_it(chest):
    image = MetaTensor(torch.from_numpy(chest.hu), affine=torch.as_tensor(chest.affine))
    with pytest.raises(DrasCLRError, match="pip install lungmask"):
        LungMask(method="lungmask")(image)


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="classical"):
        LungMask(method="unet")


def test_real_chest_ct(lung_ct_dir):
    """TCIA Lung-PET-CT-Dx (CC BY 4.0) case A0001, 64 slices of 5 mm: two lungs, a few litres, no trachea."""
    from drasclr_ext.transforms.io import load_ct

    image = load_ct(lung_ct_dir)
    hu, affine = image.numpy(), image.affine.numpy()
    labels, airways = compute_lung_mask(hu, affine, return_airways=True)
    vol = lung_volumes_ml(labels, affine)
    assert 1500 < vol["right"] < 4500 and 1200 < vol["left"] < 4000 and 3000 < vol["total"] < 8000
    assert _world_x(labels == RIGHT_LUNG, affine) > _world_x(labels == LEFT_LUNG, affine)
    # trachea: in upper slices, the compact air region near the left-right centre is airway, never lung
    for z in (hu.shape[2] - 8, hu.shape[2] - 14):
        trachea = _central_air_tube(hu[:, :, z])
        assert np.count_nonzero(labels[:, :, z][trachea]) == 0 and airways[:, :, z][trachea].mean() > 0.9
    assert 20 < airways.sum() * float(np.prod(image.meta["spacing"])) / 1000 < 250


def _central_air_tube(slice_hu: np.ndarray) -> np.ndarray:
    """The air component (< -900 HU, 1-15 cm^2 at 0.84 mm pixels) whose centroid is in the slice's central box."""
    from scipy import ndimage

    lab, _ = ndimage.label(slice_hu < -900)
    for j in range(1, int(lab.max()) + 1):
        comp = lab == j
        cx, cy = np.argwhere(comp).mean(axis=0)
        if 150 < comp.sum() < 2000 and 200 < cx < 312 and 180 < cy < 330:
            return comp
    raise AssertionError("no trachea-like air region found in the slice")


def test_agrees_with_phantom_ground_truth():
    """The project's phantom generator labels lungs with the same right/left convention and nearly the same voxels."""
    from drasclr_ext.data.phantom import generate_phantom

    ph = generate_phantom(0, shape=(96, 96, 80))
    labels = compute_lung_mask(ph["image"], ph["affine"])
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        assert dice(labels == lab, ph["lung_mask"] == lab) > 0.97


def test_mask_keeps_the_memory_order_of_the_scan(chest, chest_mask):
    labels, airways = chest_mask
    fortran, fortran_airways = compute_lung_mask(np.asfortranarray(chest.hu), chest.affine, return_airways=True)
    np.testing.assert_array_equal(fortran, labels)
    np.testing.assert_array_equal(fortran_airways, airways)
    assert fortran.flags.f_contiguous and (labels.flags.f_contiguous == chest.hu.flags.f_contiguous)
