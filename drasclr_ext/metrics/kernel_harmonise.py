"""Kernel harmonisation of the densitometry: LAA-950 and Perc15 as a soft reference kernel would give them.

A sharp reconstruction kernel (Siemens B70f, GE LUNG/BONE, Philips L/Y*) enhances edges and multiplies the noise,
so the same lungs read several points more LAA-950 and a lower Perc15 than with a soft kernel (B30f/B40f, GE
STANDARD, Philips B). A NIfTI carries no kernel tag, so everything here is measured on the image itself:

1. **Sharpness** (:func:`edge_mtf`): the edge spread function of the costal pleura, where the lung (about -850 HU)
   meets the chest wall (about 0 HU), averaged over a few thousand profiles along the edge normal on sampled axial
   slices (lateral surfaces only, edges not oblique to the slice, ribs excluded), each aligned on its own 50 %
   crossing; its derivative's Fourier transform is the in-plane MTF. A soft kernel measures as a Gaussian edge of
   :data:`REFERENCE_EDGE_SIGMA_MM`; the *sharpness index* is the largest ratio of the scan's MTF to that reference
   between 0.1 and 0.35 cycles/mm (soft kernels read 1.0-1.1, edge-enhancing kernels 1.6-3).
2. **Kernel conversion**: a sharp scan is filtered in-plane (FFTs, slice by slice) with
   ``H(f) = min(1, (1 + t) MTF_ref(f) / MTF(f))``, made non-increasing in ``f``: the filter that turns its edge
   into the reference's, the ratio of two kernels' MTFs as in kernel-conversion work. The tolerance ``t`` is
   :data:`REFERENCE_TOLERANCE` when the scan's lung noise is at most 30 HU (a kernel that sharpened the edges
   without multiplying the noise: iterative reconstruction, post-processing, the project's phantoms; a linear
   filter would also remove noise the kernel never added) and falls to 0 at 45 HU (filtered back projection,
   whose noise follows the kernel). Scans between the two :data:`SHARPNESS_GATE` indices get a partial filter;
   softer ones none, so soft scans keep their raw values exactly.
3. **Noise matching**: the converted scan is then smoothed with an in-plane Gaussian until its lung noise
   (:func:`~drasclr_ext.transforms.harmonise.lung_noise_hu`) is at most :data:`KERNEL_NOISE_HU`, the noise of soft
   kernels at usual dose (the edge MTF sees the kernel's mid frequencies better than its highest ones, where a
   sharp kernel's noise lies). A scan that was not converted is smoothed only above :data:`DOSE_NOISE_HU` (low dose).
4. LAA-950 and Perc15 of the result over the lung mask (:func:`harmonised_densitometry`).

The constants were chosen by measurement on kernel pairs (phantoms of the same seed with the smooth and the sharp
kernel; a real CT and its simulated soft and sharp reconstructions): ``scripts/benchmark_kernel_pairs.py`` and
docs/BENCHMARKS.md. This is the densitometry's harmonisation only; the dense model sees the image of
:class:`~drasclr_ext.transforms.harmonise.HarmoniseNoised`, unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.signal.windows import tukey

from drasclr_ext.geometry import axis_towards, voxel_spacing
from drasclr_ext.metrics.emphysema import laa950_of_values, laa950_percent, perc15, perc15_of_values
from drasclr_ext.transforms.harmonise import NoiseProbe, lung_box, sample_slices, sigma_for_noise, slices_last

__all__ = ["dicom_kernel_class", "edge_mtf", "harmonised_densitometry"]

REFERENCE_EDGE_SIGMA_MM = 0.6  # a soft kernel's pleural edge as measured here: a Gaussian of this sigma
REFERENCE_TOLERANCE = 0.05  # the conversion leaves a scan this much above the reference ...
TOLERANCE_NOISE_HU = (30.0, 45.0)  # ... when its raw noise is at most the first, 0 from the second on
SHARPNESS_BAND = (0.1, 0.35)  # cycles/mm over which the sharpness index is taken
SHARPNESS_GATE = (1.25, 1.5)  # index below: no conversion; above: full conversion; between: partial
KERNEL_NOISE_HU = 22.0  # lung noise of a converted scan at most this (soft kernels at usual dose: 19-26 HU)
DOSE_NOISE_HU = 30.0  # lung noise of a scan that was not converted at most this (the dense model's target)
MAX_SIGMA_MM = 3.0  # the noise-matching Gaussian at most this
MIN_EDGES = 200  # fewer usable edge profiles: sharpness unknown, no conversion

_STEP = 0.25  # mm between samples along an edge profile
_T = np.arange(-8.0, 8.0 + 1e-9, _STEP)  # signed distance from the edge (mm), lung side negative
_F = np.arange(0.0, 1.0 + 1e-9, 0.01)  # frequencies (cycles/mm) of the measured MTF


def _gaussian(sigma_mm: float, f: np.ndarray = _F) -> np.ndarray:
    """The MTF of an in-plane Gaussian of ``sigma_mm`` at frequencies ``f`` (cycles/mm)."""
    return np.exp(-2.0 * np.pi**2 * sigma_mm**2 * np.asarray(f) ** 2)


def _reference_mtf(f: np.ndarray = _F) -> np.ndarray:
    return _gaussian(REFERENCE_EDGE_SIGMA_MM, f)


def _edge_profiles(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, slices: int) -> np.ndarray:
    """HU profiles (n, len(_T)) across the costal pleura of sampled axial slices of a slices-last scan."""
    spacing = voxel_spacing(affine)
    lr = axis_towards(affine, 0)[0]
    lr = lr if lr < 2 else 0
    sigma = 1.0 / spacing[:2]
    box = lung_box(lung, margin=int(np.ceil(12.0 / min(spacing[:2]))))[:2]  # the pleura and 12 mm around it
    hu, lung = hu[box], lung[box]
    blurred = {}

    def blur(k: int) -> np.ndarray:
        if k not in blurred:
            blurred[k] = ndimage.gaussian_filter(np.asarray(hu[:, :, k], np.float32), sigma)
        return blurred[k]

    found = []
    for k in sample_slices(lung, slices):
        mask = lung[:, :, k] > 0
        xs, ys = np.nonzero(mask & ~ndimage.binary_erosion(mask))
        if xs.size == 0:
            continue
        smooth = blur(k)
        gx, gy = ndimage.sobel(smooth, 0) / (8 * spacing[0]), ndimage.sobel(smooth, 1) / (8 * spacing[1])
        grad = np.hypot(gx, gy)[xs, ys] + 1e-6
        normal = np.stack([gx[xs, ys], gy[xs, ys]], 1) / grad[:, None]  # towards higher HU: out of the lung
        labels, n = ndimage.label(mask)
        index = np.arange(1, n + 1)
        centres = np.asarray(ndimage.center_of_mass(mask, labels, index), np.float64).reshape(-1, 2)
        middle = np.average(centres[:, lr], weights=np.asarray(ndimage.sum(mask, labels, index), np.float64))
        centre = centres[labels[xs, ys] - 1]
        point = np.stack([xs, ys], 1).astype(np.float64)
        radial = (point - centre) * spacing[:2]
        radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-6
        lateral = np.abs(point[:, lr] - middle) > np.abs(centre[:, lr] - middle)
        keep = lateral & ((normal * radial).sum(1) > 0.7) & (grad > 50.0)
        if hu.shape[2] > 2:  # edges oblique to the slice are blurred by its thickness: leave them out
            k0, k1 = max(k - 1, 0), min(k + 1, hu.shape[2] - 1)
            gz = (blur(k1) - blur(k0))[xs, ys] / ((k1 - k0) * spacing[2])
            keep &= np.abs(gz) < 0.3 * grad
        if not keep.any():
            continue
        px = xs[keep, None] + _T[None, :] * normal[keep, :1] / spacing[0]
        py = ys[keep, None] + _T[None, :] * normal[keep, 1:] / spacing[1]
        image = np.asarray(hu[:, :, k], np.float32)
        found.append(ndimage.map_coordinates(image, [px.ravel(), py.ravel()], order=1).reshape(px.shape))
    return np.concatenate(found) if found else np.zeros((0, _T.size), np.float32)


def _edge_spread(profiles: np.ndarray) -> tuple[np.ndarray, int]:
    """The mean normalised edge spread function of lung-to-soft-tissue profiles, and how many went into it."""
    lung_side = profiles[:, _T <= -4].mean(1)
    wall = profiles[:, _T >= 4].mean(1)
    smooth = ndimage.gaussian_filter1d(profiles, 1.0 / _STEP, axis=1, mode="nearest")
    keep = (lung_side > -950) & (lung_side < -700) & (wall > -250) & (wall < 200)
    keep &= smooth[:, _T > 0].max(1) < 300  # no rib
    step = (wall - lung_side)[keep, None]
    norm = (profiles[keep] - lung_side[keep, None]) / step
    s = (smooth[keep] - lung_side[keep, None]) / step
    # the 50 % crossing nearest the mask's edge, found on the smoothed profile (less jitter from noise)
    cross = (s[:, :-1] < 0.5) & (s[:, 1:] >= 0.5)
    i = np.where(cross, np.abs(_T[:-1]), np.inf).argmin(1)
    rows = np.arange(len(s))
    lo, hi = s[rows, i], s[rows, i + 1]
    t0 = _T[i] + (0.5 - lo) / np.where(hi > lo, hi - lo, 1.0) * _STEP
    good = cross[rows, i] & (np.abs(t0) <= 2.0)
    norm, t0 = norm[good], t0[good]
    if len(norm) == 0:
        return np.full(_T.size, np.nan), 0
    pos = np.clip((_T[None, :] + t0[:, None] - _T[0]) / _STEP, 0, _T.size - 1.000001)
    j = pos.astype(int)
    frac = pos - j
    rows = np.arange(len(norm))[:, None]
    aligned = norm[rows, j] * (1 - frac) + norm[rows, j + 1] * frac
    return aligned.mean(0), len(norm)


def edge_mtf(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, slices: int = 12) -> dict[str, Any]:
    """The in-plane MTF of a (X, Y, Z) CT measured on its costal pleura: ``frequencies`` (cycles/mm), ``mtf``,
    ``edges`` (profiles averaged); ``mtf`` is None below :data:`MIN_EDGES` profiles."""
    hu, lung, affine, _ = slices_last(hu, lung, affine)
    if not np.any(lung):
        return {"frequencies": _F, "mtf": None, "edges": 0}
    esf, edges = _edge_spread(_edge_profiles(hu, lung, affine, slices))
    if edges < MIN_EDGES:
        return {"frequencies": _F, "mtf": None, "edges": int(edges)}
    sel = np.abs(_T) <= 6.0
    lsf = np.gradient(esf[sel], _T[sel]) * tukey(int(sel.sum()), 0.3)
    mtf = np.abs(np.exp(-2j * np.pi * _F[:, None] * _T[sel][None, :]) @ lsf)
    return {"frequencies": _F, "mtf": mtf / mtf[0], "edges": int(edges)}


def _tolerance(noise_hu: float) -> float:
    """:data:`REFERENCE_TOLERANCE` for a scan whose raw lung noise is at most the first of :data:`TOLERANCE_NOISE_HU`
    (its kernel sharpened the edges without multiplying the noise: iterative reconstruction, post-processing, the
    phantoms), 0 from the second on (noise multiplied with the edges: filtered back projection), linear between."""
    lo, hi = TOLERANCE_NOISE_HU
    if not np.isfinite(noise_hu):
        return REFERENCE_TOLERANCE
    return REFERENCE_TOLERANCE * float(np.clip((hi - noise_hu) / (hi - lo), 0.0, 1.0))


def _conversion(mtf: Optional[np.ndarray], tolerance: float = REFERENCE_TOLERANCE) -> tuple[np.ndarray, float, float]:
    """The conversion filter on ``_F``, the sharpness index and the filter's weight (0: identity)."""
    if mtf is None:
        return np.ones_like(_F), float("nan"), 0.0
    reference = _reference_mtf()
    band = (_F >= SHARPNESS_BAND[0]) & (_F <= SHARPNESS_BAND[1])
    index = float(np.max(mtf[band] / reference[band]))
    weight = float(np.clip((index - SHARPNESS_GATE[0]) / (SHARPNESS_GATE[1] - SHARPNESS_GATE[0]), 0.0, 1.0))
    full = np.minimum.accumulate(np.minimum(1.0, (1 + tolerance) * reference / np.maximum(mtf, 0.02)))
    return 1.0 - weight * (1.0 - full), index, weight


