"""Lung atlases: a 1 mm lung mask plus the corners of the 32^3 landmark patches cut from it.

Two atlases are known by name:

- ``"default"``: the project's own atlas, generated deterministically by ``scripts/make_default_atlas.py`` from the
  phantom generator's average lungs and committed as ``drasclr_ext/assets/default_atlas_*`` (works offline).
- ``"drasclr"``: the COPDGene atlas of the DrasCLR authors (581 landmarks, MIT), read from a folder holding
  ``atlas_lung_mask.nii.gz`` and ``atlas_patch_loc.npy`` whose sha256 must match :data:`DRASCLR_ATLAS_SHA256`. Use it
  with the official checkpoints, which were trained on its landmarks.

Any other name with a ``path`` loads a custom atlas folder with the same two file names (no hash check).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import sha256sum

__all__ = [
    "Atlas",
    "ASSETS_DIR",
    "ATLAS_CORNERS_FILE",
    "ATLAS_MASK_FILE",
    "DEFAULT_ATLAS_FILES",
    "DRASCLR_ATLAS_CORNERS_SHA256",
    "DRASCLR_ATLAS_MASK_SHA256",
    "DRASCLR_ATLAS_SHA256",
    "build_landmarks",
    "load_atlas",
    "normalise_corners",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ATLAS_MASK_FILE = "atlas_lung_mask.nii.gz"
ATLAS_CORNERS_FILE = "atlas_patch_loc.npy"
# flat in assets/ (the package data glob is ``assets/*``)
DEFAULT_ATLAS_FILES = {
    ATLAS_MASK_FILE: "default_atlas_lung_mask.nii.gz",
    ATLAS_CORNERS_FILE: "default_atlas_patch_loc.npy",
}

DRASCLR_ATLAS_MASK_SHA256 = "3f2ea5e6f8c617544a816532fac7a37c7db5d55d891b9e5fad8c15bf5e81585c"
DRASCLR_ATLAS_CORNERS_SHA256 = "256c5a9fe85e27f6dd0344619cbcbac74b2fe2f3e6ebdccd02397d20e8aae845"
DRASCLR_ATLAS_SHA256 = {ATLAS_MASK_FILE: DRASCLR_ATLAS_MASK_SHA256, ATLAS_CORNERS_FILE: DRASCLR_ATLAS_CORNERS_SHA256}

PathLike = Union[str, os.PathLike]


def normalise_corners(corners: np.ndarray, reference_corners: Optional[np.ndarray] = None) -> np.ndarray:
    """The reference's location input: ``corner / max_over_landmarks(corner) * 2 - 1`` per axis, as float32.

    ``reference_corners`` (default: ``corners``) gives the per-axis maximum, so that points that are not landmarks
    (dense windows) are normalised exactly like the landmarks.
    """
    ref = np.asarray(corners if reference_corners is None else reference_corners, dtype=np.float64)
    return (np.asarray(corners, dtype=np.float64) / ref.max(axis=0) * 2.0 - 1.0).astype(np.float32)


@dataclass
class Atlas:
    """A lung atlas.

    Args:
        name: name of the atlas (``"default"``, ``"drasclr"``, ...).
        mask: uint8 (X, Y, Z) lung mask at 1 mm, 1 inside the lungs, 0 outside.
        affine: its 4x4 RAS voxel-to-world affine.
        corners: (L, 3) int64 voxel indices (x, y, z) of the lowest corner of each landmark patch.
        patch_size: edge of the landmark patches in voxels (32).
    """

    name: str
    mask: np.ndarray
    affine: np.ndarray
    corners: np.ndarray
    patch_size: int = 32

    def __post_init__(self) -> None:
        self.mask = (np.asarray(self.mask) > 0).astype(np.uint8)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.corners = np.asarray(self.corners, dtype=np.int64).reshape(-1, 3)
        if self.mask.ndim != 3 or self.affine.shape != (4, 4):
            raise DrasCLRError(
                f"atlas {self.name!r}: expected a 3D mask and a 4x4 affine, got {self.mask.shape} and "
                f"{self.affine.shape}; rebuild the atlas files"
            )
        if len(self.corners) < 2:
            raise DrasCLRError(f"atlas {self.name!r} has {len(self.corners)} landmarks; it needs at least 2")

    @property
    def num_landmarks(self) -> int:
        return int(len(self.corners))

    @property
    def locations(self) -> np.ndarray:
        """(L, 3) float32 location input of each landmark, normalised exactly as in the reference."""
        return normalise_corners(self.corners)

    @property
    def centres_voxel(self) -> np.ndarray:
        """(L, 3) float64 atlas voxel coordinates of the landmark patch centres (corner + (patch - 1) / 2)."""
        return self.corners.astype(np.float64) + (self.patch_size - 1) / 2.0

    def neighbours(self, k: int = 2) -> np.ndarray:
        """(L, k) int64 indices of the k nearest other landmarks (Euclidean distance between corners).

        Ties are broken by the lower landmark index.
        """
        if not 1 <= k < self.num_landmarks:
            raise DrasCLRError(f"k must be between 1 and {self.num_landmarks - 1} for atlas {self.name!r}, got {k}")
        c = self.corners
        d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # exact integers: ties are real ties
        np.fill_diagonal(d2, np.iinfo(d2.dtype).max)
        return np.argsort(d2, axis=1, kind="stable")[:, :k].astype(np.int64)


def box_counts(mask: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    """Nonzero voxels of ``mask`` in each box ``origin .. origin + size`` (clipped at the edges), via a summed-volume
    table: O(1) per box."""
    table = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int64)
    table[1:, 1:, 1:] = (np.asarray(mask) > 0).cumsum(0, dtype=np.int64).cumsum(1).cumsum(2)
    lo = np.clip(origins, 0, np.array(mask.shape))
    hi = np.clip(origins + size, 0, np.array(mask.shape))
    (x0, y0, z0), (x1, y1, z1) = lo.T, hi.T
    t = table
    return (
        t[x1, y1, z1]
        - t[x0, y1, z1]
        - t[x1, y0, z1]
        - t[x1, y1, z0]
        + t[x0, y0, z1]
        + t[x0, y1, z0]
        + t[x1, y0, z0]
        - t[x0, y0, z0]
    )


def build_landmarks(mask: np.ndarray, patch: int = 32, step: int = 26, min_lung_fraction: float = 0.1) -> np.ndarray:
    """Corners of the landmark patches of a 1 mm lung mask, as in the reference.

    A grid of corners ``0, step, 2 * step, ...`` along each axis (x-major, then y, then z: the reference's order); a
    corner is kept where MORE than ``min_lung_fraction`` of its ``patch^3`` voxels are lung (voxels past the volume's
    end count as background). Returns (L, 3) int64 voxel indices.
    """
    lung = np.asarray(mask) > 0
    if lung.ndim != 3:
        raise DrasCLRError(f"build_landmarks needs a 3D mask, got shape {lung.shape}")
    starts = [np.arange(0, n, step) for n in lung.shape]
    corners = np.stack([c.ravel() for c in np.meshgrid(*starts, indexing="ij")], axis=1)
    counts = box_counts(lung, corners, patch)
    keep = counts > min_lung_fraction * patch**3
    return corners[keep].astype(np.int64)


def _read_atlas_folder(
    name: str, folder: Path, expected_sha256: Optional[dict] = None, file_names: Optional[dict] = None
) -> Atlas:
    import nibabel as nib

    file_names = file_names or {}
    files = {key: folder / file_names.get(key, key) for key in (ATLAS_MASK_FILE, ATLAS_CORNERS_FILE)}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DrasCLRError(
            f"atlas {name!r}: missing {', '.join(missing)}; point `atlas_path` at a folder holding "
            f"{ATLAS_MASK_FILE} and {ATLAS_CORNERS_FILE}"
        )
    for key, expected in (expected_sha256 or {}).items():
        actual = sha256sum(files[key])
        if actual != expected:
            raise DrasCLRError(
                f"atlas {name!r}: {files[key]} has sha256 {actual}, expected {expected}; the file is corrupt or "
                "another atlas: download the DrasCLR atlas again (see the bundle's large_files.yml)"
            )
    image = nib.load(str(files[ATLAS_MASK_FILE]))
    spacing = np.asarray(image.header.get_zooms()[:3], dtype=float)
    if not np.allclose(spacing, 1.0, atol=1e-3):
        raise DrasCLRError(f"atlas {name!r}: the mask must be at 1 mm, got spacing {spacing.tolist()}")
    mask = np.asarray(image.dataobj)
    corners = np.load(files[ATLAS_CORNERS_FILE])
    return Atlas(name=name, mask=mask, affine=image.affine, corners=corners)


@functools.lru_cache(maxsize=4)
def _load_atlas_cached(name: str, path: Optional[str]) -> Atlas:
    if name == "default":
        if path:
            return _read_atlas_folder(name, Path(path))
        return _read_atlas_folder(name, ASSETS_DIR, file_names=DEFAULT_ATLAS_FILES)
    if name == "drasclr":
        if not path:
            raise DrasCLRError(
                "the 'drasclr' atlas needs `atlas_path`: a folder with atlas_lung_mask.nii.gz and atlas_patch_loc.npy "
                "(the DrasCLR COPDGene atlas; see the bundle's large_files.yml to download it)"
            )
        return _read_atlas_folder(name, Path(path), DRASCLR_ATLAS_SHA256)
    if path:
        return _read_atlas_folder(name, Path(path))
    raise DrasCLRError(f"unknown atlas {name!r}: use 'default', 'drasclr' (with `atlas_path`), or give `atlas_path`")


def load_atlas(name: Union[str, Atlas] = "default", path: Optional[PathLike] = None) -> Atlas:
    """Load an atlas by name (``"default"`` or ``"drasclr"``), or a custom one from ``path``.

    Loaded atlases are cached per process; treat them as read-only. An :class:`Atlas` is returned unchanged.
    """
    if isinstance(name, Atlas):
        return name
    return _load_atlas_cached(str(name), None if path is None else str(Path(path).resolve()))
