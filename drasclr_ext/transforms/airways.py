"""The trachea and main bronchi of a chest CT, found for the lung mask to remove them.

Works on the lung mask's coarse grid (about 2.5 mm) in physical space: the body axis, the patient's left-right axis
and their directions come from the affine, never from the array order. Steps:

1. **Seeds**: compact (0.5-8 cm^2), nearly pure air (median below -900 HU) regions inside the body and near its
   left-right centre, slice by slice from the top of the body down to the middle of the air inside it; the
   largest first in each slice.
2. **Growth** from a seed through the air inside the body, at the loosest HU threshold before it leaks (its volume
   jumps, or exceeds ``max_airway_ml``).
3. **Verification**: the tree reaches the lungs, and either divides at the carina into two branches, one on each
   side of the trachea, or starts at or above the lungs' apices (thick slices can blur a main bronchus away). An
   air-filled hose on the body, the pharynx above a closed glottis or a bronchus below the carina fails it, and
   the next seed is tried.

No seed passes: no airway is found (the lung mask's meta says ``airway_found: false``, reports get the
``airway_not_found`` quality flag).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
from scipy import ndimage

from drasclr_ext.geometry import axis_towards, voxel_spacing

if TYPE_CHECKING:
    from drasclr_ext.transforms.lung_mask import LungMaskParams

SEED_AREA_MM2 = (50.0, 800.0)  # adult trachea 15-25 mm wide: 180-500 mm^2; children and intubated lumens smaller
SEED_MAX_HU = -900.0  # median HU of a seed's pixels: the lumen is air
SEED_MIN_COMPACTNESS = 0.4  # pixels / bounding-box pixels: a round lumen, not a sliver
SEED_MAX_OFF_CENTRE = 0.25  # of the body's width in that slice
SEED_MAX_WIDTH = 0.35  # left-right extent, of the body's width
MAX_SEED_TRIALS = 24
CARINA_MIN_OFFSET_MM = 4.0  # each branch's centre at least this far to its side of the trachea's
APEX_AREA = 0.25  # lungs in the tree's top slice, of their largest slice: the trachea starts at the apices
LUNG_CONTACT_MM = 6.0  # the tree comes this close to a lung (through a bronchial wall)
PLANE = np.ones((3, 3), dtype=bool)  # 8-connectivity within a slice


def _plane_axes(ax_si: int) -> list[int]:
    return [a for a in range(3) if a != ax_si]


def trachea_seeds(
    candidates: np.ndarray, outside: np.ndarray, hu_c: np.ndarray, spacing_c: np.ndarray, affine_c: np.ndarray
) -> Iterator[np.ndarray]:
    """Seed masks (bool, coarse grid) of possible tracheas, top of the body first (see the module's step 1).

    Args:
        candidates: air inside the body (coarse grid).
        outside: air outside the body (connected to the border of its slice).
        hu_c: HU on the coarse grid.
        spacing_c: coarse voxel size (mm) per array axis.
        affine_c: the coarse grid's RAS affine.
    """
    ax_si, sign_si = axis_towards(affine_c, 2)
    ax_lr, _ = axis_towards(affine_c, 0)
    plane = _plane_axes(ax_si)
    lr = plane.index(ax_lr)  # the left-right axis inside a slice
    pixel_mm2 = float(spacing_c[plane[0]] * spacing_c[plane[1]])
    occupied = np.flatnonzero(candidates.any(axis=tuple(plane)))
    if occupied.size == 0:
        return
    top_down = occupied[::-1] if sign_si > 0 else occupied
    for k in top_down[: max(1, int(np.ceil(len(top_down) * 0.5)))]:
        sl = np.take(candidates, k, axis=ax_si)
        body = ~np.take(outside, k, axis=ax_si)
        body_lr = np.flatnonzero(body.any(axis=1 - lr))
        if body_lr.size == 0:
            continue
        centre, width = 0.5 * (body_lr[0] + body_lr[-1]), float(body_lr[-1] - body_lr[0] + 1)
        hu_sl = np.take(hu_c, k, axis=ax_si)
        lab, _ = ndimage.label(sl, structure=PLANE)
        found = []
        for j, obj in enumerate(ndimage.find_objects(lab), start=1):
            comp = lab[obj] == j
            area = float(comp.sum()) * pixel_mm2
            if not SEED_AREA_MM2[0] <= area <= SEED_AREA_MM2[1]:
                continue
            extent = [obj[i].stop - obj[i].start for i in range(2)]
            c_lr = float(np.nonzero(comp)[lr].mean()) + obj[lr].start
            if (
                abs(c_lr - centre) > SEED_MAX_OFF_CENTRE * width
                or comp.sum() / float(extent[0] * extent[1]) < SEED_MIN_COMPACTNESS
                or extent[lr] > SEED_MAX_WIDTH * width
                or np.median(hu_sl[obj][comp]) > SEED_MAX_HU
            ):
                continue
            found.append((area, obj, comp))
        for _, obj, comp in sorted(found, key=lambda f: -f[0]):
            seed_slice = np.zeros(sl.shape, dtype=bool)
            seed_slice[obj] = comp
            seed = np.zeros(candidates.shape, dtype=bool)
            index: list = [slice(None)] * 3
            index[ax_si] = k
            seed[tuple(index)] = seed_slice
            yield seed


class AirwayGrower:
    """Region growing from seeds through ``candidates`` at the thresholds of ``params.airway_thresholds``; the
    labelling at each threshold is computed once and shared by every seed."""

    def __init__(self, hu_c: np.ndarray, candidates: np.ndarray, voxel_ml: float, params: LungMaskParams) -> None:
        self.hu_c, self.candidates, self.voxel_ml, self.params = hu_c, candidates, voxel_ml, params
        self._labels: dict[float, np.ndarray] = {}

    def _labelled(self, threshold: float) -> np.ndarray:
        if threshold not in self._labels:
            self._labels[threshold] = ndimage.label(self.candidates & (self.hu_c < threshold))[0]
        return self._labels[threshold]

    def grow(self, seed: np.ndarray) -> np.ndarray:
        """The air connected to ``seed`` at the loosest threshold before a leak (see the module's step 2)."""
        params = self.params
        accepted, previous = seed.copy(), float(seed.sum()) * self.voxel_ml
        for threshold in params.airway_thresholds:
            labels = self._labelled(threshold)
            ids = np.unique(labels[seed])
            ids = ids[ids > 0]
            if ids.size == 0:
                continue
            region = np.isin(labels, ids)
            volume = float(region.sum()) * self.voxel_ml
            leaked = previous >= params.airway_leak_min_ml and volume > params.airway_leak_ratio * previous
            if volume > params.max_airway_ml or leaked:
                break
            accepted, previous = region | seed, volume
        return accepted


def divides_at_carina(tree: np.ndarray, seed: np.ndarray, affine_c: np.ndarray, spacing_c: np.ndarray) -> bool:
    """True when ``tree``, followed down from ``seed``, divides into two branches on either side of it."""
    ax_si, sign_si = axis_towards(affine_c, 2)
    ax_lr, _ = axis_towards(affine_c, 0)
    lr = _plane_axes(ax_si).index(ax_lr)
    min_offset = CARINA_MIN_OFFSET_MM / float(spacing_c[ax_lr])
    k = int(np.flatnonzero(seed.any(axis=tuple(_plane_axes(ax_si))))[0])
    centre = float(np.nonzero(np.take(seed, k, axis=ax_si))[lr].mean())
    while 0 <= k < tree.shape[ax_si]:
        lab, n = ndimage.label(np.take(tree, k, axis=ax_si), structure=PLANE)
        if n == 0:
            return False
        sizes = np.bincount(lab.ravel())[1:]
        big = [j + 1 for j in np.argsort(sizes)[::-1][:2] if sizes[j] >= 2]
        if len(big) == 1 or n == 1:
            centre = float(np.nonzero(lab == big[0] if big else lab > 0)[lr].mean())
        elif len(big) == 2:
            sides = [float(np.nonzero(lab == j)[lr].mean()) - centre for j in big]
            if min(sides) < -min_offset and max(sides) > min_offset:
                return True
        k -= sign_si  # one slice down
    return False


def touched_lungs(
    tree: np.ndarray, candidates: np.ndarray, spacing_c: np.ndarray, voxel_ml: float, min_ml: float
) -> Optional[np.ndarray]:
    """The air regions of at least ``min_ml`` (lungs) that ``tree`` comes within ``LUNG_CONTACT_MM`` of, or None."""
    box = ndimage.find_objects(tree.astype(np.uint8))[0]
    margin = np.ceil(LUNG_CONTACT_MM / spacing_c).astype(int)
    box = tuple(slice(max(0, b.start - m), b.stop + m) for b, m in zip(box, margin))
    near = ndimage.binary_dilation(tree[box], structure=ellipsoid(LUNG_CONTACT_MM / spacing_c))
    touched = near & candidates[box] & ~tree[box]
    if not touched.any():
        return None
    labels, _ = ndimage.label(candidates & ~tree)
    ids = np.unique(labels[box][touched])
    ids = ids[ids > 0]
    sizes = np.bincount(labels.ravel())
    ids = ids[sizes[ids] * voxel_ml >= min_ml]
    return np.isin(labels, ids) if ids.size else None


def starts_at_apex(tree: np.ndarray, lungs: np.ndarray, affine_c: np.ndarray) -> bool:
    """True when the lungs, in the top slice of ``tree``, are absent or small (under ``APEX_AREA`` of their largest
    slice): the tree starts at or above the apices, as a trachea does, not at a bronchus below a cut."""
    ax_si, sign_si = axis_towards(affine_c, 2)
    others = tuple(_plane_axes(ax_si))
    top = np.flatnonzero(tree.any(axis=others))[-1 if sign_si > 0 else 0]
    area = np.count_nonzero(lungs, axis=others)
    return bool(area[top] <= APEX_AREA * area.max())


def ellipsoid(radius_vox: np.ndarray) -> np.ndarray:
    """Ellipsoidal structuring element with the given radius (voxels) per axis (at least one voxel)."""
    radius_vox = np.maximum(np.asarray(radius_vox, dtype=np.float64), 1.0)
    r = np.floor(radius_vox).astype(int)
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g / rad) ** 2 for g, rad in zip(grids, radius_vox)) <= 1.0


def find_airways(
    hu_c: np.ndarray,
    candidates: np.ndarray,
    outside: np.ndarray,
    affine_c: np.ndarray,
    voxel_ml: float,
    params: LungMaskParams,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The trachea and main bronchi lumen (bool, coarse grid) and the seed they grew from; empty and None when no
    seed passes the verification (see the module's docstring)."""
    spacing_c = voxel_spacing(affine_c)
    grower = AirwayGrower(hu_c, candidates, voxel_ml, params)
    rejected = np.zeros(candidates.shape, dtype=bool)
    trials = 0
    for seed in trachea_seeds(candidates, outside, hu_c, spacing_c, affine_c):
        if rejected[seed].any():  # a seed on a structure that already failed
            continue
        if trials == MAX_SEED_TRIALS:
            break
        trials += 1
        tree = grower.grow(seed)
        lungs = touched_lungs(tree, candidates, spacing_c, voxel_ml, params.min_lung_ml / 2)
        if lungs is not None and (
            divides_at_carina(tree, seed, affine_c, spacing_c) or starts_at_apex(tree, lungs, affine_c)
        ):
            return tree, seed
        rejected |= tree
    return np.zeros(candidates.shape, dtype=bool), None
