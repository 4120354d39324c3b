"""Insert synthetic emphysema lesions of each subtype into a real chest CT, with an exact truth map.

The lesions follow the phantom generator (:mod:`drasclr_ext.data.phantom`): centrilobular (CLE) lucencies without
walls, deep in the upper zones; paraseptal (PSE) subpleural cysts with a thin wall in one layer along the upper-zone
pleura; panlobular (PLE) diffusely darker lower-zone lung with its small vessels pruned. Everything is computed in
world millimetres through the scan's affine (any orientation). Each voxel's lesion fraction is sampled at several
heights along the slice axis (a 1.5 mm lucency fills only part of a 5 mm slice), HU are blended by that fraction
and the scan's own lung noise is added back where HU were replaced. Only parenchyma is replaced: vessels and walls
(HU above about -600) and everything outside the lung mask keep their HU (except the pruned vessels of PLE), and
CLE/PSE sites over vessels, airways or existing lucencies are not used. The truth map marks lung voxels at least
half replaced by a lesion, as the phantom's ground truth does.

Modules: ``lesion_geometry`` (world millimetres, partial volumes), ``lesion_sites`` (where each subtype goes),
``lung_noise`` (the scan's noise, measured and synthesised); here the painting and the report of each region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from scipy import ndimage as ndi

from drasclr_ext.data.lesion_geometry import ScanGeometry, lung_depth_mm
from drasclr_ext.data.lesion_sites import (
    CLE,
    PLE,
    PSE,
    Placement,
    parenchyma_weight,
    place_cle,
    place_ple,
    place_pse,
)
from drasclr_ext.data.lung_noise import lung_noise, noise_field
from drasclr_ext.geometry import mask_bounding_box

__all__ = ["SUBTYPE_NAMES", "insert_lesions", "lung_noise"]

SUBTYPE_NAMES = {CLE: "centrilobular", PSE: "paraseptal", PLE: "panlobular"}
LUNG_NAMES = {1: "right", 2: "left"}
CLE_HU, PSE_LUMEN_HU, PSE_WALL_HU, PLE_HU = -992.0, -990.0, -250.0, -970.0
PSE_WALL_MM = 0.5


@dataclass(frozen=True)
class _Settings:
    """The lesion settings of :func:`insert_lesions`."""

    cle_clusters_per_lung: int
    cle_min_depth_mm: float
    pse_cysts_per_lung: int
    ple_fraction: tuple[float, float]
    ple_edge_mm: float
    ple_prune_radius_mm: float


def insert_lesions(
    hu: np.ndarray,
    affine: np.ndarray,
    lung_mask: np.ndarray,
    seed: int = 0,
    *,
    cle_clusters_per_lung: int = 2,
    cle_min_depth_mm: float = 10.0,
    pse_cysts_per_lung: int = 3,
    ple_fraction: tuple[float, float] = (0.05, 0.10),
    ple_edge_mm: float = 1.5,
    ple_prune_radius_mm: float = 1.5,
    noise: Optional[tuple[float, float]] = None,
) -> dict[str, Any]:
    """Insert CLE, PSE and PLE lesions into a CT (deterministic per ``seed``).

    Args:
        hu: CT in HU, (X, Y, Z).
        affine: its 4x4 voxel-to-world (RAS, mm) matrix; any orientation.
        lung_mask: lung labels on the same grid (1 right, 2 left; any nonzero label is a lung).
        seed: every random choice derives from it.
        cle_clusters_per_lung: CLE clusters per lung (6-10 blobs of radius 1.5-5 mm, -992 HU, within 8 mm).
        cle_min_depth_mm: least distance of every CLE blob to the lung surface.
        pse_cysts_per_lung: PSE cysts per lung (outer radius 3-7 mm, 0.5 mm wall of -250 HU, -990 HU lumen).
        ple_fraction: range of the PLE region's share of its lung (drawn uniformly).
        ple_edge_mm: Gaussian sigma of the PLE region's blended edge.
        ple_prune_radius_mm: vessels thinner than this (radius) vanish in PLE (grey opening); larger ones lose a voxel
            of radius (grey erosion).
        noise: (HU standard deviation, in-plane correlation width in voxels) of the noise added where HU were replaced;
            default measured on the scan's lung by :func:`lung_noise`.

    Returns:
        dict with ``image`` (float32 HU, whole numbers, same shape), ``truth`` (uint8: 0 untouched or outside the
        lung, 2 CLE, 3 PSE, 4 PLE: lung voxels at least half replaced by the lesion), ``region_map`` (uint16: i + 1
        on the truth voxels of ``regions[i]``), ``changed`` (bool: voxels whose HU may differ), ``regions`` (list of
        dicts: ``subtype``, ``label``, ``lung``, ``centre_mm``, ``radius_mm`` (a ball around the centre holding the
        region), ``voxels`` (truth voxels), for CLE/PSE ``balls_mm`` (x, y, z, outer radius of every painted ball; CLE:
        each blob then its two satellites) and ``blobs``/``wall_mm``, for PLE ``extent_mm``/``lung_fraction``) and
        ``noise``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    lung = np.asarray(lung_mask).astype(np.uint8)
    if hu.shape != lung.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and lung_mask {lung.shape} must be the same 3D shape")
    result = {
        "image": hu.copy(),
        "truth": np.zeros(hu.shape, np.uint8),
        "region_map": np.zeros(hu.shape, np.uint16),
        "changed": np.zeros(hu.shape, bool),
        "regions": [],
        "noise": {},
    }
    box = _lung_box(lung)
    if box is None:
        return result
    settings = _Settings(
        cle_clusters_per_lung, cle_min_depth_mm, pse_cysts_per_lung, ple_fraction, ple_edge_mm, ple_prune_radius_mm
    )
    inner = _insert(hu[box], _box_affine(affine, box), lung[box], seed, settings, noise)
    for key in ("image", "truth", "region_map", "changed"):
        result[key][box] = inner[key]
    result["regions"], result["noise"] = inner["regions"], inner["noise"]
    return result


