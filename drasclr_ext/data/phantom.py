"""Synthetic chest CT phantoms with emphysema subtypes and exact ground truth.

Geometry: arrays are (X, Y, Z) stored in DICOM (LPS) index order, i.e. index x grows toward the patient's left,
y toward posterior, z toward the head, so the RAS affine is ``diag(-sx, -sy, sz)`` plus an origin; this is what
MONAI's ``LoadImage`` returns for a usual axial CT series. Anatomy is defined analytically in a *body frame* (mm,
x to the patient's left, y posterior, z up from the lowest point of the lungs) and evaluated with numpy broadcasting,
so nothing loops over voxels.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from drasclr_ext.errors import DrasCLRError, InputImageError

__all__ = [
    "SEVERITY_CLASSES",
    "canonical_lung_mask",
    "draw_subject",
    "generate_phantom",
    "write_phantom_cohort",
    "PhantomSubject",
]

# ---------------------------------------------------------------------------------------------------------------
# Lung shape of the average adult (body frame, mm)
# ---------------------------------------------------------------------------------------------------------------

_LUNG_HEIGHT = 262.0  # lowest costophrenic recess to apex
_LUNG_HALF_WIDTH = 66.0  # lateral-medial semi-axis of one lung at its widest
_LUNG_HALF_DEPTH = 95.0  # anterior-posterior semi-axis
_LUNG_CENTRE_X = 78.0  # |x| of a lung's centre
_LUNG_CENTRE_Y = 14.0  # slightly posterior
_SUPERELLIPSE_P = 2.2
_CANONICAL_MARGIN_MM = 12.0


def _lung_cross_section(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-height scale, |centre x| and centre y of a lung for relative heights ``t`` (0 base, 1 apex)."""
    above = np.clip((t - 0.38) / 0.62, 0.0, 1.0)
    below = np.clip((0.38 - t) / 0.38, 0.0, 1.0)
    scale = np.where(t < 0.0, 0.0, np.clip(1.0 - above**2, 0.0, 1.0) ** 0.65 * (1.0 + 0.07 * below))
    scale_ap = np.clip(1.0 - above**2.2, 0.0, 1.0) ** 0.55
    centre_x = _LUNG_CENTRE_X - 22.0 * above
    centre_y = _LUNG_CENTRE_Y + 22.0 * above
    return scale, scale_ap, centre_x, centre_y


def _lung_labels_body_frame(x: np.ndarray, y: np.ndarray, z: np.ndarray, height: float = _LUNG_HEIGHT) -> np.ndarray:
    """Lung labels (1 right, 2 left) of the average subject at body-frame coordinates (broadcastable arrays, mm)."""
    t = z / height
    scale, scale_ap, centre_x, centre_y = _lung_cross_section(t)
    ax = np.abs(x)
    labels = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.uint8)
    for label, side, width in ((1, -1.0, 1.04), (2, 1.0, 1.0)):
        half_w = _LUNG_HALF_WIDTH * width * scale + 1e-3
        half_d = _LUNG_HALF_DEPTH * scale_ap + 1e-3
        v = np.abs(y - centre_y) / half_d
        # D-shaped section: the anterior part narrows toward the midline-lateral corner
        front = np.clip((centre_y - y) / half_d, 0.0, 1.0) ** 2
        u = np.abs(ax - (centre_x + 10.0 * front) * width) / (half_w * (1.0 - 0.22 * front))
        inside = (u**_SUPERELLIPSE_P + v**_SUPERELLIPSE_P) < 1.0
        inside &= ((side * x) > 0) & (t < 1.0)
        # diaphragm dome: higher on the right (liver), lowest in the posterior-lateral recess
        dome_top = 58.0 if label == 1 else 48.0
        r2 = ((ax - 66.0) / 78.0) ** 2 + ((y + 10.0) / 95.0) ** 2
        floor = dome_top * np.clip(1.0 - r2, 0.0, None) - 16.0 * (y - centre_y) / _LUNG_HALF_DEPTH + 16.0
        inside &= z > floor
        labels[inside] = label
    labels[_mediastinum_body_frame(x, y, z, height)] = 0
    return labels


def _mediastinum_body_frame(x: np.ndarray, y: np.ndarray, z: np.ndarray, height: float = _LUNG_HEIGHT) -> np.ndarray:
    """Everything between the lungs: junction lines, heart, great vessels and trachea, aorta, spine."""
    t = z / height
    med = np.abs(x) < 7.0  # anterior/posterior junction lines
    # upper mediastinum (great vessels, trachea, oesophagus), widening toward the heart
    half_w = 24.0 + 10.0 * np.clip((0.75 - t) / 0.2, 0.0, 1.0)
    med = med | ((((x - 4.0) / half_w) ** 2 + ((y + 8.0) / 46.0) ** 2) < 1.0) & (t > 0.45)
    # heart: an ellipsoid bulging into the left lung, resting on the diaphragm
    heart = ((x - 22.0) / 64.0) ** 2 + ((y + 26.0) / 56.0) ** 2 + ((z - 0.3 * height) / 56.0) ** 2 < 1.0
    med = med | heart
    # descending aorta (left of the spine) and the spine with the paravertebral gutters behind it
    med = med | (((x - 22.0) ** 2 + (y - 42.0) ** 2) < 15.0**2) & (t < 0.72)
    med = med | (((x**2) + (y - 76.0) ** 2) < 24.0**2)
    med = med | ((np.abs(x) < 14.0) & (y > 60.0))
    return med


