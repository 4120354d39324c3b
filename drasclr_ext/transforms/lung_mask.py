"""A classical, weight-free lung segmentation of CT in HU: labels 0 background, 1 right lung, 2 left lung.

Pipeline (on a ~2.5 mm grid for speed, then refined at the boundary on the input grid):
the scan taken in one canonical axis order (from its affine: the result does not depend on how the array is
stored) -> air below ``threshold`` HU -> outside air removed (air touching the border of its axial slice) ->
trachea and main bronchi found and verified (:mod:`~drasclr_ext.transforms.airways`), dilated and removed -> the
two large, thick lung-like components labelled right/left by their world position (split by erosion or along the
mid-sagittal plane when they touch) -> vessels and holes filled (closing, per-slice and 3D hole filling) ->
nearest-neighbour upsampling, with boundary voxels re-thresholded at full resolution.

Optionally ``method="lungmask"`` runs the ``lungmask`` package (a U-Net, when the user has installed it and its
weights); it is never required.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

from drasclr_ext.errors import DrasCLRError, InputImageError
from drasclr_ext.geometry import axis_towards, memory_layout, voxel_spacing
from drasclr_ext.transforms.airways import ellipsoid, find_airways
from drasclr_ext.transforms.contrast import blood_pool_hu

RIGHT_LUNG = 1
LEFT_LUNG = 2
METHODS = ("classical", "lungmask")


@dataclass(frozen=True)
class LungMaskParams:
    """Settings of the classical pipeline (HU thresholds, grid, size limits)."""

    threshold: float = -320.0  # lung (air + parenchyma) vs tissue
    target_spacing: float = 2.5  # mm, working grid
    airway_thresholds: tuple[float, ...] = (-975.0, -960.0, -945.0, -930.0, -915.0, -900.0, -875.0, -850.0)
    max_airway_ml: float = 250.0
    airway_leak_ratio: float = 1.8  # once the tree holds airway_leak_min_ml, growing faster than this is a leak
    airway_leak_min_ml: float = 10.0
    lung_like_median_hu: float = -975.0  # components whose median is below this are gas (bowel, stomach), not lung
    min_lung_thickness_mm: float = 40.0  # front to back (90th percentile): thinner air is a table's foam core
    min_lung_ml: float = 300.0  # both lungs together; below this no lungs were found
    min_component_ml: float = 20.0
    fill_radius_mm: float = 5.0


# ---------------------------------------------------------------- geometry helpers


def _block_mean(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of ``factors`` voxels (partial blocks at the far edges averaged over what exists)."""
    if factors == (1, 1, 1):
        return np.asarray(hu, dtype=np.float32)
    arr = np.asarray(hu, dtype=np.float32)
    fortran = memory_layout(arr) == "F"  # NIfTI/ITK arrays: pool the C-ordered view
    x = torch.from_numpy(arr.T if fortran else np.ascontiguousarray(arr))[None, None]
    kernel = tuple(reversed(factors)) if fortran else factors
    with torch.no_grad():
        y = torch.nn.functional.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)[0, 0].numpy()
    return np.ascontiguousarray(y.T) if fortran else y


