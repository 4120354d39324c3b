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

The steps live in :mod:`~drasclr_ext.transforms.lung_mask_grid` (canonical order, coarse grid and back) and
:mod:`~drasclr_ext.transforms.lung_labels` (outside air, right and left lungs, filling).
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
from drasclr_ext.transforms.lung_labels import LEFT_LUNG, RIGHT_LUNG, fill_lungs, label_lungs, outside_air
from drasclr_ext.transforms.lung_mask_grid import (
    CoarseGrid,
    canonical_orientation,
    coarse_grid,
    from_canonical,
    full_resolution_labels,
    to_canonical,
    upsample_labels,
)

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


def compute_lung_mask(
    hu: np.ndarray,
    affine: np.ndarray,
    params: LungMaskParams | None = None,
    return_airways: bool = False,
    name: str = "",
    info: dict[str, Any] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Label the lungs of a CT in HU: uint8 (X, Y, Z), 0 background, 1 right lung, 2 left lung.

    The work is done in one canonical axis order (:func:`~drasclr_ext.transforms.lung_mask_grid.canonical_orientation`):
    flipped or permuted arrays of the same scan, with their affines, get the same labels at the same world positions.

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
    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise InputImageError(f"the lung mask needs a 3D volume (X, Y, Z), got shape {tuple(hu.shape)}")
    params = params or LungMaskParams()
    ornt = canonical_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):  # already in canonical order: no copy
        return _canonical_lung_mask(hu, affine, params, return_airways, name, info)
    work, work_affine = to_canonical(hu, affine, ornt)
    out = _canonical_lung_mask(work, work_affine, params, return_airways, name, info)
    restored = from_canonical(out if return_airways else (out,), affine, memory_layout(hu))
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
    grid = coarse_grid(hu, affine, params.target_spacing)
    ax_si, _ = axis_towards(affine, 2)
    air = grid.hu < params.threshold
    outside = outside_air(air, ax_si)
    candidates = air & ~outside
    airway, midline_x = _airways(grid, candidates, outside, params, info)
    lungs = candidates & ~airway
    lungs = ndimage.binary_opening(lungs, structure=ndimage.generate_binary_structure(3, 1))
    labels_c = label_lungs(lungs, grid.hu, grid.affine, grid.spacing, midline_x, grid.voxel_ml, params)
    labels_c = fill_lungs(labels_c, grid.spacing, ax_si, params.fill_radius_mm)
    labels_c[airway] = 0
    _check_lung_volume(float(np.count_nonzero(labels_c)) * grid.voxel_ml, params, name)
    if info is not None:
        info["blood_pool_hu"] = blood_pool_hu(grid.hu, labels_c, grid.affine)  # block means: less noise than voxels
    full = full_resolution_labels(labels_c, airway | outside, grid.factors, hu, params.threshold)
    if return_airways:
        return full, upsample_labels(airway, grid.factors, hu.shape, memory_layout(hu))  # type: ignore[arg-type]
    return full


def _airways(
    grid: CoarseGrid,
    candidates: np.ndarray,
    outside: np.ndarray,
    params: LungMaskParams,
    info: dict[str, Any] | None,
) -> tuple[np.ndarray, float | None]:
    """The trachea and main bronchi to remove (dilated by their walls) and the world x of the trachea (the
    midline), None when no airway was found; ``info`` receives ``airway_found`` and ``airway_removed_ml``."""
    airway, seed = find_airways(grid.hu, candidates, outside, grid.affine, grid.voxel_ml, params)
    midline_x = None
    if seed is not None:
        midline_x = float((grid.affine @ np.array([*ndimage.center_of_mass(seed), 1.0]))[0])
        airway = ndimage.binary_dilation(airway, structure=ellipsoid(3.0 / grid.spacing))
    if info is not None:
        info["airway_found"] = seed is not None
        info["airway_removed_ml"] = round(float(np.count_nonzero(airway)) * grid.voxel_ml, 1)
    return airway, midline_x


def _check_lung_volume(total_ml: float, params: LungMaskParams, name: str) -> None:
    """Raise :class:`InputImageError` when less than ``params.min_lung_ml`` of lung was found."""
    if total_ml < params.min_lung_ml:
        raise InputImageError(
            f"{name + ': ' if name else ''}no lungs were found: {total_ml:.0f} ml of lung-like tissue (at least "
            f"{params.min_lung_ml:.0f} ml expected). Check that the scan covers the chest (it may be an abdominal, "
            "head or limb CT) and that its values are in HU."
        )


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