def _diag_affine(spacing: tuple[float, float, float], origin_world: np.ndarray) -> np.ndarray:
    """RAS affine of an LPS-ordered grid with the given spacing and the RAS world position of voxel (0, 0, 0)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin_world
    return affine


def canonical_lung_mask(spacing_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Lungs of the generator's average adult: uint8 labels (1 right, 2 left) and their RAS affine.

    The grid is the lungs' bounding box plus a 12 mm margin, LPS-ordered (affine ``diag(-s, -s, s)``); world z = 0
    lies at the lung bases.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    # evaluate on a generous box, then crop to the lungs' bounding box plus the margin
    lo = np.array([-190.0, -110.0, -5.0])
    hi = np.array([190.0, 140.0, _LUNG_HEIGHT + 5.0])
    axes = [lo[d] + spacing_mm * np.arange(int(np.ceil((hi[d] - lo[d]) / spacing_mm)) + 1) for d in range(3)]
    labels = _lung_labels_body_frame(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    nz = np.argwhere(labels > 0)
    margin = int(round(_CANONICAL_MARGIN_MM / spacing_mm))
    first = nz.min(0) - margin
    last = nz.max(0) + margin + 1
    pad_before = np.maximum(-first, 0)
    first = np.maximum(first, 0)
    labels = labels[first[0] : last[0], first[1] : last[1], first[2] : last[2]]
    pad_after = np.array(np.maximum(last - np.array(first) - np.array(labels.shape), 0))
    labels = np.pad(labels, list(zip(pad_before, pad_after)))
    corner = np.array([axes[d][first[d]] for d in range(3)]) - pad_before * spacing_mm
    # body frame (L, P, S) -> RAS world: x_ras = -x_b, y_ras = -y_b, z_ras = z_b
    affine = _diag_affine((spacing_mm,) * 3, np.array([-corner[0], -corner[1], corner[2]]))
    return labels, affine


# ---------------------------------------------------------------------------------------------------------------
# Subject parameters
# ---------------------------------------------------------------------------------------------------------------

SEVERITY_CLASSES = ("healthy", "mild", "moderate", "severe")
_SEVERITY_PROBS = (0.3, 0.25, 0.25, 0.2)
# total emphysema volume fraction of the lung drawn per class
_SEVERITY_RANGES = {"healthy": (0.0, 0.0), "mild": (0.02, 0.06), "moderate": (0.06, 0.16), "severe": (0.32, 0.5)}
# subtype mixes (CLE, PSE, PLE shares) and their probabilities
_SUBTYPE_MIXES = {
    "centrilobular": ((1.0, 0.0, 0.0), 0.45),
    "paraseptal": ((0.0, 1.0, 0.0), 0.12),
    "panlobular": ((0.0, 0.0, 1.0), 0.15),
    "centrilobular+paraseptal": ((0.75, 0.25, 0.0), 0.18),
    "centrilobular+panlobular": ((0.6, 0.0, 0.4), 0.10),
}
_SLICE_THICKNESSES = (0.625, 1.0, 1.25, 2.0, 2.5)
_SLICE_PROBS = (0.2, 0.3, 0.2, 0.1, 0.2)
_MAX_PSE_FRACTION = 0.08  # subpleural cysts in one layer cannot fill more of the lung
_HU_AIR = -1000.0


@dataclass
class PhantomSubject:
    """Everything random about one phantom subject (drawn by :func:`draw_subject`)."""

    seed: int
    severity: str
    subtype_mix: str
    emphysema_fraction: float  # target fraction of lung volume, all subtypes together
    kernel: str  # "smooth" or "sharp"
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]  # lateral, anterior-posterior, height (inspiration) scale of the anatomy
    offset_mm: tuple[float, float, float]  # position of the subject in the field of view
    inspiration: float  # 0 shallow .. 1 full inspiration
    fat_mm: float  # subcutaneous fat thickness
    noise_hu: float  # noise standard deviation
    targets: dict[str, float] = field(default_factory=dict)  # per-subtype target fractions


def draw_subject(
    seed: int,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    severity: str | None = None,
    subtypes: str | None = None,
    kernel: str | None = None,
    resolution_scale: float = 2.0,
) -> PhantomSubject:
    """Draw the parameters of subject ``seed``; given arguments override the draws.

    ``resolution_scale`` multiplies the drawn scanner spacing (0.6-0.8 mm in-plane, 0.625-2.5 mm slices): the default
    2 gives CI-sized volumes of about 256 x 256 x 64..256 voxels, 1 gives 512-matrix scans.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    sev = severity if severity is not None else str(rng.choice(SEVERITY_CLASSES, p=_SEVERITY_PROBS))
    if sev not in SEVERITY_CLASSES:
        raise DrasCLRError(f"unknown severity {sev!r}: use one of {SEVERITY_CLASSES}")
    names = list(_SUBTYPE_MIXES)
    mix_name = subtypes if subtypes is not None else str(rng.choice(names, p=[_SUBTYPE_MIXES[k][1] for k in names]))
    if mix_name not in _SUBTYPE_MIXES:
        raise DrasCLRError(f"unknown subtype mix {mix_name!r}: use one of {names}")
    lo, hi = _SEVERITY_RANGES[sev]
    frac = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    shares = _SUBTYPE_MIXES[mix_name][0]
    targets = {"centrilobular": frac * shares[0], "paraseptal": frac * shares[1], "panlobular": frac * shares[2]}
    if targets["paraseptal"] > _MAX_PSE_FRACTION:  # a single subpleural layer: give the excess to CLE
        targets["centrilobular"] += targets["paraseptal"] - _MAX_PSE_FRACTION
        targets["paraseptal"] = _MAX_PSE_FRACTION
    ker = kernel if kernel is not None else str(rng.choice(("smooth", "sharp"), p=(0.6, 0.4)))
    if ker not in ("smooth", "sharp"):
        raise DrasCLRError(f"unknown kernel {ker!r}: use 'smooth' or 'sharp'")
    scale_lr = float(rng.uniform(0.88, 1.05))
    inspiration = float(rng.uniform(0.6, 1.0))
    scale = (scale_lr, scale_lr * float(rng.uniform(0.93, 1.07)), scale_lr * (0.9 + 0.12 * inspiration))
    offset = (float(rng.uniform(-12, 12)), float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10)))
    fat = float(rng.uniform(3.0, 20.0))
    noise = float(rng.uniform(20.0, 30.0) if ker == "smooth" else rng.uniform(22.0, 30.0))
    in_plane = float(rng.uniform(0.6, 0.8)) * resolution_scale
    thick = float(rng.choice(_SLICE_THICKNESSES, p=_SLICE_PROBS)) * resolution_scale
    fov = np.array([2 * (168.0 + fat) * scale_lr + 24.0, 2 * (168.0 + fat) * scale_lr + 24.0, 300.0 * scale[2]])
    if spacing is not None:
        sp = tuple(float(v) for v in spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise DrasCLRError(f"spacing must be three positive numbers in mm, got {spacing}")
    elif shape is not None:
        in_plane = float(max(fov[0] / shape[0], fov[1] / shape[1]))
        sp = (in_plane, in_plane, float(fov[2] / shape[2]))
    else:
        sp = (in_plane, in_plane, thick)
    if shape is not None:
        shp = tuple(int(v) for v in shape)
        if len(shp) != 3 or min(shp) < 8:
            raise DrasCLRError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    else:
        shp = tuple(int(np.ceil(fov[d] / sp[d])) for d in range(3))
    return PhantomSubject(
        seed=int(seed),
        severity=sev,
        subtype_mix=mix_name if frac > 0 else "none",
        emphysema_fraction=frac,
        kernel=ker,
        spacing=sp,
        shape=shp,
        scale=scale,
        offset_mm=offset,
        inspiration=inspiration,
        fat_mm=fat,
        noise_hu=noise,
        targets=targets,
    )


# ---------------------------------------------------------------------------------------------------------------
# Rendering helpers
# ---------------------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], corr_mm: float):
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


class _Grid:
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
        return _diag_affine(tuple(self.spacing), np.array([-self.origin[0], -self.origin[1], self.origin[2]]))


def _paint_capsules(
    volume: np.ndarray, grid: _Grid, p0: np.ndarray, p1: np.ndarray, radius: np.ndarray, pv_width: float | None = None
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


def _partition_tree(
    rng: np.random.Generator, root: np.ndarray, points: np.ndarray, root_radius: float, min_radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Space-filling vessel tree by recursive point-set partition; calibres follow Murray's law (r ~ n^(1/3)).

    Returns segment starts, ends (mm) and radii.
    """
    starts, ends, radii = [], [], []
    n_total = len(points)
    stack = [(root, points, root_radius)]
    while stack:
        start, pts, r = stack.pop()
        centroid = pts.mean(0)
        if len(pts) < 3 or r < min_radius:
            starts.append(start)
            ends.append(centroid if len(pts) > 1 else pts[0])
            radii.append(r)
            continue
        frac = float(rng.uniform(0.35, 0.6)) if len(pts) < n_total else 0.3
        end = start + frac * (centroid - start)
        starts.append(start)
        ends.append(end)
        radii.append(r)
        centred = pts - centroid
        _, vecs = np.linalg.eigh(centred.T @ centred)
        side = centred @ vecs[:, -1] > 0
        for part in (pts[side], pts[~side]):
            if len(part):
                stack.append((end, part, root_radius * (len(part) / n_total) ** (1.0 / 3.0)))
    return np.array(starts), np.array(ends), np.array(radii)


def _sample_points(rng: np.random.Generator, mask: np.ndarray, grid: _Grid, n: int) -> np.ndarray:
    """``n`` random points (mm, jittered within their voxel) inside ``mask``."""
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return np.zeros((0, 3))
    pick = rng.choice(idx, size=min(n, len(idx)), replace=False)
    ijk = np.stack(np.unravel_index(pick, mask.shape), axis=1).astype(float)
    ijk += rng.uniform(-0.5, 0.5, ijk.shape)
    return grid.to_mm(ijk)


def _relative_height(lung: np.ndarray, grid: _Grid) -> np.ndarray:
    """Per voxel, height within its own lung: 0 at the lung's lowest slice, 1 at its highest (0 outside)."""
    h = np.zeros(lung.shape, dtype=np.float32)
    for label in (1, 2):
        zs = np.flatnonzero((lung == label).any(axis=(0, 1)))
        if len(zs) == 0:
            continue
        rel = np.clip((np.arange(lung.shape[2]) - zs[0]) / max(zs[-1] - zs[0], 1), 0, 1).astype(np.float32)
        h = np.where(lung == label, rel[None, None, :], h)
    return h


def _depth_mm(lung: np.ndarray, spacing: np.ndarray, target_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) to the pleura on a coarse grid (~3 mm) and that grid's subsampling factors."""
    step = np.maximum(1, np.round(target_mm / spacing)).astype(int)
    coarse = lung[:: step[0], :: step[1], :: step[2]] > 0
    return ndi.distance_transform_edt(coarse, sampling=spacing * step).astype(np.float32), step


def _lookup(coarse: np.ndarray, step: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Values of a coarse grid at fine voxel indices (nearest)."""
    c = np.clip(np.round(index / step).astype(int), 0, np.array(coarse.shape) - 1)
    return coarse[c[:, 0], c[:, 1], c[:, 2]]


# ---------------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------------


def _template_lungs(template, xl: np.ndarray, yl: np.ndarray, zl: np.ndarray) -> np.ndarray:
    """Sample a given lung mask (path or ``(array, affine)``) at lung-frame coordinates; labels become 1 right/2 left.

    The template's lungs are centred left-right and front-back on the body axis with their lowest point at z = 0.
    """
    if isinstance(template, (str, os.PathLike)):
        import nibabel as nib

        img = nib.load(str(template))
        mask, affine = np.asarray(img.dataobj), img.affine
    else:
        mask, affine = np.asarray(template[0]), np.asarray(template[1], dtype=float)
    if mask.ndim != 3 or not np.any(mask):
        raise InputImageError(
            "the lung template must be a 3D mask with lungs; pass a lung mask NIfTI or (array, affine)"
        )
    lin = affine[:3, :3]
    if np.count_nonzero(np.abs(lin) > 1e-6 * np.abs(lin).max()) != 3 or np.any(np.abs(np.diag(lin)) < 1e-9):
        raise InputImageError("the lung template must be axis-aligned (diagonal affine); resample it first")
    spacing, origin = np.diag(lin), affine[:3, 3]
    nz = np.argwhere(mask > 0)
    world = nz * spacing + origin
    centre = world.mean(0)
    zmin = world[:, 2].min()
    # body frame (L, P, S) -> template RAS world -> template index, axis by axis (nearest neighbour)
    ix = np.round((-xl.ravel() + centre[0] - origin[0]) / spacing[0]).astype(int)
    iy = np.round((-yl.ravel() + centre[1] - origin[1]) / spacing[1]).astype(int)
    iz = np.round((zl.ravel() + zmin - origin[2]) / spacing[2]).astype(int)
    valid = [(i >= 0) & (i < n) for i, n in zip((ix, iy, iz), mask.shape)]
    sub = mask[
        np.ix_(np.clip(ix, 0, mask.shape[0] - 1), np.clip(iy, 0, mask.shape[1] - 1), np.clip(iz, 0, mask.shape[2] - 1))
    ]
    sub = sub * (valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :])
    out = np.zeros(sub.shape, dtype=np.uint8)
    labels = [v for v in np.unique(mask) if v != 0]
    if len(labels) >= 2:
        for v in labels:  # a label whose centroid lies at RAS x above the body centre is the right lung
            cx = (np.argwhere(mask == v)[:, 0] * spacing[0] + origin[0]).mean()
            out[sub == v] = 1 if cx > centre[0] else 2
    else:
        out[sub > 0] = 2
        out[(sub > 0) & (xl < 0)] = 1
    return out


def _body_anatomy(xl, yl, zl, lungs: np.ndarray, subject: PhantomSubject) -> tuple[np.ndarray, np.ndarray]:
    """Clean HU of everything but the lung parenchyma, and the thorax soft-tissue mask where vessels may run."""
    height = _LUNG_HEIGHT
    t = np.clip(zl / height, -1.0, 1.2)
    scale, scale_ap, centre_x, centre_y = _lung_cross_section(np.clip(t, 0.0, 0.999))
    scale = np.where(t < 0.38, np.maximum(scale, 1.0), scale)
    half_w = centre_x + _LUNG_HALF_WIDTH * 1.07 * scale + 2.0  # lateral edge of the thoracic cavity
    half_d = _LUNG_HALF_DEPTH * np.where(t < 0.38, 1.0, scale_ap) + 2.0
    cy = np.where(t < 0.38, _LUNG_CENTRE_Y, centre_y)
    # above the apices the cavity closes into the neck/shoulder girdle
    half_w = np.maximum(half_w, 60.0)
    half_d = np.maximum(half_d, 55.0)
    rho = ((np.abs(xl) / half_w) ** 2.4 + (np.abs(yl - cy) / half_d) ** 2.4) ** (1 / 2.4)
    fat = subject.fat_mm / subject.scale[0]
    body_w, body_d = 168.0 + fat, 114.0 + 0.6 * fat
    body_rho = ((np.abs(xl) / body_w) ** 2.2 + (np.abs(yl - 14.0) / body_d) ** 2.2) ** (1 / 2.2)
    body_core = ((np.abs(xl) / (body_w - fat)) ** 2.2 + (np.abs(yl - 14.0) / (body_d - 0.6 * fat)) ** 2.2) ** (1 / 2.2)
    hu = np.full(np.broadcast_shapes(xl.shape, yl.shape, zl.shape), _HU_AIR, dtype=np.float32)
    hu[np.broadcast_to(body_rho < 1.0, hu.shape)] = -100.0  # subcutaneous fat
    hu[np.broadcast_to(body_core < 1.0, hu.shape)] = 45.0  # chest wall muscle
    # couch below the patient
    couch = np.abs(yl - (14.0 + body_d + 22.0 + 0.0006 * xl**2)) < 3.0
    hu[np.broadcast_to(couch & (np.abs(xl) < 230), hu.shape)] = 150.0
    cavity = rho < 1.0
    # ribs: bands around the cavity, descending anteriorly; costal cartilage near the sternum
    phase = np.mod((zl - 0.45 * (yl - cy)) / 27.0, 1.0)
    rib_band = (rho >= 1.01) & (rho < 1.01 + 11.0 / half_w) & (np.abs(phase - 0.5) < 0.17) & (t > 0.05) & (t < 1.05)
    anterior = yl < cy - 0.55 * half_d
    hu[rib_band & ~(anterior & (np.abs(xl) < 45.0))] = 550.0
    hu[rib_band & anterior & (np.abs(xl) < 45.0)] = 120.0
    sternum = (np.abs(xl) < 17.0) & (rho >= 1.0) & (rho < 1.0 + 12.0 / half_d) & (yl < 0) & (t > 0.2) & (t < 0.95)
    hu[np.broadcast_to(sternum, hu.shape)] = 400.0
    # mediastinum and abdomen (inside the cavity, outside the lungs)
    med = _mediastinum_body_frame(xl, yl, zl)
    inner = np.broadcast_to(cavity, hu.shape) & (lungs == 0)
    hu[inner] = 50.0  # liver/abdominal organs under the domes
    hu[inner & med & (t > 0.1)] = -90.0  # mediastinal fat
    heart = ((xl - 22.0) / 62.0) ** 2 + ((yl + 26.0) / 54.0) ** 2 + ((zl - 0.3 * height) / 54.0) ** 2 < 1.0
    hu[heart & (lungs == 0)] = 40.0
    stomach = ((xl - 70.0) / 38.0) ** 2 + ((yl + 5.0) / 30.0) ** 2 + ((zl - 22.0) / 16.0) ** 2 < 1.0
    hu[stomach & inner] = _HU_AIR
    oesophagus = ((xl + 3.0) ** 2 + (yl - 36.0) ** 2 < 8.0**2) & (t > 0.15)
    hu[oesophagus & (lungs == 0)] = 35.0
    # spine: vertebral bodies (cortex, marrow), discs, posterior arches
    vb = xl**2 + (yl - 78.0) ** 2
    disc = np.mod(zl, 26.0) < 5.0
    spine = vb < 22.0**2
    hu[np.broadcast_to(spine, hu.shape)] = 600.0
    hu[np.broadcast_to((vb < 18.0**2) & ~disc, hu.shape)] = 230.0
    hu[np.broadcast_to((vb < 22.0**2) & disc, hu.shape)] = 90.0
    arch = (np.abs(xl) < 40.0) & (yl > 96.0) & (yl < 108.0) & ~disc | (np.abs(xl) < 7.0) & (yl > 96.0) & (yl < 128.0)
    hu[np.broadcast_to(arch, hu.shape)] = 500.0
    thorax = np.broadcast_to(cavity & (t > 0.1), hu.shape) & ((lungs > 0) | med)
    return hu, thorax


def _great_vessels_and_airways(subject_height: float) -> dict[str, np.ndarray]:
    """Capsules (lung frame, mm) of the aorta, pulmonary trunk, trachea and main bronchi."""
    h = subject_height
    aorta = [
        [[10.0, -20.0, 0.42 * h], [8.0, -12.0, 0.72 * h], 15.0],
        [[8.0, -12.0, 0.72 * h], [20.0, 38.0, 0.74 * h], 13.0],
        [[20.0, 38.0, 0.74 * h], [22.0, 42.0, -40.0], 13.0],
        [[14.0, -34.0, 0.42 * h], [22.0, -8.0, 0.56 * h], 14.0],  # pulmonary trunk
    ]
    trachea = [
        [[0.0, 4.0, h + 80.0], [0.0, 6.0, 0.64 * h], 9.0],
        [[0.0, 6.0, 0.64 * h], [-45.0, 10.0, 0.57 * h], 6.5],
        [[0.0, 6.0, 0.64 * h], [42.0, 12.0, 0.55 * h], 6.0],
    ]

    def pack(rows):
        return (
            np.array([r[0] for r in rows], float),
            np.array([r[1] for r in rows], float),
            np.array([r[2] for r in rows], float),
        )

    return {"blood": pack(aorta), "airway": pack(trachea)}


# ---------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------

_ARTERY_ROOTS = {1: (-52.0, 6.0, 0.56), 2: (48.0, 8.0, 0.55)}  # lung frame x, y (mm), relative height
_VEIN_ROOTS = {1: (-38.0, 22.0, 0.38), 2: (36.0, 22.0, 0.37)}


def _coarse_noise(rng: np.random.Generator, shape: Sequence[int], spacing: np.ndarray, corr_mm: float):
    """Smooth coarse noise and the factor mapping fine voxel indices to its indices (for point look-ups)."""
    coarse = [max(2, int(np.ceil(shape[d] * spacing[d] / corr_mm)) + 1) for d in range(3)]
    noise = ndi.gaussian_filter(rng.standard_normal(coarse), 0.8, mode="wrap")
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    return noise, spacing / corr_mm


def _noise_at(noise_and_factor, index: np.ndarray) -> np.ndarray:
    noise, factor = noise_and_factor
    return ndi.map_coordinates(noise, (index * factor).T, order=1, mode="nearest")


def _perpendicular(d: np.ndarray) -> np.ndarray:
    """Unit vectors perpendicular to the rows of ``d`` (toward posterior where possible)."""
    d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
    ref = np.tile([0.0, 1.0, 0.0], (len(d), 1))
    ref[np.abs(d[:, 1]) > 0.9] = [1.0, 0.0, 0.0]
    p = ref - (ref * d).sum(1, keepdims=True) * d
    return p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-9)


def _cle_lesions(rng, lung, ple, grid, depth, step, rel_h, target, lung_ml):
    """Centres (mm) and radii of centrilobular lucency blobs: deep in the lung, upper zones, clustered."""
    r_max = 3.0 + 12.0 * min(target, 0.35)
    mean_vol = 4.0 / 3.0 * np.pi * np.mean(np.linspace(1.5, r_max, 50) ** 3) * 1.35 / 1000.0  # ml
    n = int(np.ceil(target * lung_ml / mean_vol * 1.25))
    cand = _sample_points(rng, lung & ~ple, grid, 8 * n + 64)
    idx = grid.to_index(cand)
    ok = _lookup(depth, step, idx) > 7.0
    cand, idx = cand[ok], idx[ok]
    hz = rel_h[tuple(np.clip(np.round(idx).astype(int), 0, np.array(lung.shape) - 1).T)]
    weight = (0.15 + hz**2.5) * np.exp(1.3 * _noise_at(_coarse_noise(rng, lung.shape, grid.spacing, 35.0), idx))
    n = min(n, len(cand))
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0)
    pick = rng.choice(len(cand), size=n, replace=False, p=weight / weight.sum())
    centres = cand[pick]
    radii = rng.uniform(1.5, r_max, n)
    # two satellite blobs make each lucency irregular
    sat_dir = rng.normal(size=(2 * n, 3))
    sat_dir /= np.linalg.norm(sat_dir, axis=1, keepdims=True)
    sat_c = np.repeat(centres, 2, 0) + sat_dir * 0.8 * np.repeat(radii, 2)[:, None]
    return np.concatenate([centres, sat_c]), np.concatenate([radii, 0.6 * np.repeat(radii, 2)])


def _pse_cysts(rng, lung, grid, depth, step, rel_h, target, lung_ml):
    """Centres (mm) and radii of subpleural cysts in a single layer (touching the pleura, not overlapping)."""
    coarse_lung = depth > 0
    surface = coarse_lung & (depth <= np.max(grid.spacing * step) * 1.01)
    sidx = np.argwhere(surface)
    if len(sidx) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    fine = sidx * step
    hz = rel_h[tuple(np.clip(fine, 0, np.array(lung.shape) - 1).T)]
    patches = _noise_at(_coarse_noise(rng, lung.shape, grid.spacing, 45.0), fine.astype(float))
    weight = (0.05 + np.clip(hz - 0.35, 0, None) ** 2) * np.exp(1.5 * patches)
    r_lo, r_hi = 3.0, 5.0 + 30.0 * min(target, 0.08)
    mean_vol = 4.0 / 3.0 * np.pi * np.mean(np.linspace(r_lo, r_hi, 50) ** 3) / 1000.0
    n_goal = int(np.ceil(target * lung_ml / mean_vol * 1.1))
    order = rng.choice(len(sidx), size=min(len(sidx), 6 * n_goal + 32), replace=False, p=weight / weight.sum())
    gz, gy, gx = np.gradient(depth)[::-1]  # inward normal = gradient of the depth
    centres, radii = [], []
    for k in order:
        if len(centres) >= n_goal:
            break
        c = tuple(sidx[k])
        g = np.array([gx[c], gy[c], gz[c]]) / (grid.spacing * step)
        if not np.all(np.isfinite(g)) or np.linalg.norm(g) < 1e-6:
            continue
        g /= np.linalg.norm(g)
        r = float(rng.uniform(r_lo, r_hi))
        centre = grid.to_mm(sidx[k] * step.astype(float)) + g * (r - 0.5 * float(np.min(grid.spacing * step)))
        if centres:
            dist = np.linalg.norm(np.array(centres) - centre, axis=1)
            if np.any(dist < 0.85 * (np.array(radii) + r)):
                continue
        centres.append(centre)
        radii.append(r)
    return np.array(centres).reshape(-1, 3), np.array(radii)


def generate_phantom(
    seed: int,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    *,
    severity: str | None = None,
    subtypes: str | None = None,
    kernel: str | None = None,
    resolution_scale: float = 2.0,
    lung_template: Any = None,
) -> dict[str, Any]:
    """Generate one synthetic chest CT with emphysema and its exact ground truth; deterministic per ``seed``.

    Args:
        seed: subject seed; every random choice derives from it.
        shape: voxels (X, Y, Z); default from the subject's field of view and spacing.
        spacing: mm (X, Y, Z); default drawn per subject (see :func:`draw_subject`), or fitted to ``shape``.
        severity: force "healthy", "mild", "moderate" or "severe" (default drawn: 30/25/25/20 %).
        subtypes: force a subtype mix, e.g. "centrilobular", "paraseptal", "panlobular", "centrilobular+paraseptal".
        kernel: force the reconstruction kernel, "smooth" or "sharp".
        resolution_scale: multiplies the drawn scanner spacing (2: CI-sized, 1: full 512-matrix resolution).
        lung_template: a lung mask to take the lungs' shape from (NIfTI path or ``(array, affine)``).

    Returns:
        dict with ``image`` (float32 HU, X,Y,Z), ``label`` (uint8: 0 outside lung, 1 normal, 2 centrilobular,
        3 paraseptal, 4 panlobular), ``lung_mask`` (uint8: 1 right, 2 left; airway lumen excluded), ``affine`` (4x4 RAS)
        and ``info`` (subject parameters and the clinical measures of the final image, see ``emphysema_report``).
    """
    from drasclr_ext.metrics.emphysema import emphysema_report

    subject = draw_subject(seed, shape, spacing, severity, subtypes, kernel, resolution_scale)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC7]))
    sp = np.asarray(subject.spacing, float)
    shp = subject.shape
    s = np.asarray(subject.scale, float)
    off = np.asarray(subject.offset_mm, float)
    z0 = -(shp[2] * sp[2] - _LUNG_HEIGHT * s[2]) * 0.55 + off[2]
    centre_index = np.array([(shp[0] - 1) / 2 + off[0] / sp[0], (shp[1] - 1) / 2 + (off[1] - 14.0 * s[1]) / sp[1]])
    grid = _Grid(shp, sp, centre_index, z0)
    xb, yb, zb = grid.coords()
    xl, yl, zl = xb / np.float32(s[0]), yb / np.float32(s[1]), zb / np.float32(s[2])
    if lung_template is not None:
        lungs = _template_lungs(lung_template, xl, yl, zl)
    else:
        lungs = _lung_labels_body_frame(xl, yl, zl)
    if not np.any(lungs == 1) or not np.any(lungs == 2):
        raise DrasCLRError(
            f"shape {shp} with spacing {tuple(sp)} mm does not hold both lungs: enlarge the field of view"
        )
    lung = lungs > 0
    voxel_ml = float(np.prod(sp)) / 1000.0
    lung_ml = float(lung.sum()) * voxel_ml
    hu, thorax = _body_anatomy(xl, yl, zl, lungs, subject)
    rel_h = _relative_height(lungs, grid)
    depth, step = _depth_mm(lungs, sp)

    # normal parenchyma: denser posteriorly (gravity) and at shallow inspiration, with a faint texture
    texture = _smooth_field(rng, shp, sp, 6.0)
    # severe emphysema comes with hyperinflation: the remaining lung is less dense too
    base = -880.0 + 45.0 * (1.0 - subject.inspiration) - 35.0 * min(subject.emphysema_fraction / 0.3, 1.0)
    parenchyma = base + 28.0 * np.clip(yl / 95.0, -1.0, 1.0) + 9.0 * texture
    targets = subject.targets

    # panlobular: diffuse lower-zone regions chosen by a smooth score, sized exactly to the target fraction
    ple = np.zeros(shp, dtype=bool)
    if targets["panlobular"] > 0:
        score = _smooth_field(rng, shp, sp, 30.0) + 3.0 * (1.0 - rel_h)
        thr = np.quantile(score[lung], 1.0 - targets["panlobular"])
        ple = lung & (score > thr)
        del score
    cle = np.zeros(shp, dtype=np.float32)
    achieved = 0.0
    for _ in range(4):  # lucencies overlap: add more until the target fraction is (nearly) reached
        deficit = targets["centrilobular"] - achieved
        if deficit <= 0.1 * targets["centrilobular"] or deficit <= 0:
            break
        c, r = _cle_lesions(rng, lung, ple, grid, depth, step, rel_h, deficit, lung_ml)
        _paint_capsules(cle, grid, c, c, r)
        achieved = float(np.count_nonzero((cle >= 0.5) & lung & ~ple)) / max(int(lung.sum()), 1)
    pse_outer = np.zeros(shp, dtype=np.float32)
    pse_lumen = np.zeros(shp, dtype=np.float32)
    if targets["paraseptal"] > 0:
        c, r = _pse_cysts(rng, lung, grid, depth, step, rel_h, targets["paraseptal"], lung_ml)
        wall = 0.5
        _paint_capsules(pse_outer, grid, c, c, r)
        _paint_capsules(pse_lumen, grid, c, c, r - wall)

    # vessel trees (arteries and veins per lung), bronchi alongside the larger arteries, great vessels, trachea
    vessels = np.zeros(shp, dtype=np.float32)
    aw_outer = np.zeros(shp, dtype=np.float32)
    aw_lumen = np.zeros(shp, dtype=np.float32)
    mean_scale = float(np.cbrt(np.prod(s)))
    for label in (1, 2):
        for roots, n_points, r0, is_artery in ((_ARTERY_ROOTS, 1500, 6.5, True), (_VEIN_ROOTS, 1200, 6.0, False)):
            rx, ry, rz = roots[label]
            root = np.array([rx * s[0], ry * s[1], rz * _LUNG_HEIGHT * s[2]])
            # coarse grids cannot show the finest vessels: fewer end points (thicker terminal branches)
            n_points = int(n_points * np.clip((1.5 / float(np.mean(sp[:2]))) ** 2, 0.1, 1.0))
            pts = _sample_points(rng, lungs == label, grid, n_points)
            a, b, r = _partition_tree(rng, root, pts, r0 * mean_scale, 0.45)
            if ple.any():  # vessel pruning: thin vessels vanish and larger ones narrow in panlobular lung
                ends = np.clip(np.round(grid.to_index(b)).astype(int), 0, np.array(shp) - 1)
                in_ple = ple[tuple(ends.T)]
                keep = ~(in_ple & (r < 1.3))
                r = np.where(in_ple, 0.7 * r, r)
                a, b, r = a[keep], b[keep], r[keep]
            _paint_capsules(vessels, grid, a, b, r)
            if is_artery:
                big = r >= 1.4
                rb = 0.75 * r[big]
                wall_b = 0.2 * rb + 0.4
                shift = _perpendicular(b[big] - a[big]) * (r[big] + rb + wall_b)[:, None]
                _paint_capsules(aw_outer, grid, a[big] + shift, b[big] + shift, rb + wall_b)
                _paint_capsules(aw_lumen, grid, a[big] + shift, b[big] + shift, rb)
    central = _great_vessels_and_airways(_LUNG_HEIGHT)
    a, b, r = central["blood"]
    _paint_capsules(vessels, grid, a * s, b * s, r * mean_scale)
    a, b, r = central["airway"]
    _paint_capsules(aw_outer, grid, a * s, b * s, (r + 2.0) * mean_scale)
    _paint_capsules(aw_lumen, grid, a * s, b * s, r * mean_scale)

    # compose the clean image
    if ple.any():
        w = ndi.gaussian_filter(ple.astype(np.float32), 2.0 / sp) * lung
        parenchyma = parenchyma * (1 - w) + (-972.0 + 6.0 * texture) * w
    parenchyma = parenchyma * (1 - cle) + np.float32(-992.0) * cle
    parenchyma = parenchyma * (1 - pse_outer) + np.float32(-250.0) * pse_outer
    parenchyma = parenchyma * (1 - pse_lumen) + np.float32(-990.0) * pse_lumen
    hu = np.where(lung, parenchyma, hu)
    del parenchyma, texture
    v = vessels * thorax
    hu = hu * (1 - v) + np.float32(40.0) * v
    hu = hu * (1 - aw_outer) + np.float32(30.0) * aw_outer
    hu = hu * (1 - aw_lumen) + np.float32(_HU_AIR) * aw_lumen
    del v, vessels, aw_outer

    # scanner: point spread (slice profile along z), kernel, correlated noise
    psf_mm = 0.55 if subject.kernel == "smooth" else 0.4
    sigma = np.array([psf_mm / sp[0], psf_mm / sp[1], 0.42 * 1.0])  # slice profile ~ one slice FWHM
    hu = ndi.gaussian_filter(hu, sigma)
    if subject.kernel == "sharp":
        hu = hu + 0.3 * (hu - ndi.gaussian_filter(hu, 1.2 / sp))
    noise = ndi.gaussian_filter(rng.standard_normal(shp, dtype=np.float32), (0.6, 0.6, 0.3))
    noise *= np.float32(subject.noise_hu / (noise.std() + 1e-6))
    image = np.round(np.clip(hu + noise, -1024.0, 3071.0)).astype(np.float32)  # integer HU, as scanners store
    del hu, noise

    # ground truth: lesion voxels are those mostly destroyed as the scanner sees them (the lucency's share of the
    # voxel's slab, through the same point spread), so thick slices do not label mostly intact tissue
    lung_mask = np.where(aw_lumen >= 0.5, 0, lungs).astype(np.uint8)
    in_lung = lung_mask > 0
    label = in_lung.astype(np.uint8)
    label[ple & in_lung] = 4
    label[(ndi.gaussian_filter(cle, sigma) >= 0.5) & in_lung] = 2
    label[(ndi.gaussian_filter(pse_lumen, sigma) >= 0.5) & in_lung] = 3
    affine = grid.affine()
    info = {"case": f"phantom_{int(seed):05d}", "subject": _jsonable(asdict(subject))}
    info.update(emphysema_report(image, lung_mask, affine, label))
    return {"image": image, "label": label, "lung_mask": lung_mask, "affine": affine, "info": info}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Cohort writer
# ---------------------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then move it into place."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    _atomic_write_bytes(path, lambda tmp: nib.save(img, tmp))


def _case_files(out: Path, case: str) -> dict[str, Path]:
    return {
        "image": out / f"{case}_image.nii.gz",
        "label": out / f"{case}_label.nii.gz",
        "lung": out / f"{case}_lung.nii.gz",
        "info": out / f"{case}.json",
    }


def _write_case(out: Path, case_seed: int, options: dict[str, Any]) -> str:
    case = f"phantom_{case_seed:05d}"
    files = _case_files(out, case)
    if all(f.exists() for f in files.values()):
        return case
    result = generate_phantom(case_seed, **options)
    _save_nifti(files["image"], result["image"], result["affine"], np.int16)
    _save_nifti(files["label"], result["label"], result["affine"], np.uint8)
    _save_nifti(files["lung"], result["lung_mask"], result["affine"], np.uint8)
    text = json.dumps(_jsonable(result["info"]), indent=1)  # written last: its presence marks a complete case
    _atomic_write_bytes(files["info"], lambda tmp: Path(tmp).write_text(text))
    return case


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_val = int(round(n * val_fraction)) if n >= 3 else 0
    n_test = int(round(n * test_fraction)) if n >= 3 else 0
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    return n - n_val - n_test, n_val, n_test


def write_phantom_cohort(
    out: str | os.PathLike,
    n: int = 4,
    seed: int = 0,
    workers: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    datalist_name: str = "datalist.json",
    **options: Any,
) -> str:
    """Write ``n`` phantoms (seeds ``seed`` .. ``seed + n - 1``) and a MONAI datalist; resumable.

    Per case: ``<case>_image.nii.gz`` (int16 HU), ``<case>_label.nii.gz`` (emphysema labels), ``<case>_lung.nii.gz``
    (lungs 1 right/2 left) and ``<case>.json`` (ground truth). Cases already written are skipped. The datalist
    ``{"training", "validation", "test"}`` holds ``image``/``label``/``lung``/``info`` paths relative to ``out``.
    ``options`` go to :func:`generate_phantom` (shape, spacing, severity, subtypes, kernel, resolution_scale, ...).
    Returns the datalist path.
    """
    from tqdm.auto import tqdm

    if int(n) < 1:
        raise DrasCLRError(f"n must be at least 1, got {n}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) + i for i in range(int(n))]
    if int(workers) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(int(workers)) as pool:
            futures = [pool.submit(_write_case, out_dir, s, options) for s in seeds]
            cases = [f.result() for f in tqdm(futures, desc="phantoms", unit="case")]
    else:
        cases = [_write_case(out_dir, s, options) for s in tqdm(seeds, desc="phantoms", unit="case")]
    n_train, n_val, _ = _split_counts(len(cases), val_fraction, test_fraction)
    entries = [{k: v.name for k, v in _case_files(out_dir, c).items()} for c in cases]
    datalist = {
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    path = out_dir / datalist_name
    text = json.dumps(datalist, indent=1)
    _atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
    return str(path)
