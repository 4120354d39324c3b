"""Noise harmonisation before the dense model: scans noisier than the model's training data are smoothed in-plane
until the noise in their lung parenchyma matches a reference level.

- :func:`lung_noise_hu` estimates the noise of a CT from the image itself (a NIfTI has no kernel tag): the robust
  standard deviation of the in-plane high-pass residual over parenchyma voxels of sampled slices.
- :func:`harmonise_noise` finds the in-plane Gaussian that brings that estimate down to ``target_noise_hu``
  (bisection on the sampled slices) and applies it over the lungs' bounding box (the part the model sees); scans
  at or below the target are unchanged.
- :class:`HarmoniseNoised` does this in a transform chain, keeping the raw image under ``raw_key`` so that the
  report's densitometry can be given both raw and harmonised.
- :class:`NoiseProbe`, :func:`sample_slices`, :func:`slices_last`, :func:`sigma_for_noise` and :func:`lung_box` are
  the building blocks, shared with the kernel harmonisation of the densitometry
  (:mod:`drasclr_ext.metrics.kernel_harmonise`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from drasclr_ext.geometry import array_and_affine, axis_towards, mask_bounding_box, voxel_spacing

__all__ = [
    "HarmoniseNoised",
    "NoiseProbe",
    "harmonise_noise",
    "lung_box",
    "lung_noise_hu",
    "sample_slices",
    "sigma_for_noise",
    "slices_last",
]

PARENCHYMA_HU = (-950.0, -700.0)  # smoothed HU of lung parenchyma (no vessels, no lucencies)
_WHITE_NOISE_GAIN = np.sqrt(8.0 / 9.0)  # residual of a 3x3 mean filter keeps this share of white noise


def sample_slices(lung: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` slices (last axis) spread over the central 60 % of the lungs' height."""
    z = np.flatnonzero(lung.any(axis=(0, 1)))
    if len(z) == 0:
        return z
    return np.unique(z[np.linspace(0.2 * (len(z) - 1), 0.8 * (len(z) - 1), n).round().astype(int)])


