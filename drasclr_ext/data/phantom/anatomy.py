"""Anatomy of the phantoms: the average adult's lungs (analytic, body frame), a lung template's shape, the body
around them, and the vessel and airway trees."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

from drasclr_ext.data.phantom.grid import Grid, diag_affine, paint_capsules, sample_points
from drasclr_ext.errors import InputImageError

if TYPE_CHECKING:
    from drasclr_ext.data.phantom.subject import PhantomSubject

LUNG_HEIGHT = 262.0  # lowest costophrenic recess to apex
_LUNG_HALF_WIDTH = 66.0  # lateral-medial semi-axis of one lung at its widest
_LUNG_HALF_DEPTH = 95.0  # anterior-posterior semi-axis
_LUNG_CENTRE_X = 78.0  # |x| of a lung's centre
_LUNG_CENTRE_Y = 14.0  # slightly posterior
_SUPERELLIPSE_P = 2.2
_CANONICAL_MARGIN_MM = 12.0
HU_AIR = -1000.0


def _lung_cross_section(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-height scale, |centre x| and centre y of a lung for relative heights ``t`` (0 base, 1 apex)."""
    above = np.clip((t - 0.38) / 0.62, 0.0, 1.0)
    below = np.clip((0.38 - t) / 0.38, 0.0, 1.0)
    scale = np.where(t < 0.0, 0.0, np.clip(1.0 - above**2, 0.0, 1.0) ** 0.65 * (1.0 + 0.07 * below))
    scale_ap = np.clip(1.0 - above**2.2, 0.0, 1.0) ** 0.55
    centre_x = _LUNG_CENTRE_X - 22.0 * above
    centre_y = _LUNG_CENTRE_Y + 22.0 * above
    return scale, scale_ap, centre_x, centre_y


def lung_labels_body_frame(x: np.ndarray, y: np.ndarray, z: np.ndarray, height: float = LUNG_HEIGHT) -> np.ndarray:
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


def _mediastinum_body_frame(x: np.ndarray, y: np.ndarray, z: np.ndarray, height: float = LUNG_HEIGHT) -> np.ndarray:
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


def canonical_lung_mask(spacing_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Lungs of the generator's average adult: uint8 labels (1 right, 2 left) and their RAS affine.

    The grid is the lungs' bounding box plus a 12 mm margin, LPS-ordered (affine ``diag(-s, -s, s)``); world z = 0
    lies at the lung bases.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    # evaluate on a generous box, then crop to the lungs' bounding box plus the margin
    lo = np.array([-190.0, -110.0, -5.0])
    hi = np.array([190.0, 140.0, LUNG_HEIGHT + 5.0])
    axes = [lo[d] + spacing_mm * np.arange(int(np.ceil((hi[d] - lo[d]) / spacing_mm)) + 1) for d in range(3)]
    labels = lung_labels_body_frame(axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
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
    affine = diag_affine((spacing_mm,) * 3, np.array([-corner[0], -corner[1], corner[2]]))
    return labels, affine


def template_lungs(template, xl: np.ndarray, yl: np.ndarray, zl: np.ndarray) -> np.ndarray:
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


def body_anatomy(xl, yl, zl, lungs: np.ndarray, subject: PhantomSubject) -> tuple[np.ndarray, np.ndarray]:
    """Clean HU of everything but the lung parenchyma, and the thorax soft-tissue mask where vessels may run."""
    height = LUNG_HEIGHT
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
    hu = np.full(np.broadcast_shapes(xl.shape, yl.shape, zl.shape), HU_AIR, dtype=np.float32)
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
    hu[stomach & inner] = HU_AIR
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


def great_vessels_and_airways(subject_height: float) -> dict[str, np.ndarray]:
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


def partition_tree(
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


def perpendicular(d: np.ndarray) -> np.ndarray:
    """Unit vectors perpendicular to the rows of ``d`` (toward posterior where possible)."""
    d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
    ref = np.tile([0.0, 1.0, 0.0], (len(d), 1))
    ref[np.abs(d[:, 1]) > 0.9] = [1.0, 0.0, 0.0]
    p = ref - (ref * d).sum(1, keepdims=True) * d
    return p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-9)


_ARTERY_ROOTS = {1: (-52.0, 6.0, 0.56), 2: (48.0, 8.0, 0.55)}  # lung frame x, y (mm), relative height
_VEIN_ROOTS = {1: (-38.0, 22.0, 0.38), 2: (36.0, 22.0, 0.37)}


def paint_vessels_and_airways(
    rng: np.random.Generator, grid: Grid, lungs: np.ndarray, ple: np.ndarray, scale: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessel trees (arteries and veins per lung), bronchi beside the larger arteries, the great vessels and the
    trachea with the main bronchi, as partial-volume fractions: (vessels, airway outer wall, airway lumen).

    Panlobular lung (``ple``) prunes the thin vessels and narrows the larger ones; ``scale`` is the subject's.
    """
    shp, sp, s = grid.shape, grid.spacing, np.asarray(scale, float)
    vessels = np.zeros(shp, dtype=np.float32)
    aw_outer = np.zeros(shp, dtype=np.float32)
    aw_lumen = np.zeros(shp, dtype=np.float32)
    mean_scale = float(np.cbrt(np.prod(s)))
    for label in (1, 2):
        for roots, n_points, r0, is_artery in ((_ARTERY_ROOTS, 1500, 6.5, True), (_VEIN_ROOTS, 1200, 6.0, False)):
            rx, ry, rz = roots[label]
            root = np.array([rx * s[0], ry * s[1], rz * LUNG_HEIGHT * s[2]])
            # coarse grids cannot show the finest vessels: fewer end points (thicker terminal branches)
            n_points = int(n_points * np.clip((1.5 / float(np.mean(sp[:2]))) ** 2, 0.1, 1.0))
            pts = sample_points(rng, lungs == label, grid, n_points)
            a, b, r = partition_tree(rng, root, pts, r0 * mean_scale, 0.45)
            if ple.any():  # vessel pruning: thin vessels vanish and larger ones narrow in panlobular lung
                ends = np.clip(np.round(grid.to_index(b)).astype(int), 0, np.array(shp) - 1)
                in_ple = ple[tuple(ends.T)]
                keep = ~(in_ple & (r < 1.3))
                r = np.where(in_ple, 0.7 * r, r)
                a, b, r = a[keep], b[keep], r[keep]
            paint_capsules(vessels, grid, a, b, r)
            if is_artery:
                big = r >= 1.4
                rb = 0.75 * r[big]
                wall_b = 0.2 * rb + 0.4
                shift = perpendicular(b[big] - a[big]) * (r[big] + rb + wall_b)[:, None]
                paint_capsules(aw_outer, grid, a[big] + shift, b[big] + shift, rb + wall_b)
                paint_capsules(aw_lumen, grid, a[big] + shift, b[big] + shift, rb)
    central = great_vessels_and_airways(LUNG_HEIGHT)
    a, b, r = central["blood"]
    paint_capsules(vessels, grid, a * s, b * s, r * mean_scale)
    a, b, r = central["airway"]
    paint_capsules(aw_outer, grid, a * s, b * s, (r + 2.0) * mean_scale)
    paint_capsules(aw_lumen, grid, a * s, b * s, r * mean_scale)
    return vessels, aw_outer, aw_lumen
