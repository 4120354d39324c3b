"""HU windowing and anatomical patches: landmark patches (the DrasCLR input) and dense sliding windows.

Patch geometry (both modes): a patch is a 32^3 grid at 1 mm whose axes are the ATLAS voxel axes (so a patch looks
the same whatever the subject's storage orientation, as in the reference where subject and atlas share the NIfTI
orientation), centred at the subject-space image of the atlas patch centre (``corner + 15.5`` atlas voxels mapped
through the registration). The registration's scale and shear are used to place patches, not to resample them: a
patch keeps the subject's own 1 mm texture, as in the reference (which resamples the subject to 1 mm and cuts
axis-aligned patches at the mapped landmarks). HU are sampled with trilinear interpolation
(``scipy.ndimage.map_coordinates``, order 1); voxels outside the scan read -1024 HU, i.e. -1 after windowing.

Dense windows: a 1 mm grid with the same axes over the lung's bounding box (plus a margin); the location of a window
is its centre mapped back into the atlas through the inverse transform, minus 15.5 voxels (the corner of a 32^3
patch centred there), normalised with the atlas landmarks' per-axis maximum exactly like the landmarks.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from scipy import ndimage

from drasclr_ext.atlas import Atlas, load_atlas
from drasclr_ext.transforms.registration import RegistrationResult, _array_and_affine, apply_affine

__all__ = [
    "HU_MAX",
    "HU_MIN",
    "AnatomicalPatches",
    "AnatomicalPatchesd",
    "HUWindow",
    "HUWindowd",
    "hu_window",
    "mask_bounding_box",
    "resample_affine",
    "sample_patches",
]

HU_MIN, HU_MAX = -1024.0, 240.0


def hu_window(hu: np.ndarray, a_min: float = HU_MIN, a_max: float = HU_MAX) -> np.ndarray:
    """Clip HU to [a_min, a_max] and scale to [-1, 1] (the reference: ``(HU + 1024) / 632 - 1``), float32."""
    out = np.clip(np.asarray(hu, dtype=np.float32), a_min, a_max)
    out -= a_min
    out *= 2.0 / (a_max - a_min)
    out -= 1.0
    return out


class HUWindow(Transform):
    """Clip HU to [-1024, 240] and scale to [-1, 1]; keeps the MetaTensor's metadata."""

    def __init__(self, a_min: float = HU_MIN, a_max: float = HU_MAX) -> None:
        self.scaler = ScaleIntensityRange(a_min=a_min, a_max=a_max, b_min=-1.0, b_max=1.0, clip=True)

    def __call__(self, img: Any) -> Any:
        return self.scaler(img)


class HUWindowd(MapTransform):
    """Dictionary twin of :class:`HUWindow`."""

    def __init__(
        self, keys: KeysCollection, a_min: float = HU_MIN, a_max: float = HU_MAX, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = HUWindow(a_min, a_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


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


def _memory_layout(array: np.ndarray) -> str:
    """The memory order of an array: "F" when Fortran-ordered (NIfTI and ITK volumes), else "C"."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def _unit_axes(affine: np.ndarray) -> np.ndarray:
    """The 3x3 matrix of unit direction vectors of an affine's voxel axes (columns)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return linear / np.linalg.norm(linear, axis=0)


def sample_patches(
    hu: np.ndarray,
    hu_affine: np.ndarray,
    centres_world: np.ndarray,
    axes: np.ndarray,
    size: int = 32,
    chunk: int = 32,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Sample (N, size, size, size) windowed patches at 1 mm, centred at ``centres_world``, along unit ``axes``.

    Trilinear interpolation; outside the volume -1024 HU. Works in chunks of ``chunk`` patches to bound memory.
    """
    hu = np.asarray(hu, dtype=np.float32)
    world_to_voxel = np.linalg.inv(np.asarray(hu_affine, dtype=np.float64))
    step = world_to_voxel[:3, :3] @ axes  # voxel displacement per 1 mm along each patch axis (columns)
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3)
    local = grid @ step.T  # (size^3, 3) voxel offsets
    centres_voxel = apply_affine(world_to_voxel, centres_world)
    n = len(centres_voxel)
    if out is None:
        out = np.empty((n, size, size, size), dtype=np.float32)
    for start in range(0, n, chunk):
        c = centres_voxel[start : start + chunk]
        coords = (c[:, None, :] + local[None]).reshape(-1, 3).T
        values = ndimage.map_coordinates(hu, coords, order=1, mode="constant", cval=HU_MIN, prefilter=False)
        out[start : start + len(c)] = hu_window(values).reshape(len(c), size, size, size)
    return out


class AnatomicalPatches(Transform):
    """32^3 patches at the atlas landmarks mapped into the subject.

    Args:
        atlas: an :class:`Atlas` or its name.
        atlas_path: folder of the atlas files, for atlases that need it.
        k: number of neighbouring landmarks returned per landmark.
        chunk: landmarks sampled at once (memory bound: ``chunk * 32^3 * 24`` bytes of coordinates).

    ``__call__(image, registration)``: ``image`` a (X, Y, Z) or (1, X, Y, Z) HU MetaTensor (or array plus
    ``affine=``), ``registration`` a :class:`RegistrationResult`. Returns a dict: ``patches`` (L, 32, 32, 32) float32
    in [-1, 1], ``locations`` (L, 3) float32, ``neighbours`` (L, k) int64, ``centres_world`` (L, 3) float64 (subject
    RAS mm).
    """

    def __init__(
        self, atlas: Union[Atlas, str] = "default", atlas_path: Optional[str] = None, k: int = 2, chunk: int = 32
    ) -> None:
        self.atlas = load_atlas(atlas, atlas_path)
        self.k = int(k)
        self.chunk = int(chunk)
        self._neighbours = self.atlas.neighbours(self.k)
        self._locations = self.atlas.locations

    def centres_world(self, registration: RegistrationResult) -> np.ndarray:
        return registration.map_atlas_voxels(self.atlas.affine, self.atlas.centres_voxel)

    def __call__(
        self, image: Any, registration: RegistrationResult, affine: Optional[np.ndarray] = None
    ) -> dict[str, np.ndarray]:
        hu, hu_affine = _array_and_affine(image, affine)
        centres = self.centres_world(registration)
        patches = sample_patches(
            hu, hu_affine, centres, _unit_axes(self.atlas.affine), self.atlas.patch_size, chunk=self.chunk
        )
        return {
            "patches": patches,
            "locations": self._locations.copy(),
            "neighbours": self._neighbours.copy(),
            "centres_world": centres,
        }


class AnatomicalPatchesd(MapTransform):
    """Dictionary twin of :class:`AnatomicalPatches`: patches of ``d[key]`` (HU) using ``d[registration_key]``.

    Writes ``patches``, ``locations``, ``neighbours`` and ``centres_world`` (prefixed by ``output_prefix``).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        registration_key: str = "registration",
        output_prefix: str = "",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.registration_key = registration_key
        self.output_prefix = output_prefix
        self.extractor = AnatomicalPatches(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            for name, value in self.extractor(d[key], d[self.registration_key]).items():
                d[f"{self.output_prefix}{name}"] = value
        return d
