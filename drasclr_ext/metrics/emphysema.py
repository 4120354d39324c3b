"""Clinical emphysema measures (REFERENCE.md): LAA-950, Perc15, lung regions, subtype fractions and grades."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from drasclr_ext.errors import InputImageError
from drasclr_ext.geometry import mask_bounding_box, memory_layout

__all__ = [
    "LAA_THRESHOLD_HU",
    "SUBTYPE_NAMES",
    "cle_grade",
    "emphysema_report",
    "laa950_of_values",
    "laa950_percent",
    "lung_regions",
    "perc15",
    "perc15_of_values",
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


def _image_and_mask(hu: Any, lung: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_volume` of the image and of its lung mask, which must have the image's shape."""
    h, m = _volume(hu, "hu"), _volume(lung, "lung mask")
    if h.shape != m.shape:
        raise InputImageError(
            f"image {h.shape} and lung mask {m.shape} differ in shape: compute the mask on this image"
        )
    return h, m


def _lung_values(hu: Any, lung: Any) -> np.ndarray:
    h, m = _image_and_mask(hu, lung)
    values = h[m > 0]
    if values.size == 0:
        raise InputImageError("the lung mask is empty: check the lung segmentation of this scan")
    return values


def laa950_percent(hu: Any, lung: Any) -> float:
    """Low-attenuation area: 100 x (lung voxels below -950 HU) / (lung voxels)."""
    return laa950_of_values(_lung_values(hu, lung))


def perc15(hu: Any, lung: Any) -> float:
    """The 15th percentile (HU) of the lung's attenuation histogram (linear interpolation between voxels)."""
    return perc15_of_values(_lung_values(hu, lung))


def laa950_of_values(values: np.ndarray) -> float:
    """:func:`laa950_percent` of the lung's voxel values (a non-empty 1D array)."""
    return float(100.0 * np.count_nonzero(values < LAA_THRESHOLD_HU) / values.size)


def perc15_of_values(values: np.ndarray) -> float:
    """:func:`perc15` of the lung's voxel values (a non-empty 1D array)."""
    return float(np.percentile(np.asarray(values, np.float64), 15.0))


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


_SIDES = ((1, "right"), (2, "left"))
_ZONES = ("lower", "middle", "upper")  # zone index 0, 1, 2: thirds of each lung by height
_REGIONS = (
    "whole", "right", "left", "upper", "middle", "lower",
    "right_upper", "right_middle", "right_lower", "left_upper", "left_middle", "left_lower",
)  # fmt: skip


