"""The dense model's input grid: a subject resampled onto 1 mm voxels along the atlas axes, with the anatomical
location of every voxel taken from the atlas registration.

- :func:`atlas_grid` resamples the CT (windowed to [-1, 1]) and its lung mask onto the grid over the lungs.
- :func:`location_channels` gives each voxel the normalised atlas location of the 32^3 patch centred there; it is
  affine in the voxel index, so a window's mean location is the location at its centre (what the DrasCLR
  encoder is conditioned on, exactly as for the landmark patches).
- :class:`AtlasLocationd` appends those three channels to an image on any part of the grid (a training crop, or
  the whole grid for :func:`monai.inferers.sliding_window_inference`), from the image's own affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from drasclr_ext.atlas import Atlas, load_atlas
from drasclr_ext.errors import InputImageError
from drasclr_ext.geometry import (
    apply_affine,
    array_and_affine,
    mask_bounding_box,
    memory_layout,
    resample_affine,
    unit_axes,
)
from drasclr_ext.transforms.patches import HU_MIN, hu_window
from drasclr_ext.transforms.registration_result import RegistrationResult

__all__ = ["AtlasGrid", "AtlasLocationd", "atlas_grid", "location_channels", "location_scale"]


@dataclass
class AtlasGrid:
    """A subject resampled onto a 1 mm grid with the atlas axes over its lungs (the dense model's input grid).

    Attributes:
        image: (X, Y, Z) float32 windowed HU in [-1, 1] on the grid (trilinear; -1 outside the scan).
        lung: (X, Y, Z) uint8 lung labels on the grid (nearest neighbour).
        affine: 4x4 RAS affine of the grid (1 mm voxels along the atlas axes).
        world_to_atlas: 4x4 map from subject world (RAS mm) to atlas voxel indices (the registration).
        location_scale: the normalisation of atlas patch corners (see :func:`location_scale`).
    """

    image: np.ndarray
    lung: np.ndarray
    affine: np.ndarray
    world_to_atlas: np.ndarray
    location_scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def locations(self) -> np.ndarray:
        """(3, X, Y, Z) float32 normalised atlas location of every grid voxel (:func:`location_channels`)."""
        return location_channels(self.affine, self.shape, self.world_to_atlas, self.location_scale)


def location_scale(atlas: Atlas) -> np.ndarray:
    """Per-axis factor of the location normalisation: ``location = (corner * scale) - 1`` with ``scale = 2 / max``
    over the atlas landmarks (the reference's ``corner / max * 2 - 1``, as
    :func:`~drasclr_ext.atlas.normalise_corners`)."""
    return 2.0 / np.asarray(atlas.corners, dtype=np.float64).max(axis=0)


def location_channels(
    affine: np.ndarray,
    shape: Sequence[int],
    world_to_atlas: np.ndarray,
    scale: np.ndarray,
    patch_size: int = 32,
) -> np.ndarray:
    """(3, X, Y, Z) float32 normalised atlas location of each voxel of a grid with ``affine``: the corner of the
    ``patch_size``^3 atlas patch centred at the voxel's atlas position, normalised like the landmarks.

    The location is an affine function of the voxel index, so the mean over any window is the location of the
    window's centre: the location the DrasCLR encoder is conditioned on.
    """
    index_to_atlas = np.asarray(world_to_atlas, np.float64) @ np.asarray(affine, np.float64)
    matrix = index_to_atlas[:3, :3] * np.asarray(scale, np.float64)[:, None]
    offset = (index_to_atlas[:3, 3] - (patch_size - 1) / 2.0) * np.asarray(scale, np.float64) - 1.0
    out = np.empty((3, *(int(s) for s in shape)), dtype=np.float32)
    axes = [np.arange(int(n), dtype=np.float64) for n in shape]
    for c in range(3):
        x = (matrix[c, 0] * axes[0])[:, None, None]
        y = (matrix[c, 1] * axes[1])[None, :, None]
        z = (matrix[c, 2] * axes[2] + offset[c])[None, None, :]
        np.add(np.add(x, y, dtype=np.float32), z, out=out[c], dtype=np.float32, casting="same_kind")
    return out


def atlas_grid(
    image: Any,
    lung_mask: Any,
    registration: RegistrationResult,
    atlas: Union[Atlas, str] = "default",
    margin: int = 4,
    min_size: int = 1,
    atlas_path: Optional[str] = None,
    affine: Optional[np.ndarray] = None,
) -> AtlasGrid:
    """Resample a subject onto the 1 mm atlas-aligned grid over its lung bounding box plus ``margin`` mm, each
    side at least ``min_size`` voxels (see :class:`AtlasGrid`).

    ``image`` (HU) and ``lung_mask`` share one grid: MetaTensors, or arrays with ``affine``.
    """
    atlas = load_atlas(atlas, atlas_path)
    hu, hu_affine = array_and_affine(image, affine)
    lung, _ = array_and_affine(lung_mask, hu_affine, "lung mask")
    if lung.shape != hu.shape:
        raise InputImageError(f"lung mask shape {lung.shape} differs from the image's {hu.shape}; recompute the mask")
    bounds = mask_bounding_box(lung > 0)
    if bounds is None:
        raise InputImageError("the lung mask is empty; the dense model needs lungs: check the scan and its lung mask")
    axes = unit_axes(atlas.affine)
    # the lung bounding box (voxel box corners) in the grid frame u = axes^T world
    lo_v, hi_v = bounds[0] - 0.5, bounds[1] - 0.5
    box = np.array(np.meshgrid(*zip(lo_v, hi_v), indexing="ij")).reshape(3, -1).T
    u = apply_affine(hu_affine, box) @ axes
    lo = np.floor(u.min(0)) - margin
    extent = (np.ceil(u.max(0)) + margin - lo + 1).astype(int)
    shape = np.maximum(extent, int(min_size))
    lo -= (shape - extent) // 2  # centre the enlargement
    grid_affine = np.eye(4)
    grid_affine[:3, :3] = axes
    grid_affine[:3, 3] = axes @ lo
    # resample HU (trilinear) and the lung labels (nearest) onto the grid, in the image's memory order
    grid_to_voxel = np.linalg.inv(hu_affine) @ grid_affine
    m, t, layout = grid_to_voxel[:3, :3], grid_to_voxel[:3, 3], memory_layout(hu)
    grid = hu_window(resample_affine(hu, m, t, shape, order=1, cval=HU_MIN, layout=layout))
    lung_grid = resample_affine(np.asarray(lung, dtype=np.uint8), m, t, shape, order=0, cval=0, layout=layout)
    world_to_atlas = np.linalg.inv(atlas.affine) @ registration.subject_to_atlas
    return AtlasGrid(grid, lung_grid, grid_affine, world_to_atlas, location_scale(atlas))


class AtlasLocationd(MapTransform):
    """Append the three normalised atlas location channels to channel-first images on the atlas grid.

    The location of each voxel follows from the image's affine (a MetaTensor's, so crops keep their place) and the
    subject's ``d[world_to_atlas_key]`` (4x4) and ``d[scale_key]`` (3,) (see :class:`AtlasGrid`).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        world_to_atlas_key: str = "world_to_atlas",
        scale_key: str = "location_scale",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.world_to_atlas_key, self.scale_key = world_to_atlas_key, scale_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise InputImageError(f"{key!r} must be a MetaTensor with its affine to place the location channels")
            loc = location_channels(
                image.affine.numpy(),
                image.shape[1:],
                np.asarray(d[self.world_to_atlas_key]),
                np.asarray(d[self.scale_key]),
            )
            out = torch.cat([image.as_tensor().float(), torch.from_numpy(loc)], dim=0)
            d[key] = MetaTensor(out, meta=image.meta)
        return d
