"""Noise harmonisation before the dense model (``drasclr_ext.transforms.harmonise``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from drasclr_ext.inference.dense import DenseSubtypeWriter
from drasclr_ext.transforms.harmonise import HarmoniseNoised, harmonise_noise, lung_noise_hu

AFFINE = np.diag([0.7, 0.7, 1.25, 1.0])


def _scan(noise_hu: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A (X, Y, Z) chest-like volume: tissue at 40 HU around a lung of -850 HU parenchyma with a few vessels, plus
    white noise of ``noise_hu``."""
    rng = np.random.default_rng(seed)
    shape = (96, 96, 40)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    lung2d = ((x - 48) / 38) ** 2 + ((y - 48) / 30) ** 2 < 1
    lung = np.repeat(lung2d[:, :, None], shape[2], axis=2).astype(np.uint8)
    hu = np.where(lung > 0, -850.0, 40.0).astype(np.float32)
    vessels = ndimage.gaussian_filter((rng.random(shape) < 0.002).astype(np.float32), 1.0) > 0.05
    hu[vessels & (lung > 0)] = 30.0
    return hu + rng.normal(0, noise_hu, shape).astype(np.float32), lung


@pytest.mark.parametrize("noise", [20.0, 45.0])
def test_noise_estimate_matches_the_added_white_noise(noise):
    hu, lung = _scan(noise)
    assert lung_noise_hu(hu, lung, AFFINE) == pytest.approx(noise, rel=0.12)


def test_noisy_scans_are_smoothed_to_the_target_and_quiet_ones_left_alone():
    hu, lung = _scan(60.0)
    out, info = harmonise_noise(hu, lung, AFFINE, target_noise_hu=30.0)
    assert info["applied"] and info["noise_hu"] > 50 and 0 < info["sigma_mm"] <= 1.5
    assert info["noise_hu_after"] == pytest.approx(30.0, abs=1.5)
    assert lung_noise_hu(out, lung, AFFINE) == pytest.approx(30.0, abs=1.5)
    inner = ndimage.binary_erosion(lung > 0, iterations=3)
    assert np.abs(out[inner].mean() - hu[inner].mean()) < 1.0  # smoothing keeps the mean density
    quiet, lung = _scan(20.0)
    same, info = harmonise_noise(quiet, lung, AFFINE, target_noise_hu=30.0)
    assert same is quiet and not info["applied"] and info["sigma_mm"] == 0.0


def test_the_axial_slice_axis_is_found_from_the_affine():
    hu, lung = _scan(60.0)
    axial, _ = harmonise_noise(hu, lung, AFFINE)
    # the same scan stored with the slice axis first (an affine whose first column points head-foot)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1.25, 0.7, 0.7, 1.0
    moved, info = harmonise_noise(np.moveaxis(hu, 2, 0), np.moveaxis(lung, 2, 0), affine)
    assert info["applied"]
    np.testing.assert_allclose(np.moveaxis(moved, 0, 2), axial, atol=1e-3)


def test_dictionary_transform_keeps_the_raw_scan_and_the_report_gives_both():
    hu, lung = _scan(60.0)
    image = MetaTensor(torch.from_numpy(hu[None]), affine=torch.from_numpy(AFFINE))
    mask = MetaTensor(torch.from_numpy(lung[None]), affine=torch.from_numpy(AFFINE))
    d = HarmoniseNoised("image")({"image": image, "lung_mask": mask})
    assert d["image_raw"] is image and d["image"].shape == image.shape
    assert torch.equal(d["image"].affine, image.affine) and d["harmonisation"]["applied"]
    label = MetaTensor(torch.from_numpy(lung[None]), affine=torch.from_numpy(AFFINE))
    report = DenseSubtypeWriter().report({**d, "subtype_label": label}, "s")
    section = report["harmonisation"]
    assert section["used_for_subtype_map"] == "harmonised"
    lung_raw = hu[lung > 0]
    assert report["laa950_percent"] == pytest.approx(100 * np.mean(lung_raw < -950))  # raw densitometry
    assert report["perc15_hu"] == pytest.approx(np.percentile(lung_raw, 15), abs=1.0)
    # the image the model saw: less noise, fewer voxels below -950 (and fewer still once kernel-harmonised)
    assert section["model_input"]["laa950_percent"] < 0.5 * report["laa950_percent"]
    assert section["laa950_percent"] < 0.5 * report["laa950_percent"]
    # this toy scan is noisy, its 87 ml lung fills every slice: each fact is flagged in the report
    flags = {f["flag"] for f in report["quality"]}
    assert {"high_noise", "lungs_cut_off", "implausible_lung_volume"} <= flags
    off = HarmoniseNoised("image", enabled=False)({"image": image, "lung_mask": mask})
    assert off["image"] is image and "image_raw" not in off and off["harmonisation"]["noise_hu"] > 50
