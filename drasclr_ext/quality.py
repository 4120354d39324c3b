"""Quality flags of a scan: facts that do not stop processing but weaken its results, listed in every report.

Each flag is a ``{"flag", "severity", "message"}`` dict; reports hold a ``quality`` list of them (empty when all is
well). Add a new check as a small function returning a flag or None, and list it in ``CHECKS``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

logger = logging.getLogger(__name__)

THICK_SLICE_MM = 2.5  # emphysema measures (LAA-950, Perc15, subtypes) are validated on thin slices


def quality_flag(flag: str, severity: str, message: str) -> dict[str, str]:
    """One entry of a report's ``quality`` list (severity: ``"info"``, ``"warning"``)."""
    return {"flag": flag, "severity": severity, "message": message}


def thick_slices(spacing: np.ndarray, acquisition: Mapping[str, Any]) -> Optional[dict[str, str]]:
    """Flag slices more than ``THICK_SLICE_MM`` apart or thick."""
    thickness = float(acquisition.get("slice_thickness", math.nan) or math.nan)
    worst = max(float(np.max(spacing)), thickness if math.isfinite(thickness) else 0.0)
    if worst <= THICK_SLICE_MM:
        return None
    return quality_flag(
        "thick_slices",
        "warning",
        f"slices of {worst:.3g} mm (over {THICK_SLICE_MM} mm): LAA-950, Perc15 and the subtype maps are less reliable "
        "than on thin slices; use a thin-slice reconstruction (1.25 mm or less) where there is one",
    )


CHECKS: list[Callable[[np.ndarray, Mapping[str, Any]], Optional[dict[str, str]]]] = [thick_slices]


def scan_quality(image: Any, affine: Optional[np.ndarray] = None) -> list[dict[str, str]]:
    """The quality flags of a scan (a ``MetaTensor`` from ``load_ct``, or its meta with ``affine``); each is logged."""
    meta = getattr(image, "meta", image if isinstance(image, Mapping) else {}) or {}
    if affine is None:
        affine = getattr(image, "affine", meta.get("affine"))
    affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    acquisition = meta.get("acquisition") or {}
    flags = [flag for check in CHECKS if (flag := check(spacing, acquisition)) is not None]
    for flag in flags:
        logger.warning(f"{meta.get('filename_or_obj', 'scan')}: {flag['message']}")
    return flags