def _lung_box(m: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the lung voxels (label > 0) of a 3D label map."""
    bounds = mask_bounding_box(m > 0)
    if bounds is None:
        raise InputImageError("the lung mask is empty: check the lung segmentation of this scan")
    return tuple(slice(int(a), int(b)) for a, b in zip(*bounds))


def _region_codes(m: np.ndarray, a: np.ndarray, box: tuple[slice, ...], slab: int = 8) -> np.ndarray:
    """uint8 region codes of the voxels of ``m[box]``: 0 outside the lung, ``1 + 3 * side + zone`` in the right
    (side 0) or left (side 1) lung (zone 0 lower, 1 middle, 2 upper, as :func:`lung_regions` defines them), 7 for
    other positive labels (lung, but neither side).

    Two passes over slabs along the slowest-varying axis (the extent of each lung by height, then the zones), so no
    full-size height array is built; heights are summed exactly as :func:`lung_regions` always did.
    """
    sub = m[box]
    ijk = [np.arange(b.start, b.stop, dtype=np.float64) for b in box]
    axis = int(np.argmax(np.abs(sub.strides)))

    def slabs():
        for start in range(0, sub.shape[axis], slab):
            index = [slice(None)] * 3
            index[axis] = slice(start, start + slab)
            i, j, k = (c[s] for c, s in zip(ijk, index))
            height = a[2, 0] * i[:, None, None] + a[2, 1] * j[None, :, None] + a[2, 2] * k[None, None, :] + a[2, 3]
            yield tuple(index), height

    extent = {value: [np.inf, -np.inf] for value, _ in _SIDES}
    for index, height in slabs():
        for value, bounds in extent.items():
            side = sub[index] == value
            bounds[0] = min(bounds[0], np.min(height, where=side, initial=np.inf))
            bounds[1] = max(bounds[1], np.max(height, where=side, initial=-np.inf))
    codes = np.where(sub > 0, np.uint8(7), np.uint8(0))
    for index, height in slabs():
        labels = sub[index]
        for s, (value, _) in enumerate(_SIDES):
            lo, hi = extent[value]
            if lo > hi:  # this lung is absent
                continue
            rel = (height - lo) / (hi - lo) if hi > lo else np.zeros_like(height)
            zone = (rel >= 1 / 3).astype(np.uint8) + (rel >= 2 / 3)
            np.copyto(codes[index], 1 + 3 * s + zone, where=labels == value)
    return codes


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
    regions = {name: np.zeros(m.shape, dtype=bool) for name in _REGIONS}
    regions.update(whole=m > 0, right=m == 1, left=m == 2)
    if not regions["whole"].any():
        return regions
    box = _lung_box(m)
    codes = _region_codes(m, a, box)
    for s, (_, side) in enumerate(_SIDES):
        for z, zone in enumerate(_ZONES):
            region = codes == 1 + 3 * s + z
            regions[f"{side}_{zone}"][box] = region
            regions[zone][box] |= region
    return regions


def _subtype_label(subtype_label: Any, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """:func:`_volume` of a subtype label map of the lung mask's ``shape``, or None."""
    if subtype_label is None:
        return None
    label = _volume(subtype_label, "subtype label")
    if label.shape != shape:
        raise InputImageError(f"subtype label {label.shape} and lung mask {shape} differ in shape")
    return label


def _region_counts(
    h: np.ndarray, m: np.ndarray, a: np.ndarray, label: Optional[np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Voxel counts (below -950 HU: 0/1, label 0-4) of each region of :data:`_REGIONS`, all from one histogram of
    (region code, below -950 HU, label) over the lungs' bounding box; and the lung voxels' HU."""
    box = _lung_box(m)
    codes = _region_codes(m, a, box)
    order = memory_layout(codes)  # flatten in memory order
    values = h[box].ravel(order)[codes.ravel(order) > 0]
    # key = 10 * region code + 5 * (below -950 HU) + label (labels other than 1..4 count as 0)
    key = codes * np.uint8(10)
    key += (h[box] < LAA_THRESHOLD_HU).astype(np.uint8) * np.uint8(5)
    if label is not None:
        sub = label[box]
        if sub.dtype.kind not in "biu":  # float labels: only whole numbers are labels
            sub = np.where(sub == np.round(sub), sub, 0)
        key += np.where((sub >= 1) & (sub <= 4), sub, 0).astype(np.uint8)
    counts = np.bincount(key.ravel(order), minlength=80).reshape(8, 2, 5)  # (region code, below -950, label)
    counts[0] = counts[1:].sum(axis=0)  # code 0 is outside the lung: reuse its row for the whole lung
    by_region = {
        "whole": counts[0],
        "right": counts[1:4].sum(axis=0),
        "left": counts[4:7].sum(axis=0),
        **{zone: counts[1 + z] + counts[4 + z] for z, zone in enumerate(_ZONES)},
        **{
            f"{side}_{zone}": counts[1 + 3 * s + z]
            for s, (_, side) in enumerate(_SIDES)
            for z, zone in enumerate(_ZONES)
        },
    }
    return by_region, values


def _region_entry(counts: np.ndarray, voxel_ml: float, with_labels: bool) -> dict[str, Any]:
    """Volume, LAA-950 and (``with_labels``) subtype fractions of one region from its :func:`_region_counts`."""
    n = int(counts.sum())
    entry: dict[str, Any] = {
        "volume_ml": n * voxel_ml,
        "laa950_percent": 100.0 * int(counts[1].sum()) / n if n else None,
    }
    if with_labels:
        per_label = counts.sum(axis=0)
        entry["subtype_fractions"] = {s: (float(per_label[v]) / n if n else None) for v, s in SUBTYPE_NAMES.items()}
    return entry


def emphysema_report(hu: Any, lung_mask: Any, affine: Any, subtype_label: Any = None) -> dict[str, Any]:
    """Clinical summary of one scan: lung volume (ml), LAA-950 (%), Perc15 (HU), per-region LAA-950 and volume,
    and, given an emphysema label map {0 outside, 1 normal, 2 CLE, 3 PSE, 4 PLE}, subtype fractions and grades.

    Every count comes from one histogram of (region, below -950 HU, label) over the lung's bounding box.
    """
    h, m = _image_and_mask(hu, lung_mask)
    a = np.asarray(affine, dtype=np.float64)
    voxel_ml = float(abs(np.linalg.det(a[:3, :3]))) / 1000.0
    label = _subtype_label(subtype_label, m.shape)
    by_region, values = _region_counts(h, m, a, label)
    whole = by_region["whole"]
    report: dict[str, Any] = {
        "lung_volume_ml": float(int(whole.sum()) * voxel_ml),
        "laa950_percent": float(100.0 * int(whole[1].sum()) / int(whole.sum())),
        "perc15_hu": float(np.percentile(values.astype(np.float64), 15.0)),
        "regions": {name: _region_entry(by_region[name], voxel_ml, label is not None) for name in _REGIONS},
    }
    if label is not None:
        per_label, n = whole.sum(axis=0), int(whole.sum())
        fractions = {s: float(per_label[v]) / n for v, s in SUBTYPE_NAMES.items()}
        report["subtype_fractions"] = fractions
        report["cle_grade"] = cle_grade(fractions["centrilobular"])
        report["pse_grade"] = pse_grade(fractions["paraseptal"])
    return report
