"""Clinical measures computed the plain way, independently of ``drasclr_ext.metrics.emphysema``: what a report's
numbers must equal."""

from __future__ import annotations

import numpy as np

SUBTYPES = {"normal": 1, "centrilobular": 2, "paraseptal": 3, "panlobular": 4}


def measures_by_hand(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray, label: np.ndarray) -> dict:
    """LAA-950 (%), Perc15 (HU), lung volume (ml) and subtype fractions of the whole lung, and LAA-950 of the right
    (lung label 1) and left (label 2) lungs."""
    hu, lung, label = np.squeeze(hu), np.squeeze(lung), np.squeeze(label)
    inside = lung > 0
    values = np.sort(hu[inside].astype(np.float64))
    rank = 0.15 * (values.size - 1)  # the 15th percentile, linear between the two neighbouring voxels
    low = int(np.floor(rank))
    perc15 = values[low] + (rank - low) * (values[min(low + 1, values.size - 1)] - values[low])
    voxel_ml = abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3])) / 1000.0
    n = int(inside.sum())
    return {
        "laa950_percent": 100.0 * int((hu[inside] < -950).sum()) / n,
        "perc15_hu": float(perc15),
        "lung_volume_ml": n * voxel_ml,
        "subtype_fractions": {name: int((label[inside] == k).sum()) / n for name, k in SUBTYPES.items()},
        "right_laa950_percent": 100.0 * int((hu[lung == 1] < -950).sum()) / max(int((lung == 1).sum()), 1),
        "left_laa950_percent": 100.0 * int((hu[lung == 2] < -950).sum()) / max(int((lung == 2).sum()), 1),
    }
