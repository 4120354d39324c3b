"""Image geometry, once for the whole package: voxel spacing and directions of an affine, memory order, points
between grids, and the (X, Y, Z) array and 4x4 affine of an image.

Every image here is an (X, Y, Z) array, or a channel-first (1, X, Y, Z) one, with a 4x4 voxel-to-world affine in
RAS millimetres (MONAI's convention). NIfTI and ITK volumes arrive Fortran-ordered; the helpers that care keep
that order instead of copying hundreds of megabytes into C order.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
from scipy import ndimage

from drasclr_ext.errors import InputImageError

__all__ = [
    "affine_of",
    "apply_affine",
    "array_and_affine",
    "axis_towards",
    "grid_to_image",
    "mask_bounding_box",
    "mask_slabs",
    "memory_layout",
    "resample_affine",
    "resample_to_grid",
    "spatial_array",
    "unit_axes",
    "voxel_spacing",
]


def voxel_spacing(affine: Any) -> np.ndarray:
    """Voxel size (mm) along each array axis of a 4x4 affine."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def unit_axes(affine: Any) -> np.ndarray:
    """The 3x3 matrix of unit direction vectors (columns) of an affine's voxel axes."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return linear / np.linalg.norm(linear, axis=0)


def axis_towards(affine: Any, world_axis: int) -> tuple[int, int]:
    """Array axis closest to a world (RAS) axis, and +1/-1: whether increasing the index moves along +world."""
    cosines = unit_axes(affine)
    axis = int(np.argmax(np.abs(cosines[world_axis])))
    return axis, 1 if cosines[world_axis, axis] > 0 else -1


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to (..., 3) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def memory_layout(array: np.ndarray) -> str:
    """The memory order of an array: "F" when Fortran-ordered (NIfTI and ITK volumes), else "C"."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def spatial_array(array: Any) -> np.ndarray:
    """(X, Y, Z) numpy view of an (X, Y, Z) or channel-first (1, X, Y, Z) array, tensor or MetaTensor."""
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def affine_of(reference: Any) -> np.ndarray:
    """The float64 4x4 affine of a MetaTensor, or ``reference`` itself when it is an affine (array or tensor)."""
    affine = getattr(reference, "affine", reference)
    affine = affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine
    return np.asarray(affine, dtype=np.float64)


