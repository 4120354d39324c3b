"""One synthetic chest CT with emphysema and its exact ground truth, in stages: subject, anatomy, emphysema, clean
image, scanner, ground truth. Every random draw derives from the seed, so a phantom is the same on every machine."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from drasclr_ext.data.phantom.anatomy import (
    HU_AIR,
    LUNG_HEIGHT,
    body_anatomy,
    lung_labels_body_frame,
    paint_vessels_and_airways,
    template_lungs,
)
from drasclr_ext.data.phantom.emphysema import draw_emphysema
from drasclr_ext.data.phantom.grid import Grid, depth_mm, relative_height, smooth_field
from drasclr_ext.data.phantom.scanner import ground_truth, scan
from drasclr_ext.data.phantom.subject import PhantomSubject, draw_subject
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import json_safe

__all__ = ["generate_phantom"]


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
    noise_correlation_mm: float | None = None,
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
        noise_correlation_mm: correlate the noise in-plane over this many mm instead of the default 0.6 voxels (a
            physical texture at fine pixels; the default keeps every phantom as it has always been).

    Returns:
        dict with ``image`` (float32 HU, X,Y,Z), ``label`` (uint8: 0 outside lung, 1 normal, 2 centrilobular,
        3 paraseptal, 4 panlobular), ``lung_mask`` (uint8: 1 right, 2 left; airway lumen excluded), ``affine`` (4x4 RAS)
        and ``info`` (subject parameters and the clinical measures of the final image, see ``emphysema_report``).
    """
    subject = draw_subject(seed, shape, spacing, severity, subtypes, kernel, resolution_scale)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC7]))
    grid = _subject_grid(subject)
    xl, yl, zl = _lung_frame(grid, subject)
    lungs = _lungs(grid, xl, yl, zl, lung_template)
    lung = lungs > 0
    hu, thorax = body_anatomy(xl, yl, zl, lungs, subject)
    texture = smooth_field(rng, grid.shape, grid.spacing, 6.0)  # the normal parenchyma's faint texture
    lesions = _draw_lesions(rng, grid, lungs, subject)
    vessels, aw_outer, aw_lumen = paint_vessels_and_airways(rng, grid, lungs, lesions[0], subject.scale)
    # the clean image: lung parenchyma with its lesions, then vessels and airways
    hu = np.where(lung, _parenchyma(subject, grid, yl, texture, lung, lesions), hu)
    del texture
    hu = _vessels_and_airways(hu, vessels * thorax, aw_outer, aw_lumen)
    del vessels, aw_outer
    image, sigma = scan(hu, grid.spacing, subject.kernel, subject.noise_hu, rng, noise_correlation_mm)
    del hu
    ple, cle, _, pse_lumen = lesions
    label, lung_mask = ground_truth(lungs, aw_lumen, ple, cle, pse_lumen, sigma)
    return _phantom(seed, subject, image, label, lung_mask, grid.affine())


def _draw_lesions(
    rng: np.random.Generator, grid: Grid, lungs: np.ndarray, subject: PhantomSubject
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The subject's emphysema (:func:`draw_emphysema`): PLE region, CLE, PSE outer and PSE lumen fractions."""
    lung = lungs > 0
    lung_ml = float(lung.sum()) * float(np.prod(grid.spacing)) / 1000.0
    rel_h = relative_height(lungs, grid)
    depth, step = depth_mm(lungs, grid.spacing)
    return draw_emphysema(rng, grid, lung, rel_h, depth, step, subject.targets, lung_ml)


def _parenchyma(
    subject: PhantomSubject,
    grid: Grid,
    yl: np.ndarray,
    texture: np.ndarray,
    lung: np.ndarray,
    lesions: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Lung HU: normal parenchyma, denser posteriorly (gravity) and at shallow inspiration, with its texture, and the
    lesions painted in (PLE darker with a blurred edge, CLE lucencies, PSE walls and lumens)."""
    ple, cle, pse_outer, pse_lumen = lesions
    # severe emphysema comes with hyperinflation: the remaining lung is less dense too
    base = -880.0 + 45.0 * (1.0 - subject.inspiration) - 35.0 * min(subject.emphysema_fraction / 0.3, 1.0)
    parenchyma = base + 28.0 * np.clip(yl / 95.0, -1.0, 1.0) + 9.0 * texture
    if ple.any():
        w = ndi.gaussian_filter(ple.astype(np.float32), 2.0 / grid.spacing) * lung
        parenchyma = parenchyma * (1 - w) + (-972.0 + 6.0 * texture) * w
    parenchyma = parenchyma * (1 - cle) + np.float32(-992.0) * cle
    parenchyma = parenchyma * (1 - pse_outer) + np.float32(-250.0) * pse_outer
    return parenchyma * (1 - pse_lumen) + np.float32(-990.0) * pse_lumen


def _vessels_and_airways(hu: np.ndarray, v: np.ndarray, aw_outer: np.ndarray, aw_lumen: np.ndarray) -> np.ndarray:
    """``hu`` with the vessels (share ``v``), airway walls and airway lumens painted in."""
    hu = hu * (1 - v) + np.float32(40.0) * v
    hu = hu * (1 - aw_outer) + np.float32(30.0) * aw_outer
    return hu * (1 - aw_lumen) + np.float32(HU_AIR) * aw_lumen


def _phantom(
    seed: int, subject: PhantomSubject, image: np.ndarray, label: np.ndarray, lung_mask: np.ndarray, affine: np.ndarray
) -> dict[str, Any]:
    """The phantom's arrays with ``info``: the subject's parameters and the clinical measures of the final image."""
    from drasclr_ext.metrics.emphysema import emphysema_report

    info = {"case": f"phantom_{int(seed):05d}", "subject": json_safe(asdict(subject))}
    info.update(emphysema_report(image, lung_mask, affine, label))
    return {"image": image, "label": label, "lung_mask": lung_mask, "affine": affine, "info": info}


def _subject_grid(subject: PhantomSubject) -> Grid:
    """The voxel grid of the subject's scan, with the body placed in the field of view by the subject's offset."""
    sp = np.asarray(subject.spacing, float)
    shp = subject.shape
    s = np.asarray(subject.scale, float)
    off = np.asarray(subject.offset_mm, float)
    z0 = -(shp[2] * sp[2] - LUNG_HEIGHT * s[2]) * 0.55 + off[2]
    centre_index = np.array([(shp[0] - 1) / 2 + off[0] / sp[0], (shp[1] - 1) / 2 + (off[1] - 14.0 * s[1]) / sp[1]])
    return Grid(shp, sp, centre_index, z0)


def _lung_frame(grid: Grid, subject: PhantomSubject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable lung-frame coordinates (mm) of the voxel centres: the body frame over the subject's scale."""
    s = np.asarray(subject.scale, float)
    xb, yb, zb = grid.coords()
    return xb / np.float32(s[0]), yb / np.float32(s[1]), zb / np.float32(s[2])


def _lungs(grid: Grid, xl: np.ndarray, yl: np.ndarray, zl: np.ndarray, lung_template: Any) -> np.ndarray:
    """Lung labels (1 right, 2 left) at lung-frame coordinates, from the average adult or from ``lung_template``."""
    lungs = lung_labels_body_frame(xl, yl, zl) if lung_template is None else template_lungs(lung_template, xl, yl, zl)
    if not np.any(lungs == 1) or not np.any(lungs == 2):
        spacing = tuple(round(float(v), 3) for v in grid.spacing)
        raise DrasCLRError(
            f"shape {grid.shape} with spacing {spacing} mm does not hold both lungs: enlarge the field of view"
        )
    return lungs
