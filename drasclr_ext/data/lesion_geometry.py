"""World geometry of a host scan for lesion insertion: voxel <-> millimetres through its affine (any orientation),
balls with partial volumes along the slice axis, and each lung voxel's depth below the pleura."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

__all__ = ["ScanGeometry", "lung_depth_mm"]


class ScanGeometry:
    """Voxel <-> world (mm) of a scan; the slice axis (largest spacing) is sub-sampled for partial volumes."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, ...]) -> None:
        self.affine = np.asarray(affine, dtype=np.float64)
        self.lin = self.affine[:3, :3]
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.linalg.norm(self.lin, axis=0)
        self.dirs = self.lin / self.spacing  # unit world direction of each voxel axis
        self.inv_lin = np.linalg.inv(self.lin)
        self.inv_row = np.linalg.norm(self.inv_lin, axis=1)  # voxels per mm along each axis (any direction)
        self.slice_axis = int(np.argmax(self.spacing))
        in_plane = float(np.min(np.delete(self.spacing, self.slice_axis)))
        self.n_sub = max(1, int(round(self.spacing[self.slice_axis] / in_plane)))
        self.sub_offsets = (np.arange(self.n_sub) + 0.5) / self.n_sub - 0.5  # voxel units along the slice axis
        self.h = float(np.cbrt(np.prod(self.spacing) / self.n_sub))  # partial-volume ramp width (mm)

    def world(self, ijk: np.ndarray) -> np.ndarray:
        return np.asarray(ijk, dtype=np.float64) @ self.lin.T + self.affine[:3, 3]

    def index(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.affine[:3, 3]) @ self.inv_lin.T

    def nearest(self, point: np.ndarray) -> Optional[tuple[int, int, int]]:
        idx = np.round(self.index(point[None])[0]).astype(int)
        if np.any(idx < 0) or np.any(idx >= np.array(self.shape)):
            return None
        return int(idx[0]), int(idx[1]), int(idx[2])

    def box(self, centre: np.ndarray, radius_mm: float) -> Optional[tuple[slice, slice, slice]]:
        """Index box holding the ball of ``radius_mm`` around ``centre`` (clipped to the scan), None if outside."""
        c = self.index(centre[None])[0]
        ext = radius_mm * self.inv_row + 1.0
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, np.array(self.shape))
        if np.any(hi <= lo):
            return None
        return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])

    def offsets(self, box: tuple[slice, slice, slice], centre: np.ndarray, shift: float = 0.0) -> list[np.ndarray]:
        """World offsets (x, y, z arrays broadcasting to the box) of the box's voxels from ``centre``, the voxels
        moved by ``shift`` voxels along the slice axis."""
        ax = [np.arange(b.start, b.stop, dtype=np.float64) for b in box]
        ax[self.slice_axis] = ax[self.slice_axis] + shift
        out = []
        for w in range(3):
            comp = self.affine[w, 3] - centre[w]
            for d in range(3):
                shape = [1, 1, 1]
                shape[d] = -1
                comp = comp + (self.lin[w, d] * ax[d]).reshape(shape)
            out.append(comp)
        return out

    def ball_fraction(self, centre: np.ndarray, radius: float) -> Optional[tuple[tuple[slice, ...], np.ndarray]]:
        """Share of each voxel's slab inside the ball (slice axis sub-sampled), in the ball's index box."""
        box = self.box(centre, radius + self.h)
        if box is None:
            return None
        frac = np.zeros(tuple(b.stop - b.start for b in box), dtype=np.float32)
        for dz in self.sub_offsets:
            x, y, z = self.offsets(box, centre, dz)
            dist = np.sqrt(x**2 + y**2 + z**2)
            frac += np.clip((radius - dist) / self.h + 0.5, 0.0, 1.0).astype(np.float32)
        return box, frac / np.float32(self.n_sub)

    def footprint(self, radius_mm: float) -> np.ndarray:
        """Voxel offsets within ``radius_mm`` (world distance), as a boolean structuring element."""
        ext = np.floor(radius_mm / self.spacing + 1e-6).astype(int)
        grids = np.meshgrid(*[np.arange(-e, e + 1) for e in ext], indexing="ij")
        d = np.stack(grids, -1) @ self.lin.T
        return np.linalg.norm(d, axis=-1) <= radius_mm + 1e-6

    def world_z(self) -> np.ndarray:
        """Superior (RAS z) coordinate of every voxel centre, float32."""
        i, j, k = (np.arange(n, dtype=np.float32) for n in self.shape)
        a = self.affine.astype(np.float32)
        return a[2, 0] * i[:, None, None] + a[2, 1] * j[None, :, None] + a[2, 2] * k[None, None, :] + a[2, 3]


def lung_depth_mm(lung: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of each lung voxel to the nearest non-lung voxel (the scan's edge counts as outside)."""
    depth = np.zeros(lung.shape, dtype=np.float32)
    nz = np.argwhere(lung)
    if len(nz) == 0:
        return depth
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    padded = np.pad(lung[box], 1)
    depth[box] = ndi.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return depth
