"""The random parameters of one phantom subject: severity, subtype mix, kernel, resolution, body shape, noise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from drasclr_ext.errors import DrasCLRError

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
    sev = _draw_severity(rng, severity)
    mix_name = _draw_mix(rng, subtypes)
    frac, targets = _draw_targets(rng, sev, mix_name)
    ker = _draw_kernel(rng, kernel)
    scale, offset, inspiration, fat, noise = _draw_body(rng, ker)
    sp, shp = _draw_grid(rng, scale, fat, shape, spacing, resolution_scale)
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


def _draw_severity(rng: np.random.Generator, severity: str | None) -> str:
    """The severity class: ``severity``, or drawn (30/25/25/20 %)."""
    sev = severity if severity is not None else str(rng.choice(SEVERITY_CLASSES, p=_SEVERITY_PROBS))
    if sev not in SEVERITY_CLASSES:
        raise DrasCLRError(f"unknown severity {sev!r}: use one of {SEVERITY_CLASSES}")
    return sev


def _draw_mix(rng: np.random.Generator, subtypes: str | None) -> str:
    """The subtype mix: ``subtypes``, or drawn with the mixes' probabilities."""
    names = list(_SUBTYPE_MIXES)
    mix_name = subtypes if subtypes is not None else str(rng.choice(names, p=[_SUBTYPE_MIXES[k][1] for k in names]))
    if mix_name not in _SUBTYPE_MIXES:
        raise DrasCLRError(f"unknown subtype mix {mix_name!r}: use one of {names}")
    return mix_name


def _draw_targets(rng: np.random.Generator, sev: str, mix_name: str) -> tuple[float, dict[str, float]]:
    """The emphysema fraction of the lung (drawn in the severity's range) and its share per subtype."""
    lo, hi = _SEVERITY_RANGES[sev]
    frac = float(rng.uniform(lo, hi)) if hi > 0 else 0.0
    shares = _SUBTYPE_MIXES[mix_name][0]
    targets = {"centrilobular": frac * shares[0], "paraseptal": frac * shares[1], "panlobular": frac * shares[2]}
    if targets["paraseptal"] > _MAX_PSE_FRACTION:  # a single subpleural layer: give the excess to CLE
        targets["centrilobular"] += targets["paraseptal"] - _MAX_PSE_FRACTION
        targets["paraseptal"] = _MAX_PSE_FRACTION
    return frac, targets


def _draw_kernel(rng: np.random.Generator, kernel: str | None) -> str:
    """The reconstruction kernel: ``kernel``, or drawn (smooth 60 %, sharp 40 %)."""
    ker = kernel if kernel is not None else str(rng.choice(("smooth", "sharp"), p=(0.6, 0.4)))
    if ker not in ("smooth", "sharp"):
        raise DrasCLRError(f"unknown kernel {ker!r}: use 'smooth' or 'sharp'")
    return ker


def _draw_body(
    rng: np.random.Generator, ker: str
) -> tuple[tuple[float, float, float], tuple[float, float, float], float, float, float]:
    """The body: scale (lateral, anterior-posterior, height), offset in the field of view (mm), inspiration, fat
    thickness (mm), and the noise (HU) of the ``ker`` kernel."""
    scale_lr = float(rng.uniform(0.88, 1.05))
    inspiration = float(rng.uniform(0.6, 1.0))
    scale = (scale_lr, scale_lr * float(rng.uniform(0.93, 1.07)), scale_lr * (0.9 + 0.12 * inspiration))
    offset = (float(rng.uniform(-12, 12)), float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10)))
    fat = float(rng.uniform(3.0, 20.0))
    noise = float(rng.uniform(20.0, 30.0) if ker == "smooth" else rng.uniform(22.0, 30.0))
    return scale, offset, inspiration, fat, noise


def _draw_grid(
    rng: np.random.Generator,
    scale: tuple[float, float, float],
    fat: float,
    shape: Sequence[int] | None,
    spacing: Sequence[float] | None,
    resolution_scale: float,
) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Spacing (mm) and shape (voxels) of the scan: ``spacing`` or the drawn scanner spacing (fitted to ``shape``
    when only that is given), and ``shape`` or the field of view around the body."""
    in_plane = float(rng.uniform(0.6, 0.8)) * resolution_scale
    thick = float(rng.choice(_SLICE_THICKNESSES, p=_SLICE_PROBS)) * resolution_scale
    fov = np.array([2 * (168.0 + fat) * scale[0] + 24.0, 2 * (168.0 + fat) * scale[0] + 24.0, 300.0 * scale[2]])
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
    return sp, shp  # type: ignore[return-value]