def array_and_affine(image: Any, affine: Optional[Any] = None, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """The (X, Y, Z) numpy array and float64 affine of ``image`` (a MetaTensor, tensor or array).

    ``affine`` overrides the image's own (needed for plain arrays and tensors). Raises
    :class:`InputImageError` naming ``what`` when there is no affine or the image is not 3D.
    """
    if affine is None:
        affine = getattr(image, "affine", None)
        if affine is None:
            raise InputImageError(f"the {what} has no affine; pass a MetaTensor or give its affine")
    array = spatial_array(image)
    if array.ndim != 3:
        raise InputImageError(f"expected a 3D {what} (X, Y, Z) or (1, X, Y, Z), got shape {array.shape}")
    return array, affine_of(affine)


def mask_bounding_box(mask: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Index bounds ``(lo, hi)`` (``hi`` exclusive) of the nonzero voxels of a 3D mask, or None when it is empty.

    From the mask's projections onto each axis: no (N, 3) index array of the voxels.
    """
    mask = np.asarray(mask)
    lo, hi = [], []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if occupied.size == 0:
            return None
        lo.append(occupied[0])
        hi.append(occupied[-1] + 1)
    return np.array(lo), np.array(hi)


def _axis_sources(matrix: np.ndarray, output_shape: Sequence[int], tolerance: float = 1e-6) -> Optional[np.ndarray]:
    """For an axis-aligned ``matrix`` (output index -> input coordinate), the input axis each output axis reads;
    None when an off-axis term moves some sample by more than ``tolerance`` voxels (an oblique map)."""
    m = np.asarray(matrix, dtype=np.float64)
    source = np.argmax(np.abs(m), axis=0)
    if len(set(source.tolist())) != m.shape[0]:
        return None
    off_axis = np.abs(m)
    off_axis[source, np.arange(m.shape[1])] = 0.0
    return None if (off_axis @ np.asarray(output_shape, np.float64)).max() > tolerance else source


def _interpolate_axis(
    volume: np.ndarray, axis: int, index: np.ndarray, fraction: Optional[np.ndarray], valid: np.ndarray, cval: float
) -> np.ndarray:
    """One separable pass: ``volume`` sampled along ``axis`` at ``index`` (+ ``fraction`` towards the next voxel,
    linear; None: nearest); ``cval`` where not ``valid``."""
    out = np.take(volume, index, axis=axis)
    if fraction is not None and volume.shape[axis] > 1:
        shape = [1] * volume.ndim
        shape[axis] = -1
        step = np.take(volume, index + 1, axis=axis)
        step -= out
        step *= fraction.astype(volume.dtype).reshape(shape)
        out += step
    if not valid.all():
        where: list[Any] = [slice(None)] * volume.ndim
        where[axis] = ~valid
        out[tuple(where)] = cval
    return out


def resample_affine(
    volume: np.ndarray,
    matrix: np.ndarray,
    offset: Sequence[float],
    output_shape: Sequence[int],
    order: int = 1,
    cval: float = 0.0,
    layout: str = "C",
) -> np.ndarray:
    """``scipy.ndimage.affine_transform(volume, matrix, offset, output_shape, order=order, mode="constant",
    cval=cval, prefilter=False)`` for order 0 (nearest) or 1 (trilinear), much faster for axis-aligned maps.

    When every output axis reads a single input axis (scalings, flips and axis permutations: CT grids and atlases
    without obliquity), the volume is interpolated one axis at a time on the part the samples need: the same
    values up to float32 rounding (order 1) and the same voxels (order 0). Other maps go to scipy. Order 1 returns
    float32, order 0 the volume's dtype; ``layout`` "C" or "F" is the memory order of the result (match the
    arrays it will be combined with: elementwise work and NIfTI writing are several times slower across orders).
    """
    if order not in (0, 1) or layout not in ("C", "F"):
        raise ValueError(f"order must be 0 or 1 and layout 'C' or 'F', got {order} and {layout!r}")
    volume = np.asarray(volume)
    matrix = np.asarray(matrix, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    output_shape = tuple(int(s) for s in output_shape)
    dtype = np.dtype(np.float32) if order else volume.dtype
    source = _axis_sources(matrix, output_shape)
    if source is None:
        out = ndimage.affine_transform(
            volume,
            matrix,
            offset,
            output_shape=output_shape,
            output=dtype,
            order=order,
            mode="constant",
            cval=cval,
            prefilter=False,
        )
        return np.asfortranarray(out) if layout == "F" else out
    work = volume.transpose(source)  # axis a of ``work`` is read by output axis a
    crop, samples = [], []
    for a in range(3):
        n = work.shape[a]
        coords = matrix[source[a], a] * np.arange(output_shape[a]) + offset[source[a]]
        valid = (coords >= 0) & (coords <= n - 1)  # scipy's "constant" mode: cval outside [0, n - 1]
        if order:
            index = np.clip(np.floor(coords), 0, max(n - 2, 0)).astype(np.intp)
        else:
            index = np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.intp)
        used = index[valid]
        lo = int(used.min()) if used.size else 0
        hi = min(int(used.max()) + 1 + order, n) if used.size else 1
        crop.append(slice(lo, hi))
        samples.append((np.clip(index - lo, 0, max(hi - lo - 1 - order, 0)), coords - index if order else None, valid))
    work = work[tuple(crop)].astype(dtype, copy=False)
    if layout == "F":  # compute in reversed axis order: a C-ordered result there is F-ordered here
        work, samples = work.transpose(2, 1, 0), samples[::-1]
    if list(work.strides) != sorted(work.strides, reverse=True):
        work = np.ascontiguousarray(work)
    growth = [len(samples[a][0]) / work.shape[a] for a in range(3)]
    for a in sorted(range(3), key=lambda a: growth[a]):  # shrinking axes first: later passes handle less data
        work = _interpolate_axis(work, a, *samples[a], cval)
    return work.transpose(2, 1, 0) if layout == "F" else work


def _channels(shape: Sequence[int], layout: str, allocate: Any = np.zeros) -> np.ndarray:
    """A float32 (C, X, Y, Z) array from ``allocate`` (``np.zeros``, ``np.empty``) whose channels are each C- or
    F-ordered (``layout``), channels slowest."""
    if layout == "C":
        return allocate(tuple(shape), dtype=np.float32)
    return allocate((shape[0], *reversed(shape[1:])), dtype=np.float32).transpose(0, 3, 2, 1)


def grid_to_image(
    values: np.ndarray,
    grid_affine: np.ndarray,
    image_affine: np.ndarray,
    image_shape: Sequence[int],
    mask: np.ndarray,
    normalise: bool = True,
) -> np.ndarray:
    """Resample (C, Xg, Yg, Zg) grid values (trilinear) onto the image's voxels inside ``mask``; 0 elsewhere.

    With ``normalise`` the channels of each masked voxel are divided by their sum (probabilities near the edge of
    the covered grid otherwise lose mass to the uncovered, all-zero voxels). Each channel of the result has the
    mask's memory order (Fortran for NIfTI scans), which keeps the later elementwise work and writing fast.
    """
    mask = np.asarray(mask) > 0
    layout = memory_layout(mask)
    out = _channels((values.shape[0], *image_shape), layout)
    image_to_grid = np.linalg.inv(np.asarray(grid_affine, np.float64)) @ np.asarray(image_affine, np.float64)
    matrix = image_to_grid[:3, :3]
    for box in mask_slabs(mask, layout):
        lo = np.array([b.start for b in box])
        shape = [b.stop - b.start for b in box]
        inside, part = mask[box], out[(slice(None), *box)]
        offset = matrix @ lo + image_to_grid[:3, 3]
        for c in range(values.shape[0]):
            resampled = resample_affine(values[c], matrix, offset, shape, order=1, cval=0.0, layout=layout)
            np.copyto(part[c], resampled, where=inside)
        if normalise:
            total = part.sum(axis=0)
            np.divide(part, total, out=part, where=total > 0)
    return out


def mask_slabs(mask: np.ndarray, layout: str, voxels: int = 1 << 20) -> Iterator[tuple[slice, ...]]:
    """Boxes that tile the bounding box of ``mask`` in slabs of about ``voxels`` along its slowest-varying axis:
    small temporaries, which the allocator reuses instead of mapping (and zeroing) fresh memory for each."""
    bounds = mask_bounding_box(mask)
    if bounds is None:
        return
    lo, hi = bounds
    axis = 2 if layout == "F" else 0
    thickness = max(1, voxels // int(np.prod(np.delete(hi - lo, axis))))
    for start in range(lo[axis], hi[axis], thickness):
        box = [slice(a, b) for a, b in zip(lo, hi)]
        box[axis] = slice(start, min(start + thickness, hi[axis]))
        yield tuple(box)


def resample_to_grid(
    volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape: Sequence[int], order: int = 0
) -> np.ndarray:
    """A volume (X, Y, Z) with ``affine`` resampled onto a grid (nearest neighbour by default, 0 outside)."""
    grid_to_voxel = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(grid_affine, np.float64)
    volume = np.asarray(volume)
    out = resample_affine(volume, grid_to_voxel[:3, :3], grid_to_voxel[:3, 3], grid_shape, order=order, cval=0.0)
    if order and np.issubdtype(volume.dtype, np.integer):
        out = np.rint(out)  # as scipy, which rounds interpolated values into integer outputs
    return out.astype(volume.dtype, copy=False)
