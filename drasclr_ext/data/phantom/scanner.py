"""The scanner of the phantoms: point spread and slice profile, reconstruction kernel, correlated noise, integer HU;
and the ground truth as that scanner sees the lesions."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

NOISE_CORRELATION_VOXELS = (0.6, 0.6, 0.3)  # the noise's Gaussian correlation by default, in voxels


def scan(
    hu: np.ndarray,
    spacing: Sequence[float],
    kernel: str,
    noise_hu: float,
    rng: np.random.Generator,
    noise_correlation_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The reconstructed image (float32 of integer HU) of the clean ``hu``, and the point spread's Gaussian sigma
    (voxels) that :func:`ground_truth` applies to the lesions.

    The noise is correlated in-plane over :data:`NOISE_CORRELATION_VOXELS` (voxels, whatever their size: at fine
    pixels finer than a smooth kernel can pass), or over ``noise_correlation_mm`` (mm, as a kernel shapes it)."""
    sp = np.asarray(spacing, float)
    psf_mm = 0.55 if kernel == "smooth" else 0.4
    sigma = np.array([psf_mm / sp[0], psf_mm / sp[1], 0.42 * 1.0])  # slice profile ~ one slice FWHM
    hu = ndi.gaussian_filter(hu, sigma)
    if kernel == "sharp":
        hu = hu + 0.3 * (hu - ndi.gaussian_filter(hu, 1.2 / sp))
    correlation = NOISE_CORRELATION_VOXELS
    if noise_correlation_mm is not None:
        correlation = (noise_correlation_mm / sp[0], noise_correlation_mm / sp[1], NOISE_CORRELATION_VOXELS[2])
    noise = ndi.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), correlation)
    noise *= np.float32(noise_hu / (noise.std() + 1e-6))
    image = np.round(np.clip(hu + noise, -1024.0, 3071.0)).astype(np.float32)  # integer HU, as scanners store
    return image, sigma


def ground_truth(
    lungs: np.ndarray,
    airway_lumen: np.ndarray,
    ple: np.ndarray,
    cle: np.ndarray,
    pse_lumen: np.ndarray,
    sigma: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (uint8: 0 outside lung, 1 normal, 2 centrilobular, 3 paraseptal, 4 panlobular) and the lung mask
    (1 right, 2 left, airway lumen excluded).

    Lesion voxels are those mostly destroyed as the scanner sees them (the lucency's share of the voxel's slab,
    through the same point spread ``sigma``), so thick slices do not label mostly intact tissue.
    """
    lung_mask = np.where(airway_lumen >= 0.5, 0, lungs).astype(np.uint8)
    in_lung = lung_mask > 0
    label = in_lung.astype(np.uint8)
    label[ple & in_lung] = 4
    label[(ndi.gaussian_filter(cle, sigma) >= 0.5) & in_lung] = 2
    label[(ndi.gaussian_filter(pse_lumen, sigma) >= 0.5) & in_lung] = 3
    return label, lung_mask