def slices_last(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Views of the arrays with the axial slice axis (the one closest to the world's head-foot axis) last, the
    affine with its columns in that order, and that axis."""
    affine = np.asarray(affine, np.float64)
    axis, _ = axis_towards(affine, 2)
    order = [a for a in range(3) if a != axis] + [axis]
    permuted = affine.copy()
    permuted[:3, :3] = affine[:3, order]
    return np.moveaxis(hu, axis, -1), np.moveaxis(lung, axis, -1), permuted, axis


def lung_box(lung: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The lungs' bounding box grown by ``margin`` voxels in-plane (whole slices along the last axis)."""
    lo, hi = mask_bounding_box(lung)  # the caller has found parenchyma, so the lungs are there
    grow = np.array([margin, margin, 0])
    return tuple(slice(int(a), int(b)) for a, b in zip(np.maximum(lo - grow, 0), hi + grow))


def _parenchyma(hu: np.ndarray, lung: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Voxels of one slice inside the eroded lung whose smoothed HU is that of parenchyma."""
    inside = ndimage.binary_erosion(lung > 0, iterations=3)
    background = ndimage.gaussian_filter(hu.astype(np.float32), 2.0 / spacing[:2])
    return inside & (background > PARENCHYMA_HU[0]) & (background < PARENCHYMA_HU[1])


def _robust_std(values: np.ndarray) -> float:
    if values.size < 100:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))) / _WHITE_NOISE_GAIN)


class NoiseProbe:
    """The sampled slices of a scan and their parenchyma voxels, to estimate the noise after any in-plane
    smoothing without recomputing the selection."""

    def __init__(self, hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, slices: int = 12) -> None:
        spacing = voxel_spacing(affine)
        self.pixel_mm = float(np.mean(spacing[:2]))
        index = sample_slices(lung, slices)
        self.images = [np.asarray(hu[:, :, k], np.float32) for k in index]
        self.masks = [_parenchyma(image, lung[:, :, k], spacing) for image, k in zip(self.images, index)]

    def crop(self, margin: int) -> NoiseProbe:
        """Cut each sampled slice to its parenchyma's bounding box plus ``margin`` pixels (in place): the same
        estimates, bit for bit, for Gaussians that reach at most ``margin - 2`` pixels, and several times faster."""
        for i, (image, mask) in enumerate(zip(self.images, self.masks)):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size == 0:
                continue
            box = (
                slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
                slice(max(cols[0] - margin, 0), cols[-1] + margin + 1),
            )
            self.images[i], self.masks[i] = image[box], mask[box]
        return self

    def noise(self, sigma_px: float = 0.0) -> float:
        residuals = []
        for image, mask in zip(self.images, self.masks):
            if sigma_px > 0:
                image = ndimage.gaussian_filter(image, sigma_px)
            residuals.append((image - ndimage.uniform_filter(image, 3))[mask])
        return _robust_std(np.concatenate(residuals)) if residuals else float("nan")


def sigma_for_noise(probe: NoiseProbe, target_noise_hu: float, max_sigma_px: float) -> float:
    """The in-plane Gaussian sigma (pixels, to 0.02) that brings the probe's noise down to ``target_noise_hu``, by
    bisection; ``max_sigma_px`` when even that leaves it above."""
    lo, hi = 0.0, max_sigma_px
    if probe.noise(hi) > target_noise_hu:
        lo = hi  # cannot reach the target within the limit: use the most smoothing allowed
    while hi - lo > 0.02:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if probe.noise(mid) > target_noise_hu else (lo, mid)
    return hi


def lung_noise_hu(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, slices: int = 12) -> float:
    """Noise standard deviation (HU) in the lung parenchyma of a (X, Y, Z) CT, estimated on ``slices`` axial
    slices; ``nan`` when the lung has too few parenchyma voxels."""
    hu, lung, affine, _ = slices_last(hu, lung, affine)
    return NoiseProbe(hu, lung, affine, slices).noise()


def harmonise_noise(
    hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, target_noise_hu: float = 30.0, max_sigma_mm: float = 1.5
) -> tuple[np.ndarray, dict[str, Any]]:
    """``hu`` smoothed in-plane so that :func:`lung_noise_hu` comes down to ``target_noise_hu`` (at most a Gaussian of
    ``max_sigma_mm``), and what was done: ``noise_hu`` before and after, ``sigma_mm``, ``applied``."""
    raw = hu
    hu, lung, affine, axis = slices_last(hu, lung, affine)
    probe = NoiseProbe(hu, lung, affine)
    noise = probe.noise()
    info: dict[str, Any] = {"target_noise_hu": float(target_noise_hu), "noise_hu": noise, "sigma_mm": 0.0}
    if not noise > target_noise_hu:  # quiet enough, or unknown (nan): unchanged
        return raw, {**info, "noise_hu_after": noise, "applied": False}
    probe.crop(int(4 * max_sigma_mm / probe.pixel_mm + 0.5) + 2)  # a Gaussian's reach: 4 sigma (scipy's truncate)
    hi = sigma_for_noise(probe, target_noise_hu, max_sigma_mm / probe.pixel_mm)
    smoothed = np.array(hu, dtype=np.float32)
    box = lung_box(lung, margin=int(np.ceil(4 * hi)) + 8)  # the model sees the lungs: smooth only around them
    smoothed[box] = ndimage.gaussian_filter(smoothed[box], (hi, hi, 0.0))
    info.update(sigma_mm=round(hi * probe.pixel_mm, 3), noise_hu_after=probe.noise(hi), applied=True)
    return np.moveaxis(smoothed, -1, axis), info


class HarmoniseNoised(MapTransform):
    """Smooth ``d[key]`` (a channel-first CT MetaTensor) in-plane to ``target_noise_hu`` with :func:`harmonise_noise`,
    using the lung mask ``d[mask_key]``; the raw image goes to ``d[raw_key]`` and what was done to ``d[info_key]``.
    ``enabled=False`` only records the noise estimate."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "lung_mask",
        raw_key: str = "image_raw",
        info_key: str = "harmonisation",
        target_noise_hu: float = 30.0,
        max_sigma_mm: float = 1.5,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.raw_key, self.info_key = mask_key, raw_key, info_key
        self.target_noise_hu, self.max_sigma_mm, self.enabled = float(target_noise_hu), float(max_sigma_mm), enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            hu, affine = array_and_affine(d[key])
            lung, _ = array_and_affine(d[self.mask_key], affine, "lung mask")
            if not self.enabled:
                noise = lung_noise_hu(hu, lung, affine)
                d[self.info_key] = {"target_noise_hu": None, "noise_hu": noise, "sigma_mm": 0.0, "applied": False}
                continue
            smoothed, info = harmonise_noise(hu, lung, affine, self.target_noise_hu, self.max_sigma_mm)
            d[self.info_key] = info
            if info["applied"]:
                d[self.raw_key] = d[key]
                image = d[key]
                out = np.asarray(smoothed, np.float32).reshape(tuple(image.shape))
                d[key] = MetaTensor(out, meta=dict(image.meta)) if isinstance(image, MetaTensor) else out
        return d
