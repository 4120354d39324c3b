"""Quality flags of a scan: facts that do not stop processing but weaken its results, listed in every report.

Each flag is a ``{"flag", "severity", "message"}`` dict; reports hold a ``quality`` list of them (empty when all is
well). Add a new check as a small function returning a flag or None, and list it in ``CHECKS``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

from drasclr_ext.geometry import axis_towards, voxel_spacing
from drasclr_ext.transforms.contrast import ENHANCED_BLOOD_HU

logger = logging.getLogger(__name__)

THICK_SLICE_MM = 2.5  # emphysema measures (LAA-950, Perc15, subtypes) are validated on thin slices
NOISE_HU_MAX = 30.0  # the dense model's training noise; above it raw LAA-950 counts noise as emphysema
# phantoms register with Dice 0.98-0.99 and real chest CTs at 0.80-0.90 (TCIA A0001: 0.84): below 0.8 the atlas
# locations and zones are likely off by more than a centimetre
REGISTRATION_DICE_MIN = 0.8
LUNG_VOLUME_ML = (1500.0, 9000.0)  # adult lungs between deep expiration and hyperinflated full inspiration
# ContrastBolusAgent values that mean "none given" (the tag should be absent then, but some scanners write these)
NO_CONTRAST_AGENT = ("", "NONE", "NO", "N", "NIL", "0", "-", "NONE GIVEN", "WITHOUT")


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


def contrast_enhanced(spacing: np.ndarray, acquisition: Mapping[str, Any]) -> Optional[dict[str, str]]:
    """Flag a scan with contrast: the DICOM ContrastBolusAgent tag, or a blood pool over ``ENHANCED_BLOOD_HU``."""
    agent = str(acquisition.get("contrast_bolus_agent") or "").strip()
    blood = float(acquisition.get("blood_pool_hu", math.nan) or math.nan)
    evidence = []
    if agent.upper() not in NO_CONTRAST_AGENT:
        evidence.append(f"DICOM ContrastBolusAgent {agent!r}")
    if blood > ENHANCED_BLOOD_HU:
        evidence.append(f"blood pool {blood:.0f} HU, over {ENHANCED_BLOOD_HU:g} HU")
    if not evidence:
        return None
    return quality_flag(
        "contrast_enhanced",
        "warning",
        f"contrast-enhanced scan ({'; '.join(evidence)}): iodine raises lung attenuation, so LAA-950 reads lower and "
        "Perc15 higher than on an unenhanced scan; compare emphysema measures only between scans of the same phase",
    )


CHECKS: list[Callable[[np.ndarray, Mapping[str, Any]], Optional[dict[str, str]]]] = [thick_slices, contrast_enhanced]


def scan_quality(image: Any, affine: Optional[np.ndarray] = None) -> list[dict[str, str]]:
    """The quality flags of a scan (a ``MetaTensor`` from ``load_ct``, or its meta with ``affine``); each is logged."""
    meta = getattr(image, "meta", image if isinstance(image, Mapping) else {}) or {}
    if affine is None:
        affine = getattr(image, "affine", meta.get("affine"))
    affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    spacing = voxel_spacing(affine)
    acquisition = meta.get("acquisition") or {}
    flags = [flag for check in CHECKS if (flag := check(spacing, acquisition)) is not None]
    for flag in flags:
        logger.warning(f"{meta.get('filename_or_obj', 'scan')}: {flag['message']}")
    return flags


def high_noise(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> Optional[dict[str, str]]:
    """Flag lung noise above :data:`NOISE_HU_MAX` (sharp kernel or low dose)."""
    noise = float((report.get("harmonisation") or {}).get("noise_hu") or math.nan)
    if not noise > NOISE_HU_MAX:
        return None
    return quality_flag(
        "high_noise",
        "warning",
        f"lung noise {noise:.0f} HU (over {NOISE_HU_MAX:g} HU: sharp kernel or low dose): raw LAA-950 counts noise as "
        "emphysema; compare harmonisation.laa950_percent, and the map was made on the harmonised scan",
    )


def sharp_kernel(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> Optional[dict[str, str]]:
    """Flag a sharp reconstruction kernel: measured on the image's pleural edges (``harmonisation.densitometry``),
    or named so in the DICOM ConvolutionKernel when the image could not tell."""
    harmonisation = report.get("harmonisation") or {}
    densitometry = harmonisation.get("densitometry") or {}
    tag = harmonisation.get("dicom_kernel") or {}
    if densitometry.get("kernel_class") != "sharp" and not (
        densitometry.get("kernel_class") == "unknown" and tag.get("class") == "sharp"
    ):
        return None
    evidence = []
    if densitometry.get("kernel_class_source") == "image" and densitometry.get("sharpness_index") is not None:
        evidence.append(f"edge sharpness index {float(densitometry['sharpness_index']):.2f}")
    if tag.get("name"):
        evidence.append(f"DICOM kernel {tag['name']!r}")
    laa, p15 = harmonisation.get("laa950_percent"), harmonisation.get("perc15_hu")
    harmonised = f" ({float(laa):.1f} % and {float(p15):.0f} HU here)" if laa is not None and p15 is not None else ""
    return quality_flag(
        "sharp_kernel",
        "warning",
        f"sharp reconstruction kernel ({'; '.join(evidence) or 'from the image'}): raw LAA-950 reads higher and "
        "Perc15 lower than on a soft kernel; compare scans by harmonisation.laa950_percent and perc15_hu, the "
        f"soft-kernel equivalents{harmonised}",
    )


def low_registration_dice(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> Optional[dict]:
    """Flag an atlas registration whose lung Dice is below :data:`REGISTRATION_DICE_MIN`."""
    dice = report.get("registration_dice")
    if dice is None or not float(dice) < REGISTRATION_DICE_MIN:
        return None
    return quality_flag(
        "low_registration_dice",
        "warning",
        f"atlas registration Dice {float(dice):.2f} (below {REGISTRATION_DICE_MIN:g}): anatomical locations and zones "
        "may be off by more than a centimetre; check the lung mask in overview.png",
    )


def lungs_cut_off(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> Optional[dict[str, str]]:
    """Flag lungs that reach the first or last axial slice (the scan does not cover them whole)."""
    axis, _ = axis_towards(affine, 2)
    mask = np.moveaxis(np.asarray(lung) > 0, axis, -1)
    ends = [name for name, index in (("first", 0), ("last", -1)) if mask[:, :, index].any()]
    if not ends:
        return None
    return quality_flag(
        "lungs_cut_off",
        "warning",
        f"the lungs reach the {' and '.join(ends)} axial slice: the scan does not cover them whole; volumes, zones "
        "and fractions are those of the part scanned",
    )


def implausible_lung_volume(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> Optional[dict]:
    """Flag a lung volume outside :data:`LUNG_VOLUME_ML`."""
    volume = float(report.get("lung_volume_ml") or math.nan)
    low, high = LUNG_VOLUME_ML
    if not (volume < low or volume > high):
        return None
    return quality_flag(
        "implausible_lung_volume",
        "warning",
        f"lung volume {volume:.0f} ml (outside {low / 1000:g}-{high / 1000:g} l): check the lung mask (a lung missed, "
        "bowel gas or body included) and that the scan is an inspiratory chest CT",
    )


def airway_not_found(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> Optional[dict[str, str]]:
    """Flag a lung mask that found no trachea (the airways may still be in it)."""
    if (report.get("airways") or {}).get("airway_found") is not False:
        return None
    return quality_flag(
        "airway_not_found",
        "warning",
        "the lung mask found no trachea: the trachea and main bronchi may remain in the lungs and count as emphysema; "
        "check the lung mask in overview.png (scans cut below the carina, or unusual positioning)",
    )


SUBJECT_CHECKS: list[Callable[[Mapping[str, Any], np.ndarray, np.ndarray], Optional[dict[str, str]]]] = [
    high_noise,
    sharp_kernel,
    low_registration_dice,
    lungs_cut_off,
    implausible_lung_volume,
    airway_not_found,
]


def subject_quality(report: Mapping[str, Any], lung: np.ndarray, affine: np.ndarray) -> list[dict[str, str]]:
    """Quality flags that need the subject's results: its report (noise, registration, lung volume) and lung mask."""
    flags = [flag for check in SUBJECT_CHECKS if (flag := check(report, lung, affine)) is not None]
    for flag in flags:
        logger.warning(f"{report.get('input') or report.get('subject', 'scan')}: {flag['message']}")
    return flags