def _response_grid(shape: tuple[int, int], spacing: np.ndarray, response: np.ndarray) -> np.ndarray:
    """The radial ``response`` (on ``_F``) sampled on the rfft2 grid of an in-plane ``shape``."""
    fx = np.fft.fftfreq(shape[0], spacing[0])
    fy = np.fft.rfftfreq(shape[1], spacing[1])
    return np.interp(np.hypot(fx[:, None], fy[None, :]), _F, response).astype(np.float32)


def _filter_slices(images: np.ndarray, spacing: np.ndarray, response: np.ndarray) -> np.ndarray:
    """(n, X, Y) slices filtered in-plane with the radial frequency response ``response`` (on ``_F``)."""
    images = np.asarray(images, np.float32)
    h = _response_grid(images.shape[1:], spacing, response)
    return scipy.fft.irfft2(scipy.fft.rfft2(images, axes=(1, 2)) * h, s=images.shape[1:], axes=(1, 2))


def _filtered_lung_values(
    hu: np.ndarray, lung: np.ndarray, spacing: np.ndarray, response: np.ndarray, slab: int = 16
) -> np.ndarray:
    """The lung voxels' HU of a slices-last box filtered in-plane with ``response``, slab by slab (zero-padded to
    fast FFT lengths: the box's margin keeps the wrap-around away from the lung)."""
    size = tuple(scipy.fft.next_fast_len(int(n), real=True) for n in hu.shape[:2])
    h = _response_grid(size, spacing, response)
    values = []
    for k in range(0, hu.shape[2], slab):
        inside = np.moveaxis(lung[:, :, k : k + slab] > 0, 2, 0)
        if not inside.any():
            continue
        images = np.ascontiguousarray(np.moveaxis(hu[:, :, k : k + slab], 2, 0), np.float32)
        spectrum = scipy.fft.rfft2(images, s=size, axes=(1, 2))
        out = scipy.fft.irfft2(spectrum * h, s=size, axes=(1, 2))[:, : hu.shape[0], : hu.shape[1]]
        values.append(out[inside])
    return np.concatenate(values) if values else np.zeros(0, np.float32)


