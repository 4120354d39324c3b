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

from typing import Any, Hashable, Mapping, Optional, Union

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from scipy import ndimage

from drasclr_ext.atlas import Atlas, load_atlas
from drasclr_ext.geometry import apply_affine, array_and_affine, unit_axes
from drasclr_ext.transforms.registration_result import RegistrationResult

__all__ = [
    "HU_MAX",
    "HU_MIN",
    "AnatomicalPatches",
    "AnatomicalPatchesd",
    "HUWindow",
    "HUWindowd",
    "hu_window",
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
        hu, hu_affine = array_and_affine(image, affine)
        centres = self.centres_world(registration)
        patches = sample_patches(
            hu, hu_affine, centres, unit_axes(self.atlas.affine), self.atlas.patch_size, chunk=self.chunk
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
