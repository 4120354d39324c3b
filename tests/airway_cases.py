"""Hard cases for the airway finder, made from one chest CT: the same patient stored, cropped, sampled and
surrounded differently. Every variant is an (array, RAS affine) pair; :func:`to_grid` brings its mask back onto
the original grid through the affines, so results can be compared voxel by voxel with the original's.

Geometric variants (flips, axis permutations, padding, crops) keep every voxel value; the others add objects
(a table, tubes, a neck) or resample along the slice axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import ndimage

from drasclr_ext.geometry import axis_towards, voxel_spacing

OUTSIDE = 255  # to_grid's value where the variant does not cover the original grid


@dataclass
class Variant:
    name: str
    hu: np.ndarray
    affine: np.ndarray


def block_downsample(hu: np.ndarray, affine: np.ndarray, factors: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over blocks of ``factors`` voxels (a cheaper scan of the same patient), with its affine."""
    f = tuple(int(k) for k in factors)
    shape = tuple(n // k * k for n, k in zip(hu.shape, f))
    arr = np.asarray(hu, np.float32)[: shape[0], : shape[1], : shape[2]]
    arr = arr.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2]).mean(axis=(1, 3, 5))
    scale = np.diag([*f, 1.0])
    scale[:3, 3] = (np.asarray(f) - 1) / 2.0
    return np.ascontiguousarray(arr, dtype=np.float32), affine @ scale


