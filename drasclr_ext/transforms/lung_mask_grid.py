"""The grids of the lung mask: the scan in one canonical axis order (from its affine), and the coarse working grid
(block means of about 2.5 mm) with the labels brought back to the input grid, boundary voxels re-thresholded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from drasclr_ext.geometry import memory_layout, voxel_spacing
from drasclr_ext.transforms.lung_labels import LEFT_LUNG, RIGHT_LUNG

__all__ = [
    "CANONICAL_AXES",
    "CoarseGrid",
    "block_mean",
    "canonical_orientation",
    "coarse_grid",
    "from_canonical",
    "full_resolution_labels",
    "to_canonical",
    "upsample_labels",
]

CANONICAL_AXES = ("L", "P", "S")  # array axis order the pipeline works in: an axial DICOM series as read


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform (flips and axis permutation, no resampling) from a scan's array order to
    ``CANONICAL_AXES``, from its affine."""
    import nibabel as nib

    current = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(CANONICAL_AXES))


def to_canonical(hu: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scan turned by ``ornt`` (:func:`canonical_orientation`) in its own memory order, and its affine."""
    import nibabel as nib

    work = nib.orientations.apply_orientation(hu, ornt)
    if not (work.flags.c_contiguous or work.flags.f_contiguous):
        work = np.asfortranarray(work) if memory_layout(hu) == "F" else np.ascontiguousarray(work)
    return work, affine @ nib.orientations.inv_ornt_aff(ornt, hu.shape)


def from_canonical(arrays: tuple[np.ndarray, ...], affine: np.ndarray, layout: str) -> tuple[np.ndarray, ...]:
    """Arrays in the canonical axis order turned back to the order of the scan with ``affine``, in memory order
    ``layout``."""
    import nibabel as nib

    canonical = nib.orientations.axcodes2ornt(CANONICAL_AXES)
    back = nib.orientations.ornt_transform(canonical, nib.orientations.io_orientation(affine))
    order = np.asfortranarray if layout == "F" else np.ascontiguousarray
    return tuple(order(nib.orientations.apply_orientation(a, back)) for a in arrays)


def block_mean(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of ``factors`` voxels (partial blocks at the far edges averaged over what exists)."""
    if factors == (1, 1, 1):
        return np.asarray(hu, dtype=np.float32)
    arr = np.asarray(hu, dtype=np.float32)
    fortran = memory_layout(arr) == "F"  # NIfTI/ITK arrays: pool the C-ordered view
    x = torch.from_numpy(arr.T if fortran else np.ascontiguousarray(arr))[None, None]
    kernel = tuple(reversed(factors)) if fortran else factors
    with torch.no_grad():
        y = torch.nn.functional.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)[0, 0].numpy()
    return np.ascontiguousarray(y.T) if fortran else y


def upsample_labels(
    labels: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...], layout: str = "C"
) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse grid made by ``block_mean`` back to ``shape``, in the memory
    order ``layout`` ("F": that of NIfTI and ITK volumes, built as the transpose of a C-ordered upsampling)."""
    if layout == "F":
        return upsample_labels(labels.T, factors[::-1], tuple(shape)[::-1]).T  # type: ignore[arg-type]
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = out.repeat(f, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


@dataclass(frozen=True)
class CoarseGrid:
    """The working grid: block factors per axis, block-mean HU, its affine, spacing (mm) and voxel volume (ml)."""

    factors: tuple[int, int, int]
    hu: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    voxel_ml: float


def coarse_grid(hu: np.ndarray, affine: np.ndarray, target_spacing: float) -> CoarseGrid:
    """Blocks of whole voxels about ``target_spacing`` mm wide, voxel centres at the blocks' centres."""
    spacing = voxel_spacing(affine)
    factors = tuple(max(1, int(round(target_spacing / s))) for s in spacing)
    hu_c = block_mean(hu, factors)  # type: ignore[arg-type]
    scale = np.diag([*factors, 1.0]).astype(np.float64)
    scale[:3, 3] = (np.asarray(factors) - 1) / 2.0
    spacing_c = spacing * np.asarray(factors)
    return CoarseGrid(factors, hu_c, affine @ scale, spacing_c, float(np.prod(spacing_c)) / 1000.0)  # type: ignore[arg-type]


def full_resolution_labels(
    labels_c: np.ndarray, excluded: np.ndarray, factors: tuple[int, int, int], hu: np.ndarray, threshold: float
) -> np.ndarray:
    """Labels on the input grid of ``hu``: the interior from the coarse grid, the boundary band (less ``excluded``
    coarse voxels: airways, outside air) re-thresholded at ``threshold`` HU, in the input's memory order."""
    cross = ndimage.generate_binary_structure(3, 1)
    near_right = ndimage.binary_dilation(labels_c == RIGHT_LUNG, structure=cross)
    near_left = ndimage.binary_dilation(labels_c == LEFT_LUNG, structure=cross)
    inner = ndimage.binary_erosion(labels_c > 0, structure=cross, border_value=1)
    band = (near_right | near_left) & ~inner & ~excluded
    nearest = np.where(labels_c > 0, labels_c, np.where(near_right, RIGHT_LUNG, LEFT_LUNG)).astype(np.uint8)
    code = np.where(band, nearest + 3, labels_c).astype(np.uint8)  # 4, 5: band voxels near the right, left lung
    layout = memory_layout(hu)  # the input's memory order
    full = upsample_labels(code, factors, hu.shape, layout)  # type: ignore[arg-type]
    # flat views in memory order: boolean indexing of Fortran-ordered arrays is ten times slower
    flat = full.ravel(layout)
    band = np.flatnonzero(flat > 3)
    flat[band] = np.where(hu.ravel(layout)[band] < threshold, flat[band] - 3, 0)
    return full
