"""The noise of a host scan's lung: measured (:func:`lung_noise`) and synthesised alike (:func:`noise_field`) for the
voxels whose HU a lesion replaced."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from drasclr_ext.data.lesion_geometry import ScanGeometry

__all__ = ["lung_noise", "noise_field"]


def _high_pass(x: np.ndarray, slice_axis: int) -> np.ndarray:
    sigma = [2.0, 2.0, 2.0]
    sigma[slice_axis] = 0.0
    return x - ndi.gaussian_filter(x, sigma)


def _lag1(r: np.ndarray, valid: np.ndarray, axes: list[int]) -> float:
    """Mean correlation of ``r`` between neighbours along ``axes`` where both are valid."""
    rhos = []
    for a in axes:
        n = r.shape[a]
        first = [slice(None)] * r.ndim
        second = [slice(None)] * r.ndim
        first[a], second[a] = slice(0, n - 1), slice(1, n)
        both = valid[tuple(first)] & valid[tuple(second)]
        if np.count_nonzero(both) > 10:
            rhos.append(float(np.corrcoef(r[tuple(first)][both], r[tuple(second)][both])[0, 1]))
    return float(np.mean(rhos)) if rhos else 0.0


def lung_noise(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """Noise standard deviation (HU) and in-plane correlation width (Gaussian sigma, voxels) of the scan's lung.

    Measured on the in-plane high-pass residual of vessel-free parenchyma (-950..-700 HU, nothing above -600 HU
    within two voxels), then matched by filtered white noise through the same high-pass (same residual standard
    deviation and neighbour correlation). Falls back to (25 HU, 0.7) when the lung holds too little parenchyma.
    """
    geo = ScanGeometry(affine, hu.shape)
    nz = np.argwhere(lung > 0)
    if len(nz) == 0:
        return 25.0, 0.7
    box = tuple(slice(a, b) for a, b in zip(nz.min(0), nz.max(0) + 1))
    h = np.asarray(hu[box], dtype=np.float32)
    size = [5, 5, 5]
    size[geo.slice_axis] = 1
    clean = (h > -950) & (h < -700) & (ndi.maximum_filter(h, size) < -600)
    clean &= ndi.minimum_filter((lung[box] > 0).astype(np.uint8), size) > 0
    if np.count_nonzero(clean) < 1000:
        return 25.0, 0.7
    in_plane = [a for a in range(3) if a != geo.slice_axis]
    r = _high_pass(h, geo.slice_axis)
    sigma_r = 1.4826 * float(np.median(np.abs(r[clean] - np.median(r[clean]))))
    rho = _lag1(r, clean, in_plane)
    rng = np.random.default_rng(0)
    white = rng.standard_normal((256, 256, 1)).astype(np.float32)
    best = (np.inf, 0.0, 1.0)
    for width in np.arange(0.0, 2.01, 0.1):
        n = ndi.gaussian_filter(white, (width, width, 0.0)) if width > 0 else white
        n = n / n.std()
        rs = _high_pass(n, 2)
        err = abs(_lag1(rs, np.ones(rs.shape, bool), [0, 1]) - rho)
        if err < best[0]:
            best = (err, float(width), float(rs.std()))
    return sigma_r / best[2], best[1]


def noise_field(rng: np.random.Generator, shape: tuple[int, ...], slice_axis: int, width: float) -> np.ndarray:
    """Unit-variance Gaussian noise correlated in-plane (Gaussian sigma ``width`` voxels), independent per slice."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if width > 0:
        sigma = [width, width, width]
        sigma[slice_axis] = 0.0
        n = ndi.gaussian_filter(n, sigma)
    return n / np.float32(n.std() + 1e-6)
