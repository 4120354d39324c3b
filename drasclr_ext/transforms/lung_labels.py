"""The lungs on the lung mask's coarse grid: outside air, the two lungs labelled right and left by their world
position (split by erosion or along the mid-sagittal plane when they touch), and vessels and holes filled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from drasclr_ext.geometry import axis_towards

if TYPE_CHECKING:
    from drasclr_ext.transforms.lung_mask import LungMaskParams

__all__ = ["LEFT_LUNG", "RIGHT_LUNG", "fill_lungs", "label_lungs", "outside_air"]

RIGHT_LUNG = 1
LEFT_LUNG = 2


def _slice_structure(axial_axis: int) -> np.ndarray:
    """Connectivity within axial slices only (no neighbours across slices)."""
    s = ndimage.generate_binary_structure(3, 1)
    index: list[Any] = [slice(None)] * 3
    for k in (0, 2):
        index[axial_axis] = k
        s[tuple(index)] = False
    return s


def outside_air(air: np.ndarray, axial_axis: int) -> np.ndarray:
    """Air connected, within its axial slice, to the in-plane border of the volume (outside the body)."""
    labels, _ = ndimage.label(air, structure=_slice_structure(axial_axis))
    border = []
    for axis in range(3):
        if axis == axial_axis:
            continue
        border.append(np.take(labels, 0, axis=axis).ravel())
        border.append(np.take(labels, -1, axis=axis).ravel())
    ids = np.unique(np.concatenate(border))
    ids = ids[ids > 0]
    return np.isin(labels, ids)


def _components_by_size(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels, sizes


def _split_joined(component: np.ndarray, spacing_c: np.ndarray, midline_index: float, ax_lr: int) -> np.ndarray:
    """Split one component holding both lungs into two (1, 2 arbitrary) by erosion, else along the midline."""
    eroded = component.copy()
    for _ in range(8):
        eroded = ndimage.binary_erosion(eroded)
        labels, sizes = _components_by_size(eroded)
        order = np.argsort(sizes)[::-1]
        if len(order) >= 2 and sizes[order[1]] >= 0.1 * sizes[order[0]] and sizes[order[1]] > 0:
            seeds = np.zeros(component.shape, dtype=np.uint8)
            seeds[labels == order[0]] = 1
            seeds[labels == order[1]] = 2
            _, idx = ndimage.distance_transform_edt(seeds == 0, sampling=spacing_c, return_indices=True)
            nearest = seeds[tuple(idx)]
            return np.where(component, nearest, 0).astype(np.uint8)
        if not eroded.any():
            break
    positions = np.arange(component.shape[ax_lr]).reshape([-1 if a == ax_lr else 1 for a in range(3)])
    side = np.where(positions < midline_index, 1, 2).astype(np.uint8)
    return np.where(component, side, 0).astype(np.uint8)


def _world_lr(mask: np.ndarray, affine_c: np.ndarray) -> float:
    """World x of the centroid of ``mask``; in RAS, +x points to the patient's right."""
    centroid = np.array([*ndimage.center_of_mass(mask), 1.0])
    return float((affine_c @ centroid)[0])


def _thickness_mm(component: np.ndarray, axis: int, spacing: np.ndarray) -> float:
    """90th percentile, over the lines along ``axis`` that cross ``component``, of its thickness (mm) on them."""
    box = ndimage.find_objects(component.astype(np.uint8))[0]
    counts = np.count_nonzero(component[box], axis=axis)
    return float(np.percentile(counts[counts > 0], 90)) * float(spacing[axis])


def _lung_like(
    labels: np.ndarray,
    sizes: np.ndarray,
    hu_c: np.ndarray,
    affine_c: np.ndarray,
    spacing_c: np.ndarray,
    voxel_ml: float,
    params: LungMaskParams,
) -> list[int]:
    """The components, largest first, that are large enough, not gas (median HU) and thick from front to back."""
    ax_ap, _ = axis_towards(affine_c, 1)
    keep = []
    for j in np.argsort(sizes)[::-1]:
        if sizes[j] * voxel_ml < params.min_component_ml:
            break
        component = labels == j
        if (
            np.median(hu_c[component]) >= params.lung_like_median_hu
            and _thickness_mm(component, ax_ap, spacing_c) >= params.min_lung_thickness_mm
        ):
            keep.append(j)
    return keep


