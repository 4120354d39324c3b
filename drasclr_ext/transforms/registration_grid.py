"""Lung masks on the registration grid: block-averaged lung fractions, the Dice of a warped subject mask against
the atlas, and the ``"moments"`` registration (centroids and spreads, no ITK)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from drasclr_ext.errors import RegistrationError
from drasclr_ext.geometry import apply_affine, memory_layout, voxel_spacing

__all__ = ["block_average", "dice_in_atlas_space", "moment_match"]


def _block_sums(mask: np.ndarray, shape: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """uint16 sums of a C-ordered boolean (X, Y, Z) array over blocks of ``factors``, ``shape`` blocks per axis."""
    fx, fy, fz = factors
    # sum over blocks one axis at a time: keeps the temporaries small
    out = mask.reshape(shape[0], fx, -1).sum(1, dtype=np.uint16)
    out = out.reshape(shape[0], shape[1], fy, shape[2] * fz).sum(2, dtype=np.uint16)
    return out.reshape(shape[0], shape[1], shape[2], fz).sum(3, dtype=np.uint16)


def block_average(mask: np.ndarray, affine: np.ndarray, grid_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Lung fraction of ``mask`` on a coarser grid of about ``grid_mm`` (integer block factors per axis).

    Returns the float32 fraction image and its affine (voxel centres at the blocks' centres).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(affine)
    factors = np.maximum(1, np.round(grid_mm / spacing)).astype(int)
    shape = np.array(mask.shape) // factors
    if np.any(shape < 1):
        raise RegistrationError(f"lung mask of shape {mask.shape} is too small to register; check the scan")
    cropped = np.asarray(mask[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]) > 0
    if memory_layout(cropped) == "F":  # NIfTI order: sum the C-ordered transpose
        out = _block_sums(cropped.T, shape[::-1], factors[::-1]).T
    else:
        out = _block_sums(np.ascontiguousarray(cropped), shape, factors)
    fraction = out.astype(np.float32) / float(np.prod(factors))
    grid_affine = affine.copy()
    grid_affine[:3, :3] = affine[:3, :3] * factors
    grid_affine[:3, 3] = apply_affine(affine, (factors - 1) / 2.0)
    return fraction, grid_affine


def dice_in_atlas_space(
    subject_mask: np.ndarray,
    subject_affine: np.ndarray,
    atlas_fraction: np.ndarray,
    atlas_grid_affine: np.ndarray,
    atlas_to_subject: np.ndarray,
) -> float:
    """Dice of the subject mask warped onto the atlas grid (nearest neighbour) vs the atlas mask (fraction >= 0.5)."""
    atlas_lung = atlas_fraction >= 0.5
    grid_to_subject_voxel = np.linalg.inv(subject_affine) @ atlas_to_subject @ atlas_grid_affine
    warped = ndimage.affine_transform(
        (np.asarray(subject_mask) > 0).astype(np.uint8),
        grid_to_subject_voxel[:3, :3],
        offset=grid_to_subject_voxel[:3, 3],
        output_shape=atlas_fraction.shape,
        order=0,
        mode="constant",
        cval=0,
    ).astype(bool)
    total = atlas_lung.sum() + warped.sum()
    return float(2.0 * np.logical_and(atlas_lung, warped).sum() / total) if total else 0.0


def _moments(fraction: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and standard deviation along each world axis (mm) of a lung-fraction map."""
    idx = np.argwhere(fraction > 0)
    if not len(idx):
        raise RegistrationError("the lung mask is empty on the registration grid; check the lung mask")
    points = apply_affine(affine, idx)
    weight = fraction[tuple(idx.T)].astype(np.float64)
    centre = np.average(points, axis=0, weights=weight)
    spread = np.sqrt(np.average((points - centre) ** 2, axis=0, weights=weight))
    return centre, spread


def moment_match(
    fixed_array: np.ndarray, fixed_affine: np.ndarray, moving_array: np.ndarray, moving_affine: np.ndarray
) -> tuple[np.ndarray, float, int, str]:
    """Atlas (fixed) -> subject (moving) affine matching centroids and per-axis spreads (RAS world)."""
    fixed_centre, fixed_spread = _moments(fixed_array, fixed_affine)
    moving_centre, moving_spread = _moments(moving_array, moving_affine)
    scale = moving_spread / np.maximum(fixed_spread, 1e-6)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = moving_centre - scale * fixed_centre
    return matrix, float("nan"), 0, "moments"
