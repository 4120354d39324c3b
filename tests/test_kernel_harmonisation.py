"""Kernel harmonisation of the densitometry (``drasclr_ext.metrics.kernel_harmonise``) on small synthetic chests:
one object reconstructed with a soft and with a sharp (edge-enhancing) kernel at the same dose, so that the two
differ only in kernel, as a scanner's two reconstructions of one acquisition do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from drasclr_ext.inference.dense import DenseSubtypeWriter
from drasclr_ext.metrics.emphysema import laa950_percent, perc15
from drasclr_ext.metrics.kernel_harmonise import (
    DOSE_NOISE_HU,
    dicom_kernel_class,
    edge_mtf,
    harmonised_densitometry,
)
from drasclr_ext.quality import subject_quality
from drasclr_ext.transforms.harmonise import HarmoniseNoised

PIXEL_MM = 0.7
AFFINE = np.diag([PIXEL_MM, PIXEL_MM, 2.0, 1.0])
SOFT = (0.5,)  # Gaussian in-plane MTF (sigma mm); with the edge measurement's own blur it reads as the reference
SHARP = (0.36, 0.8, 1.0)  # Gaussian core, edge enhancement and its scale (mm): MTF peak 1.34, like a B70f


def _mtf(f: np.ndarray, core: float, enhancement: float = 0.0, enhancement_mm: float = 1.0) -> np.ndarray:
    gauss = lambda s: np.exp(-2 * np.pi**2 * (s * f) ** 2)  # noqa: E731
    return gauss(core) * (1 + enhancement * (1 - gauss(enhancement_mm)))


def _chest(seed: int = 0, shape: tuple[int, int, int] = (200, 160, 16)) -> tuple[np.ndarray, np.ndarray]:
    """Object HU (no blur, no noise) and lung labels: a body of 40 HU, two lungs of -860 HU with a smooth texture,
    vessels and a few lucencies."""
    rng = np.random.default_rng(seed)
    centred = [(np.arange(n) - n / 2) * PIXEL_MM for n in shape[:2]]
    x, y = np.meshgrid(*centred, indexing="ij")
    lung2d = np.zeros(shape[:2], np.uint8)
    for label, cx in ((1, -27.0), (2, 27.0)):
        lung2d[((x - cx) / 21) ** 2 + (y / 33) ** 2 < 1] = label
    lung = np.repeat(lung2d[:, :, None], shape[2], 2)
    inside = lung > 0
    body = np.broadcast_to(((x / 66) ** 2 + (y / 52) ** 2 < 1)[:, :, None], shape)
    hu = np.where(body, 40.0, -1000.0)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), (3, 3, 1)) * 120
    hu = np.where(inside, -860.0 + texture, hu)
    vessels = ndimage.gaussian_filter((rng.random(shape) < 0.003).astype(float), (1.2, 1.2, 0.6)) > 0.04
    holes = ndimage.gaussian_filter((rng.random(shape) < 0.002).astype(float), (2, 2, 0.8)) > 0.02
    hu[vessels & inside] = 30.0
    hu[holes & inside] = -990.0
    return hu.astype(np.float32), lung


def _reconstruct(hu: np.ndarray, kernel: tuple, soft_noise_hu: float, seed: int = 1) -> np.ndarray:
    """``hu`` seen through an in-plane kernel MTF, plus quantum noise with the power spectrum of filtered back
    projection (frequency x MTF^2), at the dose where the soft kernel's noise is ``soft_noise_hu``; integer HU."""
    fx, fy = np.fft.fftfreq(hu.shape[0], PIXEL_MM), np.fft.rfftfreq(hu.shape[1], PIXEL_MM)
    f = np.hypot(fx[:, None], fy[None, :])[:, :, None]
    white = np.fft.rfft2(np.random.default_rng(seed).standard_normal(hu.shape), axes=(0, 1))

    def through(spectrum: np.ndarray, response: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(spectrum * response, s=hu.shape[:2], axes=(0, 1))

    dose = soft_noise_hu / through(white, np.sqrt(f) * _mtf(f, *SOFT)).std()
    signal = through(np.fft.rfft2(hu, axes=(0, 1)), _mtf(f, *kernel))
    noise = dose * through(white, np.sqrt(f) * _mtf(f, *kernel))
    return np.round(signal + noise).astype(np.float32)


@pytest.fixture(scope="module")
def pair() -> dict[str, np.ndarray]:
    hu, lung = _chest()
    return {"soft": _reconstruct(hu, SOFT, 20.0), "sharp": _reconstruct(hu, SHARP, 20.0), "lung": lung}


@pytest.mark.parametrize("noise", [15.0, 40.0])
def test_the_noise_estimate_recovers_known_white_noise(noise):
    hu, lung = _chest()
    smooth = ndimage.gaussian_filter(hu, (0.5 / PIXEL_MM, 0.5 / PIXEL_MM, 0))
    noisy = smooth + np.random.default_rng(2).normal(0, noise, hu.shape).astype(np.float32)
    assert harmonised_densitometry(noisy, lung, AFFINE)["noise_hu"] == pytest.approx(noise, rel=0.12)


def test_the_edge_mtf_tells_a_soft_kernel_from_a_sharp_one():
    hu, lung = _chest()
    soft, sharp = (_reconstruct(hu, kernel, 0.0) for kernel in (SOFT, SHARP))  # noise-free
    measured = edge_mtf(soft, lung, AFFINE)
    assert measured["edges"] > 1000
    f, mtf = measured["frequencies"], measured["mtf"]
    assert mtf[0] == pytest.approx(1.0)
    # a Gaussian edge of 0.5 mm, widened by the measurement (profile interpolation) to about 0.6 mm
    sigma = np.sqrt(-np.log(np.interp(0.3, f, mtf)) / (2 * np.pi**2 * 0.3**2))
    assert 0.52 < sigma < 0.68
    soft_info, sharp_info = (harmonised_densitometry(x, lung, AFFINE) for x in (soft, sharp))
    assert soft_info["kernel_class"] == "soft" and soft_info["sharpness_index"] < 1.15
    assert sharp_info["kernel_class"] == "sharp" and sharp_info["sharpness_index"] > 1.8
    assert np.interp(0.2, f, edge_mtf(sharp, lung, AFFINE)["mtf"]) > 1.05  # the enhancement's MTF bump


def test_a_sharp_reconstruction_harmonises_to_the_soft_one(pair):
    sharp, lung = pair["sharp"], pair["lung"]
    raw = {name: (laa950_percent(pair[name], lung), perc15(pair[name], lung)) for name in ("soft", "sharp")}
    assert raw["sharp"][0] - raw["soft"][0] > 5.0 and raw["soft"][1] - raw["sharp"][1] > 30.0  # kernel effect
    info = harmonised_densitometry(sharp, lung, AFFINE)
    assert info["applied"] and info["conversion_weight"] == 1.0 and info["noise_hu"] > 45
    assert info["noise_hu_after"] < 0.5 * info["noise_hu"]
    # the project's targets for kernel pairs: within 1 percentage point and 5 HU of the soft scan
    assert info["laa950_percent"] == pytest.approx(raw["soft"][0], abs=1.0)
    assert info["perc15_hu"] == pytest.approx(raw["soft"][1], abs=5.0)


def test_a_soft_scan_is_left_as_it_is(pair):
    soft, lung = pair["soft"], pair["lung"]
    info = harmonised_densitometry(soft, lung, AFFINE)
    assert not info["applied"] and info["conversion_weight"] == 0.0 and info["sigma_mm"] == 0.0
    assert info["laa950_percent"] == laa950_percent(soft, lung) and info["perc15_hu"] == perc15(soft, lung)


def test_a_noisy_soft_scan_is_only_smoothed_down_to_the_dose_limit():
    hu, lung = _chest()
    low_dose = _reconstruct(hu, SOFT, 60.0)
    info = harmonised_densitometry(low_dose, lung, AFFINE)
    assert info["kernel_class"] == "soft" and info["conversion_weight"] == 0.0
    assert info["noise_target_hu"] == DOSE_NOISE_HU and info["sigma_mm"] > 0
    assert info["noise_hu_after"] == pytest.approx(DOSE_NOISE_HU, abs=1.5)
    assert info["laa950_percent"] < laa950_percent(low_dose, lung)


def test_the_slice_axis_is_found_from_the_affine(pair):
    sharp, lung = pair["sharp"], pair["lung"]
    axial = harmonised_densitometry(sharp, lung, AFFINE)
    affine = np.zeros((4, 4))  # the same scan stored with the slice axis first
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.0, PIXEL_MM, PIXEL_MM, 1.0
    moved = harmonised_densitometry(np.moveaxis(sharp, 2, 0), np.moveaxis(lung, 2, 0), affine)
    assert moved["sharpness_index"] == pytest.approx(axial["sharpness_index"], abs=1e-6)
    assert moved["laa950_percent"] == pytest.approx(axial["laa950_percent"], abs=1e-6)
    assert moved["perc15_hu"] == pytest.approx(axial["perc15_hu"], abs=1e-3)


def test_without_pleural_edges_the_dicom_kernel_decides():
    hu, lung = _chest()
    noisy = _reconstruct(hu, SOFT, 45.0)
    core = np.zeros_like(lung)
    core[70:130, 60:100] = lung[70:130, 60:100]  # lungs with no chest wall beside them in the mask's reach
    core[90:110] = 0
    unknown = harmonised_densitometry(noisy, core, AFFINE)
    assert unknown["edges"] < 200 and unknown["kernel_class"] == "unknown" and unknown["kernel_class_source"] == "image"
    assert unknown["noise_target_hu"] == DOSE_NOISE_HU
    tagged = harmonised_densitometry(noisy, core, AFFINE, dicom_kernel="B70f")
    assert tagged["kernel_class"] == "sharp" and tagged["kernel_class_source"] == "dicom"
    assert tagged["noise_target_hu"] < DOSE_NOISE_HU and tagged["noise_hu_after"] < unknown["noise_hu_after"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("B70f", "sharp"),
        ("B40f", "soft"),
        ("Br64\\3", "sharp"),
        ("Br36\\3", "soft"),
        ("I70f", "sharp"),
        ("LUNG", "sharp"),
        ("BONEPLUS", "sharp"),
        ("STANDARD", "soft"),
        ("L", "sharp"),
        ("YC", "sharp"),
        ("B", "soft"),
        ("FC86", "sharp"),
        ("FC13", "soft"),
        ("XYZ", "unknown"),
        ("", None),
        (None, None),
    ],
)
def test_dicom_kernel_names_are_classified(name, expected):
    assert dicom_kernel_class(name) == expected