def _midline_index(main: np.ndarray, affine_c: np.ndarray, midline_x: float, ax_lr: int) -> float:
    """Array index of the midline (world x ``midline_x``) along the left-right axis, at the centroid of ``main``."""
    centre_world = affine_c[:3, :3] @ np.array([*ndimage.center_of_mass(main)]) + affine_c[:3, 3]
    centre_world[0] = midline_x
    return float(np.linalg.solve(affine_c[:3, :3], centre_world - affine_c[:3, 3])[ax_lr])


def _lung_parts(
    labels: np.ndarray,
    sizes: np.ndarray,
    keep: list[int],
    main: np.ndarray,
    spacing_c: np.ndarray,
    midline_index: float,
    ax_lr: int,
) -> list[np.ndarray]:
    """The lungs among the kept components (``main``: the largest): the two largest when the second is large too,
    else the largest split in two when it spans both sides of the midline (the lungs touch), else the largest."""
    if len(keep) > 1 and sizes[keep[1]] >= 0.15 * sizes[keep[0]]:
        return [main, labels == keep[1]]
    positions = np.nonzero(main)[ax_lr]
    frac_low = float(np.mean(positions < midline_index))
    if min(frac_low, 1.0 - frac_low) > 0.2:  # one component spanning both sides: the lungs touch
        split = _split_joined(main, spacing_c, midline_index, ax_lr)
        return [split == 1, split == 2]
    return [main]


def _label_sides(out: np.ndarray, parts: list[np.ndarray], affine_c: np.ndarray, midline_x: float) -> None:
    """Label each part right or left of the midline in ``out``; two parts on one side of a poor midline by order."""
    for part in parts:
        x = _world_lr(part, affine_c)
        # RAS: world x grows towards the patient's Right (DICOM LPS: towards the Left)
        out[part] = RIGHT_LUNG if x > midline_x else LEFT_LUNG
    if len(parts) == 2 and len(np.unique(out[out > 0])) == 1:  # both on one side of a poor midline: by order
        xs = [_world_lr(p, affine_c) for p in parts]
        right = int(np.argmax(xs))
        out[parts[right]] = RIGHT_LUNG
        out[parts[1 - right]] = LEFT_LUNG


def label_lungs(
    lungs: np.ndarray,
    hu_c: np.ndarray,
    affine_c: np.ndarray,
    spacing_c: np.ndarray,
    midline_x: float | None,
    voxel_ml: float,
    params: LungMaskParams,
) -> np.ndarray:
    """Right (1) and left (2) lungs among the lung-like components of ``lungs`` (coarse grid): large enough, not
    gas (median HU) and thick from front to back (a table's foam core is air enclosed in its slices, but flat)."""
    labels, sizes = _components_by_size(lungs)
    keep = _lung_like(labels, sizes, hu_c, affine_c, spacing_c, voxel_ml, params)
    out = np.zeros(lungs.shape, dtype=np.uint8)
    if not keep:
        return out
    ax_lr, _ = axis_towards(affine_c, 0)
    main = labels == keep[0]
    if midline_x is None:
        midline_x = _world_lr(main, affine_c)
    midline_index = _midline_index(main, affine_c, midline_x, ax_lr)
    _label_sides(out, _lung_parts(labels, sizes, keep, main, spacing_c, midline_index, ax_lr), affine_c, midline_x)
    return out


def fill_lungs(labels: np.ndarray, spacing_c: np.ndarray, axial_axis: int, radius_mm: float) -> np.ndarray:
    """Close and hole-fill each lung (vessels, nodules), without letting one lung take the other's voxels.

    Closing by ``radius_mm`` (iterated 6-connected steps), then per-slice hole filling (which also fills every
    cavity enclosed in 3D), each lung inside its own bounding box.
    """
    out = labels.copy()
    iterations = max(1, int(round(radius_mm / float(np.min(spacing_c)))))
    cross = ndimage.generate_binary_structure(3, 1)
    s2d = _slice_structure(axial_axis)
    for lab in (RIGHT_LUNG, LEFT_LUNG):
        m = labels == lab
        if not m.any():
            continue
        box = ndimage.find_objects(m.astype(np.uint8))[0]
        padded = np.pad(m[box], iterations + 1)
        closed = ndimage.binary_closing(padded, structure=cross, iterations=iterations)
        closed = closed[(slice(iterations + 1, -(iterations + 1)),) * 3]
        closed = ndimage.binary_fill_holes(closed, structure=s2d)
        region = out[box]
        region[closed & (labels[box] == 0)] = lab
    return out