def harmonised_densitometry(
    hu: np.ndarray,
    lung: np.ndarray,
    affine: np.ndarray,
    raw: Optional[Mapping[str, float]] = None,
    dicom_kernel: Optional[str] = None,
) -> dict[str, Any]:
    """LAA-950 and Perc15 of a (X, Y, Z) CT harmonised to the soft reference kernel, and what was measured and done:
    ``noise_hu``, ``edge_mtf`` (at 0.1-0.5 cycles/mm), ``edges``, ``sharpness_index``, ``kernel_class``
    (``soft``, ``intermediate``, ``sharp`` or ``unknown``) and ``kernel_class_source`` (``image`` or ``dicom``),
    ``conversion_weight`` (0: no conversion), ``reference_edge_sigma_mm``, ``conversion_tolerance``,
    ``noise_target_hu``, ``sigma_mm`` (the noise-matching Gaussian), ``noise_hu_after``, ``applied`` (False: the
    raw values are returned). ``raw``: the scan's own
    ``laa950_percent`` and ``perc15_hu`` when already measured (returned as they are when nothing is done).
    ``dicom_kernel``: the DICOM ConvolutionKernel; used only when the image shows too few pleural edges to measure
    its sharpness (a sharp name then sets the converted scans' noise target, ``kernel_class_source`` ``dicom``)."""
    raw_hu, raw_lung = hu, lung
    hu, lung, affine, _ = slices_last(hu, lung, affine)
    spacing = voxel_spacing(affine)
    measured = edge_mtf(hu, lung, affine)
    probe = NoiseProbe(hu, lung, affine)
    probe.crop(int(4 * MAX_SIGMA_MM / probe.pixel_mm + 0.5) + 12)  # a Gaussian's reach, and room for the conversion
    noise = probe.noise()
    tolerance = _tolerance(noise)
    response, index, weight = _conversion(measured["mtf"], tolerance)
    if weight > 0 and probe.images:
        probe.images = [_filter_slices(image[None], spacing, response)[0] for image in probe.images]
    source = "image"
    if measured["mtf"] is None and dicom_kernel_class(dicom_kernel) in ("sharp", "soft"):
        source = "dicom"
    noise_weight = float(dicom_kernel_class(dicom_kernel) == "sharp") if source == "dicom" else weight
    target = DOSE_NOISE_HU - noise_weight * (DOSE_NOISE_HU - KERNEL_NOISE_HU)
    sigma_px = 0.0
    if probe.noise() > target:
        sigma_px = sigma_for_noise(probe, target, MAX_SIGMA_MM / probe.pixel_mm)
    kind = ("soft", "intermediate", "sharp")[(weight > 0) + (weight >= 1)]
    if source == "dicom":
        kind = str(dicom_kernel_class(dicom_kernel))
    elif measured["mtf"] is None:
        kind = "unknown"
    info: dict[str, Any] = {
        "noise_hu": noise,
        "edges": measured["edges"],
        "edge_mtf": None
        if measured["mtf"] is None
        else {f"{f:.1f}": round(float(np.interp(f, _F, measured["mtf"])), 3) for f in (0.1, 0.2, 0.3, 0.4, 0.5)},
        "sharpness_index": None if np.isnan(index) else round(index, 3),
        "kernel_class": kind,
        "kernel_class_source": source,
        "conversion_weight": round(weight, 3),
        "reference_edge_sigma_mm": REFERENCE_EDGE_SIGMA_MM,
        "conversion_tolerance": round(tolerance, 4),
        "noise_target_hu": round(float(target), 2),
        "sigma_mm": round(sigma_px * probe.pixel_mm, 3),
        "noise_hu_after": probe.noise(sigma_px),
        "applied": bool(weight > 0 or sigma_px > 0),
    }
    if not info["applied"]:
        if raw is None:
            raw = {"laa950_percent": laa950_percent(raw_hu, raw_lung), "perc15_hu": perc15(raw_hu, raw_lung)}
        return {**info, "laa950_percent": float(raw["laa950_percent"]), "perc15_hu": float(raw["perc15_hu"])}
    box = lung_box(lung, margin=int(np.ceil(12.0 / probe.pixel_mm + 4 * sigma_px)))
    if weight > 0:  # the conversion and the noise-matching Gaussian as one frequency response
        sigma_mm = sigma_px * probe.pixel_mm
        values = _filtered_lung_values(hu[box], lung[box], spacing, response * _gaussian(sigma_mm))
    else:
        smoothed = ndimage.gaussian_filter(np.asarray(hu[box], np.float32), (sigma_px, sigma_px, 0.0))
        values = smoothed[lung[box] > 0]
    return {**info, "laa950_percent": laa950_of_values(values), "perc15_hu": perc15_of_values(values)}