def _upsample(
    labels: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...], layout: str = "C"
) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse grid made by ``_block_mean`` back to ``shape``, in the memory
    order ``layout`` ("F": that of NIfTI and ITK volumes, built as the transpose of a C-ordered upsampling)."""
    if layout == "F":
        return _upsample(labels.T, factors[::-1], tuple(shape)[::-1]).T  # type: ignore[arg-type]
    out = labels
    for axis, f in enumerate(factors):
        if f > 1:
            out = out.repeat(f, axis=axis)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


def _slice_structure(axial_axis: int) -> np.ndarray:
    """Connectivity within axial slices only (no neighbours across slices)."""
    s = ndimage.generate_binary_structure(3, 1)
    index: list[Any] = [slice(None)] * 3
    for k in (0, 2):
        index[axial_axis] = k
        s[tuple(index)] = False
    return s


# ---------------------------------------------------------------- pipeline steps


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
    out = np.zeros(lungs.shape, dtype=np.uint8)
    if not keep:
        return out
    ax_lr, _ = axis_towards(affine_c, 0)
    main = labels == keep[0]
    if midline_x is None:
        midline_x = _world_lr(main, affine_c)
    # array index of the midline along the left-right axis, at the main component's centroid
    centre_world = affine_c[:3, :3] @ np.array([*ndimage.center_of_mass(main)]) + affine_c[:3, 3]
    centre_world[0] = midline_x
    midline_index = float(np.linalg.solve(affine_c[:3, :3], centre_world - affine_c[:3, 3])[ax_lr])
    parts: list[np.ndarray] = []
    second_big = len(keep) > 1 and sizes[keep[1]] >= 0.15 * sizes[keep[0]]
    if second_big:
        parts = [main, labels == keep[1]]
    else:
        positions = np.nonzero(main)[ax_lr]
        frac_low = float(np.mean(positions < midline_index))
        if min(frac_low, 1.0 - frac_low) > 0.2:  # one component spanning both sides: the lungs touch
            split = _split_joined(main, spacing_c, midline_index, ax_lr)
            parts = [split == 1, split == 2]
        else:
            parts = [main]
    for part in parts:
        x = _world_lr(part, affine_c)
        # RAS: world x grows towards the patient's Right (DICOM LPS: towards the Left)
        out[part] = RIGHT_LUNG if x > midline_x else LEFT_LUNG
    if len(parts) == 2 and len(np.unique(out[out > 0])) == 1:  # both on one side of a poor midline: by order
        xs = [_world_lr(p, affine_c) for p in parts]
        right = int(np.argmax(xs))
        out[parts[right]] = RIGHT_LUNG
        out[parts[1 - right]] = LEFT_LUNG
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


CANONICAL_AXES = ("L", "P", "S")  # array axis order the pipeline works in: an axial DICOM series as read


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform (flips and axis permutation, no resampling) from a scan's array order to
    ``CANONICAL_AXES``, from its affine."""
    import nibabel as nib

    current = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(CANONICAL_AXES))