def test_the_report_gives_raw_and_harmonised_densitometry_and_flags_a_sharp_kernel(pair):
    sharp, lung = pair["sharp"], pair["lung"]
    image = MetaTensor(torch.from_numpy(sharp[None]), affine=torch.from_numpy(AFFINE))
    image.meta["acquisition"] = {"convolution_kernel": "B70f"}
    mask = MetaTensor(torch.from_numpy(lung[None]), affine=torch.from_numpy(AFFINE))
    d = HarmoniseNoised("image")({"image": image, "lung_mask": mask})
    label = MetaTensor(torch.from_numpy(lung[None]), affine=torch.from_numpy(AFFINE))
    report = DenseSubtypeWriter().report({**d, "subtype_label": label}, "s")
    section = report["harmonisation"]
    # raw densitometry stays the report's primary values
    assert report["laa950_percent"] == pytest.approx(laa950_percent(sharp, lung))
    assert report["perc15_hu"] == pytest.approx(perc15(sharp, lung), abs=1.0)
    # the model saw the noise-harmonised image (30 HU); its densitometry is kept apart
    assert section["applied"] and section["used_for_subtype_map"] == "harmonised"
    assert section["noise_hu_after"] == pytest.approx(30.0, abs=1.5)
    model_input = section["model_input"]
    assert model_input["laa950_percent"] < report["laa950_percent"]
    # the kernel-harmonised densitometry, what was measured and done, and the DICOM kernel
    densitometry = section["densitometry"]
    assert densitometry["kernel_class"] == "sharp" and densitometry["kernel_class_source"] == "image"
    assert densitometry["sharpness_index"] > 1.5 and densitometry["applied"] and densitometry["edges"] > 1000
    assert set(densitometry["edge_mtf"]) == {"0.1", "0.2", "0.3", "0.4", "0.5"}
    assert section["laa950_percent"] < model_input["laa950_percent"] < report["laa950_percent"]
    assert section["perc15_hu"] > report["perc15_hu"]
    assert section["noise_hu"] > 45 and section["dicom_kernel"] == {"name": "B70f", "class": "sharp"}
    flags = {f["flag"]: f for f in report["quality"]}
    assert "sharp_kernel" in flags and "'B70f'" in flags["sharp_kernel"]["message"]


def test_the_sharp_kernel_flag_reads_the_report():
    lung = np.zeros((20, 20, 12), np.uint8)
    lung[5:15, 5:15, 2:10] = 1
    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    soft = {"harmonisation": {"noise_hu": 20.0, "densitometry": {"kernel_class": "soft"}}}
    assert subject_quality(soft, lung, affine) == []
    tag_only = {
        "harmonisation": {
            "noise_hu": 20.0,
            "densitometry": {"kernel_class": "unknown", "kernel_class_source": "image"},
            "dicom_kernel": {"name": "LUNG", "class": "sharp"},
        }
    }
    (flag,) = subject_quality(tag_only, lung, affine)
    assert flag["flag"] == "sharp_kernel" and flag["severity"] == "warning" and "'LUNG'" in flag["message"]
