"""Clinical emphysema measures (REFERENCE.md): LAA-950, Perc15, lung regions, subtype fractions and grades."""

from __future__ import annotations

from typing import Any

import numpy as np

from drasclr_ext.errors import InputImageError

__all__ = [
    "LAA_THRESHOLD_HU",
    "SUBTYPE_NAMES",
    "cle_grade",
    "emphysema_report",
    "laa950_percent",
    "lung_regions",
    "perc15",
    "pse_grade",
]

LAA_THRESHOLD_HU = -950.0
SUBTYPE_NAMES = {1: "normal", 2: "centrilobular", 3: "paraseptal", 4: "panlobular"}
# lower bounds (fractions of the lung) of CLE grades 1..5 and PSE grades 1..2
_CLE_CUTOFFS = (0.005, 0.01, 0.05, 0.10, 0.20)
_PSE_CUTOFFS = (0.01, 0.05)


def _volume(array: Any, name: str) -> np.ndarray:
    """A 3D numpy view of an array, tensor or MetaTensor; a leading channel of size 1 is dropped."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise InputImageError(f"{name} must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape {a.shape}")
    return a


def _lung_values(hu: Any, lung: Any) -> np.ndarray:
    h, m = _volume(hu, "hu"), _volume(lung, "lung mask")
    if h.shape != m.shape:
        raise InputImageError(
            f"image {h.shape} and lung mask {m.shape} differ in shape: compute the mask on this image"
        )
    values = h[m > 0]
    if values.size == 0:
        raise InputImageError("the lung mask is empty: check the lung segmentation of this scan")
    return values


def laa950_percent(hu: Any, lung: Any) -> float:
    """Low-attenuation area: 100 x (lung voxels below -950 HU) / (lung voxels)."""
    values = _lung_values(hu, lung)
    return float(100.0 * np.count_nonzero(values < LAA_THRESHOLD_HU) / values.size)


def perc15(hu: Any, lung: Any) -> float:
    """The 15th percentile (HU) of the lung's attenuation histogram (linear interpolation between voxels)."""
    return float(np.percentile(_lung_values(hu, lung).astype(np.float64), 15.0))


def _grade(fraction: float, cutoffs: tuple[float, ...], name: str) -> int:
    f = float(fraction)
    if not np.isfinite(f) or f < 0.0 or f > 1.0:
        raise ValueError(
            f"{name} expects an affected fraction of the lung in [0, 1] (not a percentage), got {fraction}"
        )
    return int(np.searchsorted(np.asarray(cutoffs), f, side="right"))


def cle_grade(fraction: float) -> int:
    """Centrilobular grade from the affected lung fraction: 0 absent (<0.5 %), 1 trace (0.5-1 %), 2 mild (1-5 %),
    3 moderate (5-10 %), 4 confluent (10-20 %), 5 advanced destructive (20 % or more)."""
    return _grade(fraction, _CLE_CUTOFFS, "cle_grade")


def pse_grade(fraction: float) -> int:
    """Paraseptal grade from the affected lung fraction: 0 absent (<1 %), 1 mild (1-5 %), 2 substantial (>= 5 %)."""
    return _grade(fraction, _PSE_CUTOFFS, "pse_grade")


def lung_regions(lung_mask: Any, affine: Any) -> dict[str, np.ndarray]:
    """Boolean masks of the whole lung, each lung, and the upper/middle/lower third by height of each lung.

    Height is the world (RAS) superior coordinate of the voxel centres given by ``affine``; each lung's extent
    [zmin, zmax] is split at relative heights 1/3 and 2/3 (lower < 1/3 <= middle < 2/3 <= upper). Keys: ``whole``,
    ``right``, ``left``, ``right_upper`` ... ``left_lower``, and ``upper``/``middle``/``lower`` (both lungs).
    """
    m = _volume(lung_mask, "lung mask")
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InputImageError(f"affine must be 4x4, got shape {a.shape}")
    i, j, k = (np.arange(n, dtype=np.float64) for n in m.shape)
    height = a[2, 0] * i[:, None, None] + a[2, 1] * j[None, :, None] + a[2, 2] * k[None, None, :] + a[2, 3]
    regions: dict[str, np.ndarray] = {"whole": m > 0, "right": m == 1, "left": m == 2}
    for zone in ("upper", "middle", "lower"):
        regions[zone] = np.zeros(m.shape, dtype=bool)
    for side in ("right", "left"):
        sel = regions[side]
        for zone in ("upper", "middle", "lower"):
            regions[f"{side}_{zone}"] = np.zeros(m.shape, dtype=bool)
        if not sel.any():
            continue
        h = np.broadcast_to(height, m.shape)[sel]
        lo, hi = h.min(), h.max()
        rel = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
        for zone, z in (("lower", rel < 1 / 3), ("middle", (rel >= 1 / 3) & (rel < 2 / 3)), ("upper", rel >= 2 / 3)):
            region = np.zeros(m.shape, dtype=bool)
            region[sel] = z
            regions[f"{side}_{zone}"] = region
            regions[zone] |= region
    return regions


def emphysema_report(hu: Any, lung_mask: Any, affine: Any, subtype_label: Any = None) -> dict[str, Any]:
    """Clinical summary of one scan: lung volume (ml), LAA-950 (%), Perc15 (HU), per-region LAA-950 and volume,
    and, given an emphysema label map {0 outside, 1 normal, 2 CLE, 3 PSE, 4 PLE}, subtype fractions and grades."""
    h = _volume(hu, "hu")
    m = _volume(lung_mask, "lung mask")
    a = np.asarray(affine, dtype=np.float64)
    voxel_ml = float(abs(np.linalg.det(a[:3, :3]))) / 1000.0
    label = None if subtype_label is None else _volume(subtype_label, "subtype label")
    if label is not None and label.shape != m.shape:
        raise InputImageError(f"subtype label {label.shape} and lung mask {m.shape} differ in shape")
    report: dict[str, Any] = {
        "lung_volume_ml": float(np.count_nonzero(m) * voxel_ml),
        "laa950_percent": laa950_percent(h, m),
        "perc15_hu": perc15(h, m),
        "regions": {},
    }
    for name, region in lung_regions(m, a).items():
        n = int(np.count_nonzero(region))
        entry: dict[str, Any] = {"volume_ml": n * voxel_ml, "laa950_percent": laa950_percent(h, region) if n else None}
        if label is not None:
            entry["subtype_fractions"] = {
                s: (float(np.count_nonzero(label[region] == v)) / n if n else None) for v, s in SUBTYPE_NAMES.items()
            }
        report["regions"][name] = entry
    if label is not None:
        whole = m > 0
        n = int(np.count_nonzero(whole))
        fractions = {s: float(np.count_nonzero(label[whole] == v)) / n for v, s in SUBTYPE_NAMES.items()}
        report["subtype_fractions"] = fractions
        report["cle_grade"] = cle_grade(fractions["centrilobular"])
        report["pse_grade"] = pse_grade(fractions["paraseptal"])
    return report