def compute_lung_mask(
    hu: np.ndarray,
    affine: np.ndarray,
    params: LungMaskParams | None = None,
    return_airways: bool = False,
    name: str = "",
    info: dict[str, Any] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Label the lungs of a CT in HU: uint8 (X, Y, Z), 0 background, 1 right lung, 2 left lung.

    The work is done in one canonical axis order (:func:`canonical_orientation`): flipped or permuted arrays of the
    same scan, with their affines, get the same labels at the same world positions.

    Args:
        hu: CT volume (X, Y, Z) in Hounsfield units.
        affine: its 4x4 RAS voxel-to-world affine (decides slice direction and which side is the patient's right).
        params: thresholds and sizes of the pipeline.
        return_airways: also return the removed trachea/main-bronchi mask (bool, input grid).
        name: the scan's file, named in errors.
        info: a dict to receive ``airway_found`` (a trachea and its main bronchi were found), ``airway_removed_ml``
            (the airways with their walls, removed from the lungs) and ``blood_pool_hu`` (the mediastinal blood
            pool, :func:`~drasclr_ext.transforms.contrast.blood_pool_hu`; NaN when not measurable).

    Raises:
        InputImageError: when nothing lung-like of at least ``params.min_lung_ml`` is found.
    """
    import nibabel as nib

    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise InputImageError(f"the lung mask needs a 3D volume (X, Y, Z), got shape {tuple(hu.shape)}")
    ornt = canonical_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):  # already in canonical order: no copy
        return _canonical_lung_mask(hu, affine, params or LungMaskParams(), return_airways, name, info)
    layout = memory_layout(hu)
    work = nib.orientations.apply_orientation(hu, ornt)
    if not (work.flags.c_contiguous or work.flags.f_contiguous):
        work = np.asfortranarray(work) if layout == "F" else np.ascontiguousarray(work)
    work_affine = affine @ nib.orientations.inv_ornt_aff(ornt, hu.shape)
    out = _canonical_lung_mask(work, work_affine, params or LungMaskParams(), return_airways, name, info)
    canonical = nib.orientations.axcodes2ornt(CANONICAL_AXES)
    back = nib.orientations.ornt_transform(canonical, nib.orientations.io_orientation(affine))
    order = np.asfortranarray if layout == "F" else np.ascontiguousarray
    restored = tuple(order(nib.orientations.apply_orientation(o, back)) for o in (out if return_airways else (out,)))
    return restored if return_airways else restored[0]


def _canonical_lung_mask(
    hu: np.ndarray,
    affine: np.ndarray,
    params: LungMaskParams,
    return_airways: bool,
    name: str,
    info: dict[str, Any] | None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``compute_lung_mask`` of a scan in any axis order (canonical in practice, for orientation independence)."""
    spacing = voxel_spacing(affine)
    factors = tuple(max(1, int(round(params.target_spacing / s))) for s in spacing)
    hu_c = _block_mean(hu, factors)  # type: ignore[arg-type]
    scale = np.diag([*factors, 1.0]).astype(np.float64)
    scale[:3, 3] = (np.asarray(factors) - 1) / 2.0
    affine_c = affine @ scale
    spacing_c = spacing * np.asarray(factors)
    voxel_ml = float(np.prod(spacing_c)) / 1000.0
    ax_si, _ = axis_towards(affine, 2)

    air = hu_c < params.threshold
    outside = outside_air(air, ax_si)
    candidates = air & ~outside

    airway, seed = find_airways(hu_c, candidates, outside, affine_c, voxel_ml, params)
    midline_x = None
    if seed is not None:
        midline_x = float((affine_c @ np.array([*ndimage.center_of_mass(seed), 1.0]))[0])
        airway = ndimage.binary_dilation(airway, structure=ellipsoid(3.0 / spacing_c))
    if info is not None:
        info["airway_found"] = seed is not None
        info["airway_removed_ml"] = round(float(np.count_nonzero(airway)) * voxel_ml, 1)
    lungs = candidates & ~airway
    lungs = ndimage.binary_opening(lungs, structure=ndimage.generate_binary_structure(3, 1))

    labels_c = label_lungs(lungs, hu_c, affine_c, spacing_c, midline_x, voxel_ml, params)
    labels_c = fill_lungs(labels_c, spacing_c, ax_si, params.fill_radius_mm)
    labels_c[airway] = 0

    total_ml = float(np.count_nonzero(labels_c)) * voxel_ml
    if total_ml < params.min_lung_ml:
        raise InputImageError(
            f"{name + ': ' if name else ''}no lungs were found: {total_ml:.0f} ml of lung-like tissue (at least "
            f"{params.min_lung_ml:.0f} ml expected). Check that the scan covers the chest (it may be an abdominal, "
            "head or limb CT) and that its values are in HU."
        )
    if info is not None:
        info["blood_pool_hu"] = blood_pool_hu(hu_c, labels_c, affine_c)  # block means: less noise than voxels

    # full-resolution labels: interior from the coarse grid, boundary band re-thresholded on the input grid
    cross = ndimage.generate_binary_structure(3, 1)
    near_right = ndimage.binary_dilation(labels_c == RIGHT_LUNG, structure=cross)
    near_left = ndimage.binary_dilation(labels_c == LEFT_LUNG, structure=cross)
    inner = ndimage.binary_erosion(labels_c > 0, structure=cross, border_value=1)
    band = (near_right | near_left) & ~inner & ~airway & ~outside
    nearest = np.where(labels_c > 0, labels_c, np.where(near_right, RIGHT_LUNG, LEFT_LUNG)).astype(np.uint8)
    code = np.where(band, nearest + 3, labels_c).astype(np.uint8)  # 4, 5: band voxels near the right, left lung
    layout = memory_layout(hu)  # the input's memory order
    full = _upsample(code, factors, hu.shape, layout)  # type: ignore[arg-type]
    # flat views in memory order: boolean indexing of Fortran-ordered arrays is ten times slower
    flat = full.ravel(layout)
    band = np.flatnonzero(flat > 3)
    flat[band] = np.where(hu.ravel(layout)[band] < params.threshold, flat[band] - 3, 0)
    if return_airways:
        return full, _upsample(airway, factors, hu.shape, layout)  # type: ignore[arg-type]
    return full


AIRWAY_META_KEY = "airways"  # the lung mask MetaTensor's meta: {"airway_found", "airway_removed_ml"} (classical)
AIRWAY_KEYS = ("airway_found", "airway_removed_ml")
BLOOD_POOL_KEY = "blood_pool_hu"  # in the lung mask's meta and the scan's meta["acquisition"] (classical)


def lung_volumes_ml(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Right, left and total lung volume (ml) of a label map."""
    voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=3)
    return {
        "right": float(counts[RIGHT_LUNG]) * voxel_ml,
        "left": float(counts[LEFT_LUNG]) * voxel_ml,
        "total": float(counts[RIGHT_LUNG] + counts[LEFT_LUNG]) * voxel_ml,
    }


def _lungmask_package_mask(hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Lung labels from the optional ``lungmask`` package (U-Net; 1 right, 2 left), mapped back to our grid."""
    try:
        from lungmask import LMInferer
    except ImportError as err:
        raise DrasCLRError(
            'method="lungmask" needs the optional lungmask package and its weights: `pip install lungmask` '
            '(it downloads its model on first use), or use method="classical", which needs neither.'
        ) from err
    import nibabel as nib

    # lungmask expects a (Z, Y, X) array in the usual axial DICOM (LPS) layout
    current = nib.orientations.io_orientation(affine)
    lps = nib.orientations.axcodes2ornt(("L", "P", "S"))
    to_lps = nib.orientations.ornt_transform(current, lps)
    hu_lps = nib.orientations.apply_orientation(np.asarray(hu), to_lps)
    labels_zyx = LMInferer().apply(np.ascontiguousarray(hu_lps.transpose(2, 1, 0)))
    labels_lps = np.asarray(labels_zyx).transpose(2, 1, 0)
    back = nib.orientations.ornt_transform(lps, current)
    labels = nib.orientations.apply_orientation(labels_lps, back)
    return np.ascontiguousarray(labels, dtype=np.uint8)


def lung_mask_array(
    hu: np.ndarray,
    affine: np.ndarray,
    method: str = "classical",
    name: str = "",
    info: dict[str, Any] | None = None,
    **params: Any,
) -> np.ndarray:
    """``compute_lung_mask`` (``method="classical"``) or the optional ``lungmask`` package (``"lungmask"``); ``name``
    (the scan's file) is named in errors; ``info`` receives the airway facts of the classical method."""
    if method == "classical":
        settings = LungMaskParams(**params) if params else None
        return compute_lung_mask(hu, affine, settings, name=name, info=info)  # type: ignore[return-value]
    if method == "lungmask":
        labels = _lungmask_package_mask(hu, affine)
        if float(np.count_nonzero(labels)) * float(np.prod(voxel_spacing(affine))) / 1000.0 < 300.0:
            where = f"{name}: " if name else ""
            raise InputImageError(f"{where}no lungs were found by lungmask. Check that the scan covers the chest.")
        return labels
    raise ValueError(f"unknown lung mask method {method!r}: use one of {METHODS}")


class LungMask(Transform):
    """Array transform: CT ``MetaTensor`` in HU ((X, Y, Z) or (1, X, Y, Z)) -> uint8 lung labels, same shape/affine.

    Args:
        method: "classical" (weight-free, default) or "lungmask" (optional package, if installed with weights).
        params: keyword settings of ``LungMaskParams`` for the classical pipeline.
    """

    def __init__(self, method: str = "classical", **params: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown lung mask method {method!r}: use one of {METHODS}")
        self.method = method
        self.params = params

    def __call__(self, image: torch.Tensor | np.ndarray, affine: np.ndarray | None = None) -> MetaTensor:
        if affine is None:
            if not isinstance(image, MetaTensor):
                raise ValueError("LungMask needs the image's affine: give a MetaTensor or pass affine=")
            affine = image.affine
        affine_np = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine)
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        channel_first = array.ndim == 4
        if channel_first:
            if array.shape[0] != 1:
                raise InputImageError(f"the lung mask needs a single-channel CT, got shape {tuple(array.shape)}")
            array = array[0]
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        name = str(meta.get("filename_or_obj", ""))
        info: dict[str, Any] = {}
        labels = lung_mask_array(array, affine_np, self.method, name=name, info=info, **self.params)
        out = torch.from_numpy(labels[None] if channel_first else labels)
        meta["affine"] = torch.as_tensor(affine_np, dtype=torch.float64)
        meta[AIRWAY_META_KEY] = {k: info[k] for k in AIRWAY_KEYS if k in info}
        if BLOOD_POOL_KEY in info:
            meta[BLOOD_POOL_KEY] = info[BLOOD_POOL_KEY]
        return MetaTensor(out, meta=meta)


class LungMaskd(MapTransform):
    """Dictionary twin of ``LungMask``: writes the labels of the image under ``keys`` to ``mask_key``, and records the
    blood pool HU in the image's ``meta["acquisition"]`` (read by the ``contrast_enhanced`` quality flag)."""

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "lung_mask",
        method: str = "classical",
        allow_missing_keys: bool = False,
        **params: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.transform = LungMask(method=method, **params)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if len(keys) > 1:
            raise ValueError(f"LungMaskd writes one mask ({self.mask_key!r}): give one image key, got {keys}")
        for key in keys:
            mask = self.transform(d[key])
            d[self.mask_key] = mask
            if BLOOD_POOL_KEY in mask.meta and isinstance(d[key], MetaTensor):  # for the scan's quality flags
                acquisition = {**(d[key].meta.get("acquisition") or {}), BLOOD_POOL_KEY: mask.meta[BLOOD_POOL_KEY]}
                d[key].meta["acquisition"] = acquisition  # a new dict: other holders of the old one are unchanged
        return d