def _lung_box(lung: np.ndarray) -> Optional[tuple[slice, ...]]:
    """The lungs' bounding box plus 3 voxels, where the lesions are worked out (everything else stays as it was);
    None without lung."""
    bounds = mask_bounding_box(lung > 0)
    if bounds is None:
        return None
    lo, hi = np.maximum(bounds[0] - 3, 0), np.minimum(bounds[1] + 3, np.array(lung.shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _box_affine(affine: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The affine of the sub-volume ``box`` of a scan with ``affine``."""
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    return np.asarray(affine, dtype=np.float64) @ shift


class _Canvas:
    """The image being painted, the share of each voxel's HU replaced (for the noise), the truth and region maps,
    and the report of each painted region."""

    def __init__(self, hu: np.ndarray, lung: np.ndarray) -> None:
        self.hu, self.in_lung = hu, lung > 0
        self.image = hu.copy()
        self.weight = np.zeros(hu.shape, dtype=np.float32)
        self.truth = np.zeros(hu.shape, dtype=np.uint8)
        self.region_map = np.zeros(hu.shape, dtype=np.uint16)
        self.regions: list[dict[str, Any]] = []

    def blend(self, box: tuple[slice, ...], a: np.ndarray, target: float) -> None:
        """Pull the HU in ``box`` toward ``target`` by the share ``a``."""
        view = self.image[box]
        view += a * (np.float32(target) - view)
        np.maximum(self.weight[box], a, out=self.weight[box])

    def mark(self, box: tuple[slice, ...], hit: np.ndarray, entry: dict[str, Any]) -> None:
        """Record a region: its truth voxels ``hit`` in ``box`` and its report ``entry``."""
        self.truth[box][hit] = entry["label"]
        self.region_map[box][hit] = len(self.regions) + 1
        self.regions.append(entry)


def _insert(
    hu: np.ndarray,
    affine: np.ndarray,
    lung: np.ndarray,
    seed: int,
    settings: _Settings,
    noise: Optional[tuple[float, float]],
) -> dict[str, Any]:
    """:func:`insert_lesions` on a box around the lungs (``affine`` is the box's)."""
    geo = ScanGeometry(affine, hu.shape)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 0x1E5]).spawn(4)]
    if noise is None:
        noise = lung_noise(hu, lung, geo.affine)
    cle_pse, ple = _place(rngs, geo, hu, lung, settings)
    canvas = _Canvas(hu, lung)
    for reg in cle_pse:
        _paint_balls(canvas, geo, reg)
    if ple is not None:
        _paint_ple(canvas, geo, ple, settings.ple_prune_radius_mm)
    changed = _add_noise(canvas, rngs[3], geo.slice_axis, noise)
    return {
        "image": canvas.image,
        "truth": canvas.truth,
        "region_map": canvas.region_map,
        "changed": changed,
        "regions": canvas.regions,
        "noise": {"sigma_hu": round(float(noise[0]), 2), "width_voxels": round(float(noise[1]), 2)},
    }


def _place(
    rngs: list[np.random.Generator], geo: ScanGeometry, hu: np.ndarray, lung: np.ndarray, settings: _Settings
) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """The CLE and PSE regions (balls) and the PLE region (or None), each subtype with its own generator."""
    placement = Placement(geo, hu, lung, lung_depth_mm(lung > 0, geo.spacing))
    cle = place_cle(rngs[0], placement, settings.cle_clusters_per_lung, settings.cle_min_depth_mm)
    pse = place_pse(rngs[1], placement, settings.pse_cysts_per_lung)
    ple = place_ple(rngs[2], placement, settings.ple_fraction, settings.ple_edge_mm)
    return cle + pse, ple


def _ball_fractions(
    geo: ScanGeometry, reg: dict[str, Any]
) -> Optional[tuple[tuple[slice, ...], np.ndarray, np.ndarray]]:
    """The box around a region's balls and, in it, the share of each voxel inside the balls (outer) and inside
    their lumens (PSE: without the wall; CLE: the balls); None when no ball touches the scan."""
    lumen_r = [r - PSE_WALL_MM if reg["label"] == PSE else r for _, r in reg["balls"]]
    lo = np.array(geo.shape)
    hi = np.zeros(3, dtype=int)
    pieces = []
    for (c, r), rl in zip(reg["balls"], lumen_r):
        bf = geo.ball_fraction(c, r)
        if bf is None:
            continue
        box, f = bf
        pieces.append((box, f, geo.ball_fraction(c, rl) if reg["label"] == PSE else bf))
        lo = np.minimum(lo, [b.start for b in box])
        hi = np.maximum(hi, [b.stop for b in box])
    if not pieces:
        return None
    outer = np.zeros(tuple(hi - lo), dtype=np.float32)
    lumen = np.zeros_like(outer)
    for box, f, (lbox, fl) in pieces:
        sub = tuple(slice(b.start - a, b.stop - a) for b, a in zip(box, lo))
        np.maximum(outer[sub], f, out=outer[sub])
        lsub = tuple(slice(b.start - a, b.stop - a) for b, a in zip(lbox, lo))
        np.maximum(lumen[lsub], fl, out=lumen[lsub])
    return tuple(slice(a, b) for a, b in zip(lo, hi)), outer, lumen


def _paint_balls(canvas: _Canvas, geo: ScanGeometry, reg: dict[str, Any]) -> None:
    """Paint a CLE cluster (lumens of -992 HU) or a PSE cyst (wall of -250 HU, lumen of -990 HU) over parenchyma."""
    fractions = _ball_fractions(geo, reg)
    if fractions is None:
        return
    rbox, outer, lumen = fractions
    p = parenchyma_weight(canvas.hu[rbox]) * canvas.in_lung[rbox]
    if reg["label"] == PSE:  # (1 - outer) parenchyma + (outer - lumen) wall + lumen air, outer >= lumen
        canvas.blend(rbox, outer * p, PSE_WALL_HU)
        canvas.image[rbox] += lumen * p * np.float32(PSE_LUMEN_HU - PSE_WALL_HU)
    else:
        canvas.blend(rbox, lumen * p, CLE_HU)
    hit = (lumen >= 0.5) & (p >= 0.5)
    canvas.mark(rbox, hit, _balls_entry(reg, int(np.count_nonzero(hit))))


def _balls_entry(reg: dict[str, Any], voxels: int) -> dict[str, Any]:
    """The report of a CLE or PSE region of ``voxels`` truth voxels."""
    balls = reg["balls"]
    centre = np.mean([c for c, _ in balls], axis=0)
    entry: dict[str, Any] = {
        "subtype": SUBTYPE_NAMES[reg["label"]],
        "label": reg["label"],
        "lung": LUNG_NAMES.get(reg["lung"], str(reg["lung"])),
        "centre_mm": [round(float(v), 2) for v in centre],
        "radius_mm": round(max(float(np.linalg.norm(c - centre)) + r for c, r in balls), 2),
        "voxels": voxels,
    }
    if reg["label"] == CLE:
        entry["blobs"] = len(balls) // 3
    else:
        entry["wall_mm"] = PSE_WALL_MM
    entry["balls_mm"] = [[round(float(v), 2) for v in c] + [round(r, 2)] for c, r in balls]
    return entry


def _paint_ple(canvas: _Canvas, geo: ScanGeometry, ple: dict[str, Any], prune_radius_mm: float) -> None:
    """Darken the PLE region to -970 HU and prune its vessels: those thinner than ``prune_radius_mm`` vanish (grey
    opening), larger ones lose a voxel of radius (grey erosion)."""
    box, w = ple["box"], ple["weight"]
    opened = ndi.grey_opening(canvas.hu[box], footprint=geo.footprint(prune_radius_mm))
    eroded = ndi.grey_erosion(opened, footprint=geo.footprint(max(float(geo.spacing.min()), 1.0) * 1.01))
    keep = np.clip((eroded + 650.0) / 100.0, 0.0, 1.0)  # cores of the larger (narrowed) vessels
    canvas.blend(box, (w * (1.0 - keep)).astype(np.float32), PLE_HU)
    hit = (w >= 0.5) & (keep < 0.5) & canvas.in_lung[box]
    entry = {
        "subtype": SUBTYPE_NAMES[PLE],
        "label": PLE,
        "lung": LUNG_NAMES.get(ple["lung"], str(ple["lung"])),
        "centre_mm": [round(float(v), 2) for v in ple["centre"]],
        "radius_mm": round(ple["radius"], 2),
        "voxels": int(np.count_nonzero(hit)),
        "extent_mm": [round(float(v), 1) for v in ple["extent_mm"]],
        "lung_fraction": round(ple["lung_fraction"], 4),
    }
    canvas.mark(box, hit, entry)


def _add_noise(canvas: _Canvas, rng: np.random.Generator, slice_axis: int, noise: tuple[float, float]) -> np.ndarray:
    """Add the scan's noise (standard deviation, in-plane width) where HU were replaced, by the share replaced;
    round and clip to the CT range. Returns the voxels whose HU may differ."""
    changed = canvas.weight > 0
    if changed.any():
        nz = np.argwhere(changed)
        box = tuple(slice(a, b) for a, b in zip(nz.min(0), nz.max(0) + 1))
        field = noise_field(rng, tuple(b.stop - b.start for b in box), slice_axis, noise[1])
        a = canvas.weight[box]
        amp = np.float32(noise[0]) * np.sqrt(np.clip(1.0 - (1.0 - a) ** 2, 0.0, 1.0))
        noisy = np.clip(np.round(canvas.image[box] + amp * field), -1024.0, 3071.0)
        canvas.image[box] = np.where(changed[box], noisy, canvas.hu[box])
    return changed
