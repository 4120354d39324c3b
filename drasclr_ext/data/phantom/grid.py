"""The voxel grid of a phantom and the random fields and painting it is drawn with.

Arrays are (X, Y, Z) in DICOM (LPS) index order: index x grows toward the patient's left, y toward posterior, z toward
the head, so the RAS affine is ``diag(-sx, -sy, sz)`` plus an origin. Coordinates are mm in the *body frame* (x to
the patient's left, y posterior, z up from the lowest point of the lungs).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi


def diag_affine(spacing: tuple[float, float, float], origin_world: np.ndarray) -> np.ndarray:
    """RAS affine of an LPS-ordered grid with the given spacing and the RAS world position of voxel (0, 0, 0)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin_world
    return affine


class Grid:
    """Voxel grid of a phantom: body-frame coordinates (mm) of the voxel centres along each axis."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], body_centre_index: np.ndarray, z0: float):
        self.shape = tuple(int(v) for v in shape)
        self.spacing = np.asarray(spacing, dtype=float)
        self.origin = np.array([-body_centre_index[0] * spacing[0], -body_centre_index[1] * spacing[1], z0])
        self.axes = [self.origin[d] + self.spacing[d] * np.arange(self.shape[d]) for d in range(3)]

    def coords(self, dtype=np.float32):
        x, y, z = (a.astype(dtype) for a in self.axes)
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        return (points_mm - self.origin) / self.spacing

    def to_mm(self, index: np.ndarray) -> np.ndarray:
        return self.origin + index * self.spacing

    def affine(self) -> np.ndarray:
        # body frame (L, P, S) -> RAS world
        return diag_affine(tuple(self.spacing), np.array([-self.origin[0], -self.origin[1], self.origin[2]]))


def paint_capsules(
    volume: np.ndarray, grid: Grid, p0: np.ndarray, p1: np.ndarray, radius: np.ndarray, pv_width: float | None = None
) -> None:
    """Paint the partial-volume fraction of capsules (segments p0-p1 in mm with radius in mm) into ``volume`` (max).

    The fraction of each voxel's slab inside a capsule: slices thicker than the in-plane spacing are sampled at
    several heights (one per in-plane spacing) and averaged, so a 1.5 mm lucency in a 5 mm slice fills about a third
    of its voxels, not all of them. Loops over capsules (not voxels); each capsule touches only its bounding box.
    """
    sp = grid.spacing
    n_sub = max(1, int(round(sp[2] / min(sp[0], sp[1]))))
    h = float(pv_width if pv_width is not None else np.cbrt(np.prod(sp) / n_sub))
    heights = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * sp[2]
    lo_all = np.floor(grid.to_index(np.minimum(p0, p1) - radius[:, None] - h) - 0.5).astype(int)
    hi_all = np.ceil(grid.to_index(np.maximum(p0, p1) + radius[:, None] + h) + 0.5).astype(int) + 1
    lo_all = np.maximum(lo_all, 0)
    hi_all = np.minimum(hi_all, np.array(volume.shape))
    for a, b, r, lo, hi in zip(p0, p1, radius, lo_all, hi_all):
        if np.any(hi <= lo):
            continue
        x = (grid.origin[0] + sp[0] * np.arange(lo[0], hi[0]) - a[0])[:, None, None]
        y = (grid.origin[1] + sp[1] * np.arange(lo[1], hi[1]) - a[1])[None, :, None]
        d = b - a
        dd = float(d @ d)
        frac = np.zeros((hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]), dtype=np.float32)
        for dz in heights:
            z = (grid.origin[2] + sp[2] * np.arange(lo[2], hi[2]) + dz - a[2])[None, None, :]
            if dd > 0:
                t = np.clip((x * d[0] + y * d[1] + z * d[2]) / dd, 0.0, 1.0)
                dist2 = (x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2
            else:
                dist2 = x**2 + y**2 + z**2
            frac += np.clip((r - np.sqrt(dist2)) / h + 0.5, 0.0, 1.0).astype(np.float32)
        if n_sub > 1:
            frac /= n_sub
        view = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(view, frac.astype(volume.dtype, copy=False), out=view)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], corr_mm: float):
    """Unit-variance Gaussian random field with correlation length ``corr_mm`` (coarse noise, linearly upsampled)."""
    coarse = [max(2, int(np.ceil(shape[d] * spacing[d] / corr_mm)) + 2) for d in range(3)]
    noise = ndi.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.8, mode="wrap")
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    zoom = [(shape[d] + 2 * shape[d] / (coarse[d] - 2)) / coarse[d] for d in range(3)]
    up = ndi.zoom(noise, zoom, order=1, grid_mode=False)
    o = [(up.shape[d] - shape[d]) // 2 for d in range(3)]
    up = up[o[0] : o[0] + shape[0], o[1] : o[1] + shape[1], o[2] : o[2] + shape[2]]
    if up.shape != tuple(shape):  # rounding of zoom: pad by edge values
        up = np.pad(up, [(0, max(0, shape[d] - up.shape[d])) for d in range(3)], mode="edge")
        up = up[: shape[0], : shape[1], : shape[2]]
    return np.ascontiguousarray(up, dtype=np.float32)


def coarse_noise(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, corr_mm: float):
    """Smooth coarse noise and the factor mapping fine voxel indices to its indices (for point look-ups)."""
    coarse = [max(2, int(np.ceil(shape[d] * spacing[d] / corr_mm)) + 1) for d in range(3)]
    noise = ndi.gaussian_filter(rng.standard_normal(coarse), 0.8, mode="wrap")
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    return noise, spacing / corr_mm


def noise_at(noise_and_factor, index: np.ndarray) -> np.ndarray:
    noise, factor = noise_and_factor
    return ndi.map_coordinates(noise, (index * factor).T, order=1, mode="nearest")


def sample_points(rng: np.random.Generator, mask: np.ndarray, grid: Grid, n: int) -> np.ndarray:
    """``n`` random points (mm, jittered within their voxel) inside ``mask``."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return np.zeros((0, 3))
    pick = rng.choice(idx, size=min(n, len(idx)), replace=False)
    ijk = np.stack(np.unravel_index(pick, mask.shape), axis=1).astype(float)
    ijk += rng.uniform(-0.5, 0.5, ijk.shape)
    return grid.to_mm(ijk)


def relative_height(lung: np.ndarray, grid: Grid) -> np.ndarray:
    """Per voxel, height within its own lung: 0 at the lung's lowest slice, 1 at its highest (0 outside)."""
    h = np.zeros(lung.shape, dtype=np.float32)
    for label in (1, 2):
        zs = np.flatnonzero((lung == label).any(axis=(0, 1)))
        if len(zs) == 0:
            continue
        rel = np.clip((np.arange(lung.shape[2]) - zs[0]) / max(zs[-1] - zs[0], 1), 0, 1).astype(np.float32)
        h = np.where(lung == label, rel[None, None, :], h)
    return h


def depth_mm(lung: np.ndarray, spacing: np.ndarray, target_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) to the pleura on a coarse grid (~3 mm) and that grid's subsampling factors."""
    step = np.maximum(1, np.round(target_mm / spacing)).astype(int)
    coarse = lung[:: step[0], :: step[1], :: step[2]] > 0
    return ndi.distance_transform_edt(coarse, sampling=spacing * step).astype(np.float32), step


def lookup(coarse: np.ndarray, step: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Values of a coarse grid at fine voxel indices (nearest)."""
    c = np.clip(np.round(index / step).astype(int), 0, np.array(coarse.shape) - 1)
    return coarse[c[:, 0], c[:, 1], c[:, 2]]