def flipped(hu: np.ndarray, affine: np.ndarray, axes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The array reversed along ``axes``, with the affine that keeps every voxel at its world position."""
    flip = np.eye(4)
    for a in axes:
        flip[a, a], flip[a, 3] = -1.0, hu.shape[a] - 1
    return np.ascontiguousarray(np.flip(hu, axis=tuple(axes))), affine @ flip


def permuted(hu: np.ndarray, affine: np.ndarray, order: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Array axes in ``order`` (new axis k is old axis order[k]), affine columns to match."""
    perm = np.eye(4)[:, [*order, 3]]
    return np.ascontiguousarray(np.transpose(hu, order)), affine @ perm


def padded(hu: np.ndarray, affine: np.ndarray, widths: Sequence[tuple[int, int]], value: float = -1024.0):
    """Air added around the scan (``widths``: voxels before/after per axis): the patient off the FOV centre."""
    out = np.pad(hu, [tuple(w) for w in widths], constant_values=value)
    shift = np.eye(4)
    shift[:3, 3] = [-w[0] for w in widths]
    return out, affine @ shift


def cropped(hu: np.ndarray, affine: np.ndarray, box: Sequence[slice]) -> tuple[np.ndarray, np.ndarray]:
    """A sub-box of the scan, with its affine."""
    starts = [s.start or 0 for s in box]
    shift = np.eye(4)
    shift[:3, 3] = starts
    return np.ascontiguousarray(hu[tuple(box)]), affine @ shift


def world_axis_box(hu: np.ndarray, affine: np.ndarray, world_axis: int, low_mm: float, high_mm: float) -> list:
    """The index box keeping world coordinate ``world_axis`` between ``low_mm`` and ``high_mm``."""
    axis, _ = axis_towards(affine, world_axis)
    coords = affine[world_axis, axis] * np.arange(hu.shape[axis]) + affine[world_axis, 3]
    keep = np.flatnonzero((coords >= low_mm) & (coords <= high_mm))
    box = [slice(None)] * 3
    box[axis] = slice(int(keep.min()), int(keep.max()) + 1)
    return box


def resampled_slices(hu: np.ndarray, affine: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Slices resampled (linear) to ``spacing_mm`` along the body axis: a thinner or thicker reconstruction."""
    axis, _ = axis_towards(affine, 2)
    step = spacing_mm / voxel_spacing(affine)[axis]
    n = int(np.floor((hu.shape[axis] - 1) / step)) + 1
    positions = np.arange(n) * step
    if step > 1:  # a thick slice averages what it covers
        hu = ndimage.uniform_filter1d(np.asarray(hu, np.float32), size=max(1, int(round(step))), axis=axis)
    lo = np.clip(np.floor(positions).astype(int), 0, hu.shape[axis] - 1)
    hi = np.clip(lo + 1, 0, hu.shape[axis] - 1)
    w = (positions - lo).reshape([-1 if a == axis else 1 for a in range(3)])
    out = np.take(hu, lo, axis=axis) * (1 - w) + np.take(hu, hi, axis=axis) * w
    scale = np.eye(4)
    scale[axis, axis] = step
    return np.ascontiguousarray(out, dtype=np.float32), affine @ scale


def _world_grid(shape: Sequence[int], affine: np.ndarray) -> list[np.ndarray]:
    """RAS coordinates (mm) of every voxel, as three broadcastable arrays (axis-aligned affines)."""
    out = [np.zeros([1, 1, 1]) for _ in range(3)]
    for w in range(3):
        for a in range(3):
            if abs(affine[w, a]) > 1e-6:
                out[w] = out[w] + (affine[w, a] * np.arange(shape[a])).reshape([-1 if k == a else 1 for k in range(3)])
        out[w] = out[w] + affine[w, 3]
    return out


def body_extent(hu: np.ndarray, affine: np.ndarray, world_axis: int) -> tuple[float, float]:
    """World range (mm) of the patient's body (the largest soft-tissue component) along ``world_axis``."""
    body, n = ndimage.label(ndimage.binary_opening(hu > -400, iterations=2))
    sizes = np.bincount(body.ravel())
    sizes[0] = 0
    coords = _world_grid(hu.shape, affine)[world_axis]
    values = np.broadcast_to(coords, hu.shape)[body == int(np.argmax(sizes))]
    return float(values.min()), float(values.max())


def with_table(hu: np.ndarray, affine: np.ndarray, foam_core: bool = True, width_mm: float = 440.0):
    """A patient table under the back: 4 mm shells (+250 HU) around a 30 mm foam core (-880 HU, enclosed, as on
    carbon-fibre tables), or a solid 20 mm slab (+200 HU) when ``foam_core`` is False; narrower than the field of
    view, so the core is air enclosed in the slice. The FOV grows backwards if needed."""
    thickness = 38.0 if foam_core else 20.0
    ax_ap, sign = axis_towards(affine, 1)
    back_mm = body_extent(hu, affine, 1)[0]  # RAS y: the most posterior point of the body
    sp = voxel_spacing(affine)[ax_ap]
    origin_y = affine[1, 3] if sign > 0 else affine[1, 3] + affine[1, ax_ap] * (hu.shape[ax_ap] - 1)
    need = int(np.ceil(max(0.0, origin_y - (back_mm - thickness - 15.0)) / sp))
    widths = [(0, 0)] * 3
    widths[ax_ap] = (need, 0) if sign > 0 else (0, need)
    hu, affine = padded(hu, affine, widths)
    hu = hu.copy()
    x, y, _ = _world_grid(hu.shape, affine)
    centre_x = 0.5 * sum(body_extent(hu, affine, 0))
    ax_lr = axis_towards(affine, 0)[0]
    width_mm = min(width_mm, (hu.shape[ax_lr] - 4) * voxel_spacing(affine)[ax_lr])  # inside the FOV: core enclosed
    depth = back_mm - y  # mm below the back
    across = np.abs(x - centre_x) <= width_mm / 2
    slab = np.broadcast_to(across & (depth > 0) & (depth <= thickness), hu.shape)
    hu[slab] = 250.0 if foam_core else 200.0
    if foam_core:
        core = across & (np.abs(x - centre_x) <= width_mm / 2 - 4.0) & (depth > 4.0) & (depth <= thickness - 4.0)
        hu[np.broadcast_to(core, hu.shape)] = -880.0
    return hu, affine


def _paint_tube(hu: np.ndarray, affine: np.ndarray, centre: Callable, z_range, r_in: float, r_out: float):
    """An air-filled plastic tube (+100 HU wall) along the body axis; ``centre(z)`` gives its RAS (x, y) at z."""
    x, y, z = _world_grid(hu.shape, affine)
    cx, cy = np.vectorize(centre)(z)
    d = np.broadcast_to(np.sqrt((x - cx) ** 2 + (y - cy) ** 2), hu.shape)
    along = np.broadcast_to((z >= z_range[0]) & (z <= z_range[1]), hu.shape)
    out = hu.copy()
    out[along & (d <= r_out)] = 100.0
    out[along & (d <= r_in)] = -1000.0
    return out


def trachea_centreline(hu: np.ndarray, affine: np.ndarray, airway: np.ndarray) -> tuple[Callable, float, float]:
    """World (x, y) of the trachea's lumen per height, from a found airway mask; and its lowest and highest z."""
    ax_si, sign = axis_towards(affine, 2)
    rows = []
    for k in range(hu.shape[ax_si]):
        lumen = np.take(airway, k, axis=ax_si) & (np.take(hu, k, axis=ax_si) < -800)
        lab, n = ndimage.label(lumen)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        if n > 1 and np.sort(sizes)[-2] > 0.2 * sizes.max():  # two bronchi: below the trachea
            continue
        idx = np.argwhere(lab == int(np.argmax(sizes)) + 1).mean(axis=0)
        ijk = np.insert(idx, ax_si, k)
        rows.append((affine @ np.array([*ijk, 1.0]))[:3])
    rows = np.array(sorted(rows, key=lambda r: r[2]))
    lo, hi = float(rows[0, 2]), float(rows[-1, 2])

    def centre(z: float) -> tuple[float, float]:
        return float(np.interp(z, rows[:, 2], rows[:, 0])), float(np.interp(z, rows[:, 2], rows[:, 1]))

    return centre, lo, hi


def with_endotracheal_tube(hu: np.ndarray, affine: np.ndarray, airway: np.ndarray) -> np.ndarray:
    """An endotracheal tube (7.5 mm inner, 10.5 mm outer diameter) down the trachea, ending 30 mm above its lowest
    single-lumen level, from the top of the scan."""
    centre, lo, hi = trachea_centreline(hu, affine, airway)
    return _paint_tube(hu, affine, centre, (lo + 30.0, np.inf), 3.75, 5.25)


def with_external_tube(hu: np.ndarray, affine: np.ndarray, inner_mm: float = 24.0, wall_mm: float = 4.0):
    """A ventilator hose (air, ``wall_mm`` wall, closed at 2.5 mm voxels) lying along the front of the chest on the
    midline, the whole scan long: wider than a trachea, and on an axial slice a compact, midline air tube as well."""
    x0, x1 = body_extent(hu, affine, 0)
    front = body_extent(hu, affine, 1)[1]
    r_out = inner_mm / 2 + wall_mm
    cx, cy = 0.5 * (x0 + x1), front + r_out - 1.0  # resting on the skin
    return _paint_tube(hu, affine, lambda z: (cx, cy), (-np.inf, np.inf), inner_mm / 2, r_out)


def with_neck(
    hu: np.ndarray, affine: np.ndarray, airway: np.ndarray, height_mm: float = 120.0, glottis_mm: float = 3.0
):
    """The scan extended upwards by a synthetic neck: soft tissue around the trachea, a larynx narrowing to a
    ``glottis_mm`` slit, then a wide pharynx open to the mouth (air towards the front), as a large-bore scan shows."""
    centre, _, top = trachea_centreline(hu, affine, airway)
    ax_si, sign = axis_towards(affine, 2)
    sp = voxel_spacing(affine)[ax_si]
    n_new = int(round(height_mm / sp))
    widths = [(0, 0)] * 3
    widths[ax_si] = (0, n_new) if sign > 0 else (n_new, 0)
    z_top = float(affine[2, 3] + max(0.0, affine[2, ax_si] * (hu.shape[ax_si] - 1)))  # the top slice's height
    out, affine_out = padded(hu, affine, widths)
    x, y, z = _world_grid(out.shape, affine_out)
    tx, ty = centre(top)
    h = z - z_top  # mm above the original top
    new = np.broadcast_to(h > 0, out.shape)
    neck = ((x - tx) / 60.0) ** 2 + ((y - (ty - 20.0)) / 55.0) ** 2 <= 1.0
    spine = ((x - tx) ** 2 + (y - (ty - 45.0)) ** 2) <= 14.0**2
    r_trachea = 8.0
    d = np.sqrt((x - tx) ** 2 + (y - ty) ** 2)
    trachea = (d <= r_trachea) & (h <= 40.0)
    glottis = (np.abs(x - tx) <= 6.0) & (np.abs(y - ty) <= glottis_mm / 2) & (h > 40.0) & (h <= 50.0) & (glottis_mm > 0)
    pharynx = (((x - tx) / 18.0) ** 2 + ((y - (ty - 6.0)) / 9.0) ** 2 <= 1.0) & (h > 50.0)
    mouth = (((x - tx) / 22.0) ** 2 + ((y - (ty + 15.0)) / 14.0) ** 2 <= 1.0) & (h > 85.0)
    value = np.where(neck, 40.0, -1000.0)
    value = np.where(spine, 400.0, value)
    value = np.where(trachea | glottis | pharynx | mouth, -1000.0, value)
    out = out.copy()
    out[new] = np.broadcast_to(value, out.shape)[new]
    return out, affine_out


def to_grid(
    values: np.ndarray, affine: np.ndarray, shape: Sequence[int], grid_affine: np.ndarray, fill: float = OUTSIDE
) -> np.ndarray:
    """``values`` (on ``affine``) at the voxels of another axis-aligned grid (nearest voxel); ``fill`` where it has
    none. Exact for flips, permutations, crops and padding (no interpolation)."""
    m = np.linalg.inv(affine) @ grid_affine  # grid index -> index of ``values``
    index, valid = [], np.ones(tuple(shape), dtype=bool)
    for i in range(3):
        j = int(np.argmax(np.abs(m[i, :3])))
        k = np.rint(m[i, j] * np.arange(shape[j]) + m[i, 3]).astype(int)
        ok = (k >= 0) & (k < values.shape[i])
        view = [1, 1, 1]
        view[j] = -1
        index.append(np.clip(k, 0, values.shape[i] - 1).reshape(view))
        valid &= ok.reshape(view)
    out = np.asarray(values)[tuple(index)]
    out = np.broadcast_to(out, tuple(shape)).copy() if out.shape != tuple(shape) else out
    out[~valid] = fill
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def agreement(
    labels: np.ndarray, affine: np.ndarray, reference: np.ndarray, grid_affine: np.ndarray, covered: Optional = None
) -> tuple[float, np.ndarray]:
    """Dice (any lung) of a variant's labels against the reference labels, where the variant covers the grid."""
    back = to_grid(labels, affine, reference.shape, grid_affine)
    inside = back != OUTSIDE if covered is None else covered
    return dice((back > 0) & (back != OUTSIDE) & inside, (reference > 0) & inside), inside


# kinds of hard case, each with its own tolerance in the tests
RESTORED = "restored"  # the same voxels stored or framed differently: flips, permutations, padding, crops
ADDED = "added"  # objects added around the patient: a table, tubes, a neck
RESAMPLED = "resampled"  # other slice spacing: partial volumes change
NO_AIRWAY = "no airway"  # cropped below the carina: nothing to find


def hard_cases(hu: np.ndarray, affine: np.ndarray, airway: np.ndarray, lungs: np.ndarray) -> dict[str, tuple]:
    """The hard cases of one scan: ``{name: (kind, build)}``, ``build()`` giving the variant's (hu, affine).

    ``airway`` and ``lungs`` are the scan's own airway and lung masks (to place the carina, apex and tubes).
    """
    ax_si, _ = axis_towards(affine, 2)
    lr, ap = axis_towards(affine, 0)[0], axis_towards(affine, 1)[0]
    z = np.broadcast_to(_world_grid(hu.shape, affine)[2], hu.shape)
    apex = float(z[lungs > 0].max())
    carina = float(z[airway].min())
    sp = voxel_spacing(affine)
    widths = [(0, 0)] * 3
    widths[lr] = (0, int(120 / sp[lr]))
    widths[ap] = (int(80 / sp[ap]), 0)
    below_top = lambda top: cropped(hu, affine, world_axis_box(hu, affine, 2, -np.inf, top))  # noqa: E731
    return {
        "as stored": (RESTORED, lambda: (hu, affine)),
        "flip LR": (RESTORED, lambda: flipped(hu, affine, [lr])),
        "flip AP": (RESTORED, lambda: flipped(hu, affine, [ap])),
        "slices reversed (flip SI)": (RESTORED, lambda: flipped(hu, affine, [ax_si])),
        "flip all": (RESTORED, lambda: flipped(hu, affine, [0, 1, 2])),
        "axes permuted (2, 0, 1)": (RESTORED, lambda: permuted(hu, affine, (2, 0, 1))),
        "axes permuted (1, 2, 0) + flip": (RESTORED, lambda: flipped(*permuted(hu, affine, (1, 2, 0)), [0])),
        "off-centre (+120 mm air beside, +80 mm behind)": (RESTORED, lambda: padded(hu, affine, widths)),
        "crop 10 mm above the apex": (RESTORED, lambda: below_top(apex + 10.0)),
        "crop at the apex": (RESTORED, lambda: below_top(apex)),
        "crop 20 mm below the carina": (NO_AIRWAY, lambda: below_top(carina - 20.0)),
        "table (solid slab)": (ADDED, lambda: with_table(hu, affine, foam_core=False)),
        "table (foam core)": (ADDED, lambda: with_table(hu, affine, foam_core=True)),
        "endotracheal tube": (ADDED, lambda: (with_endotracheal_tube(hu, affine, airway), affine)),
        "ventilator hose on the chest": (ADDED, lambda: (with_external_tube(hu, affine), affine)),
        "neck in view (open glottis)": (ADDED, lambda: with_neck(hu, affine, airway, glottis_mm=4.0)),
        "neck in view (closed glottis)": (ADDED, lambda: with_neck(hu, affine, airway, glottis_mm=0.0)),
        "half the slice spacing": (RESAMPLED, lambda: resampled_slices(hu, affine, sp[ax_si] / 2)),
        "twice the slice spacing": (RESAMPLED, lambda: resampled_slices(hu, affine, sp[ax_si] * 2)),
    }