# vendor naming of reconstruction kernels (DICOM ConvolutionKernel, 0018,1210)
_SHARP_NAMES = {"LUNG", "BONE", "BONEPLUS", "EDGE", "CHEST", "L", "D", "E", "LUNG ENHANCED"}
_SOFT_NAMES = {"STANDARD", "SOFT", "SMOOTH", "DETAIL", "A", "B", "C", "STND"}


def dicom_kernel_class(name: Optional[str]) -> Optional[str]:
    """``sharp``, ``soft`` or ``unknown`` from a DICOM ConvolutionKernel by the vendors' naming (Siemens B/I/Br/Bl
    with a number, 50 and over sharp; GE LUNG/BONE/EDGE vs STANDARD/SOFT/DETAIL; Philips L, D, E and Y* vs A/B/C;
    Canon FC50-FC89 sharp, FC01-FC49 soft); None without a name."""
    text = str(name or "").strip().upper()
    if not text:
        return None
    tokens = [token for token in re.split(r"[\\,\[\]'\s]+", text) if token]
    if not tokens:
        return "unknown"
    first = tokens[0]
    if first in _SHARP_NAMES or re.fullmatch(r"Y[A-F]", first):
        return "sharp"
    if first in _SOFT_NAMES:
        return "soft"
    siemens = re.fullmatch(r"(?:B|I|BR|BL|BV|QR|HR|BF)(\d{2})[A-Z]?", first)
    canon = re.fullmatch(r"FC(\d{2})", first)
    number = siemens or canon
    if number:
        return "sharp" if int(number.group(1)) >= 50 else "soft"
    return "unknown"
