"""Dense emphysema subtype maps: sliding windows -> encoder + head -> blended probabilities -> the input's grid.

How window predictions become voxel maps:

1. :func:`~drasclr_ext.transforms.patches.dense_windows` cuts 32^3 windows (stride 16 by default) on a 1 mm grid
   with the atlas axes over the lung; each window has its normalised atlas location.
2. :class:`~drasclr_ext.networks.heads.DrasCLRSubtypeNet` gives each window a softmax over (normal, centrilobular,
   paraseptal, panlobular): the predicted subtype composition of the lung in the window.
3. :func:`blend_window_probabilities` spreads each window's probabilities over the window with Gaussian weights
   (``sigma = sigma_scale * window``, MONAI's ``compute_importance_map``) and divides by the summed weights.
4. :func:`grid_to_image` resamples the blended map trilinearly onto the input scan's voxels inside the lung mask
   (renormalised to sum to 1); outside the lung the probabilities are 0.
5. :func:`subtype_labels` turns probabilities into labels {0 outside lung, 1 normal, 2 CLE, 3 PSE, 4 PLE}:
   ``decision="attenuation"`` (default) labels a lung voxel with its most probable emphysema subtype when the voxel
   itself is low-attenuation (HU < -950, the LAA-950 threshold) and that subtype's probability is at least
   ``min_probability``, and normal otherwise; ``decision="argmax"`` labels every lung voxel with the plain argmax.
   The window composition varies on the scale of the window (centimetres) while emphysema lesions are millimetres,
   so the plain argmax of a composition is almost always "normal"; gating by the voxel's own attenuation puts the
   subtype where the destroyed lung actually is.
"""

from __future__ import annotations

import gzip
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map

from drasclr_ext import __version__
from drasclr_ext.atlas import Atlas
from drasclr_ext.errors import InputImageError
from drasclr_ext.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from drasclr_ext.metrics.emphysema import LAA_THRESHOLD_HU, emphysema_report
from drasclr_ext.networks.heads import SUBTYPE_CLASSES, window_class_fractions
from drasclr_ext.transforms.patches import (
    DenseWindowResult,
    DenseWindows,
    _memory_layout,
    mask_bounding_box,
    resample_affine,
)
from drasclr_ext.transforms.registration import _array_and_affine

__all__ = [
    "DECISIONS",
    "DenseSubtypeInferer",
    "DenseSubtypeWriter",
    "blend_window_probabilities",
    "dataset_or_phantom",
    "grid_to_image",
    "render_overview",
    "resample_to_grid",
    "subtype_labels",
    "window_targets",
]

logger = logging.getLogger(__name__)
DECISIONS = ("attenuation", "argmax")
LABEL_COLOURS = {1: (0.55, 0.8, 0.55), 2: (0.9, 0.15, 0.15), 3: (0.15, 0.45, 0.95), 4: (0.95, 0.75, 0.1)}


def gaussian_window_weights(window: int, sigma_scale: float) -> np.ndarray:
    """(W, W, W) float32 Gaussian importance weights of a window (MONAI's ``compute_importance_map``)."""
    weights = compute_importance_map((window,) * 3, mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    return weights.numpy().astype(np.float32)


def _gaussian_factor(window: int, sigma_scale: float) -> Optional[np.ndarray]:
    """The 1D factor ``f`` of the Gaussian window weights (``weights = f x f x f``), or None when MONAI's clamping
    of small weights makes them inseparable."""
    factor = compute_importance_map((window,), mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    factor = factor.numpy().astype(np.float32)
    outer = factor[:, None, None] * factor[None, :, None] * factor[None, None, :]
    return factor if np.allclose(outer, gaussian_window_weights(window, sigma_scale), rtol=1e-5, atol=0) else None


def blend_window_probabilities(
    windows: DenseWindowResult, probabilities: np.ndarray, sigma_scale: float = 0.25
) -> np.ndarray:
    """(C, X, Y, Z) float32 Gaussian-weighted average of per-window class probabilities (N, C) on the 1 mm grid.

    Voxels no window covers are 0 in every channel. The Gaussian weights are separable, so the weighted sums are
    three small matrix products over the lattice of window origins (the same sums as adding each weighted window
    in turn, up to float32 rounding); a per-window loop is the fallback for inseparable weights.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.shape[0] != len(windows):
        raise ValueError(f"{probabilities.shape[0]} predictions for {len(windows)} windows")
    w, classes = windows.window, probabilities.shape[1]
    factor = _gaussian_factor(w, sigma_scale)
    if factor is None:
        total, weight = _blend_loop(windows, probabilities, gaussian_window_weights(w, sigma_scale))
    else:
        # the windows on the lattice of their distinct origin coordinates: (C + 1, nx, ny, nz), the class
        # probabilities and, as channel C, ones (whose blend is the summed weight)
        lattice = [np.unique(windows.origins[:, a], return_inverse=True) for a in range(3)]
        values = np.zeros((classes + 1, *(len(u) for u, _ in lattice)), dtype=np.float32)
        at = tuple(inverse.ravel() for _, inverse in lattice)
        values[(slice(0, classes), *at)] = probabilities.T
        values[(classes, *at)] = 1.0
        # spread[a][v, i]: weight at grid voxel v along axis a of the window with the i-th origin coordinate
        spread = []
        for a, (starts, _) in enumerate(lattice):
            k = np.zeros((windows.grid_shape[a], len(starts)), dtype=np.float32)
            for i, start in enumerate(starts):
                k[start : start + w, i] = factor
            spread.append(k)
        values = np.einsum("cxyk,zk->cxyz", values, spread[2])
        values = np.einsum("cxkz,yk->cxyz", values, spread[1])
        # one BLAS product per channel, in the grid's memory order: (X, nx) @ (nx, Y Z) or (Z Y, nx) @ (nx, X)
        layout, nx = _memory_layout(windows.grid), values.shape[1]
        blended = _channels((classes + 1, *windows.grid_shape), layout, np.empty)
        for c in range(classes + 1):
            if layout == "C":
                np.matmul(spread[0], values[c].reshape(nx, -1), out=blended[c].reshape(len(spread[0]), -1))
            else:
                zyx = np.ascontiguousarray(values[c].transpose(2, 1, 0)).reshape(-1, nx)
                np.matmul(zyx, spread[0].T, out=blended[c].T.reshape(-1, len(spread[0])))
        total, weight = blended[:classes], blended[classes]
    np.divide(total, weight, out=total, where=weight > 0)
    return total


def _blend_loop(windows: DenseWindowResult, probabilities: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums (C, X, Y, Z) and summed weights (X, Y, Z) of the windows, one window at a time."""
    w = windows.window
    total = np.zeros((probabilities.shape[1], *windows.grid_shape), dtype=np.float32)
    weight = np.zeros(windows.grid_shape, dtype=np.float32)
    product = np.empty((probabilities.shape[1], w, w, w), dtype=np.float32)
    for p, (x, y, z) in zip(probabilities, windows.origins):
        np.multiply(p[:, None, None, None], g, out=product)
        total[:, x : x + w, y : y + w, z : z + w] += product
        weight[x : x + w, y : y + w, z : z + w] += g
    return total, weight


def _channels(shape: Sequence[int], layout: str, allocate: Any = np.zeros) -> np.ndarray:
    """A float32 (C, X, Y, Z) array from ``allocate`` (``np.zeros``, ``np.empty``) whose channels are each C- or
    F-ordered (``layout``), channels slowest."""
    if layout == "C":
        return allocate(tuple(shape), dtype=np.float32)
    return allocate((shape[0], *reversed(shape[1:])), dtype=np.float32).transpose(0, 3, 2, 1)


def grid_to_image(
    values: np.ndarray,
    grid_affine: np.ndarray,
    image_affine: np.ndarray,
    image_shape: Sequence[int],
    mask: np.ndarray,
    normalise: bool = True,
) -> np.ndarray:
    """Resample (C, Xg, Yg, Zg) grid values (trilinear) onto the image's voxels inside ``mask``; 0 elsewhere.

    With ``normalise`` the channels of each masked voxel are divided by their sum (probabilities near the edge of
    the covered grid otherwise lose mass to the uncovered, all-zero voxels). Each channel of the result has the
    mask's memory order (Fortran for NIfTI scans), which keeps the later elementwise work and writing fast.
    """
    mask = np.asarray(mask) > 0
    layout = _memory_layout(mask)
    out = _channels((values.shape[0], *image_shape), layout)
    image_to_grid = np.linalg.inv(np.asarray(grid_affine, np.float64)) @ np.asarray(image_affine, np.float64)
    matrix = image_to_grid[:3, :3]
    for box in _slabs(mask, layout):
        lo = np.array([b.start for b in box])
        shape = [b.stop - b.start for b in box]
        inside, part = mask[box], out[(slice(None), *box)]
        offset = matrix @ lo + image_to_grid[:3, 3]
        for c in range(values.shape[0]):
            resampled = resample_affine(values[c], matrix, offset, shape, order=1, cval=0.0, layout=layout)
            np.copyto(part[c], resampled, where=inside)
        if normalise:
            total = part.sum(axis=0)
            np.divide(part, total, out=part, where=total > 0)
    return out


def _slabs(mask: np.ndarray, layout: str, voxels: int = 1 << 20) -> Iterator[tuple[slice, ...]]:
    """Boxes that tile the bounding box of ``mask`` in slabs of about ``voxels`` along its slowest-varying axis:
    small temporaries, which the allocator reuses instead of mapping (and zeroing) fresh memory for each."""
    bounds = mask_bounding_box(mask)
    if bounds is None:
        return
    lo, hi = bounds
    axis = 2 if layout == "F" else 0
    thickness = max(1, voxels // int(np.prod(np.delete(hi - lo, axis))))
    for start in range(lo[axis], hi[axis], thickness):
        box = [slice(a, b) for a, b in zip(lo, hi)]
        box[axis] = slice(start, min(start + thickness, hi[axis]))
        yield tuple(box)


def resample_to_grid(
    volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape: Sequence[int], order: int = 0
) -> np.ndarray:
    """A volume (X, Y, Z) with ``affine`` resampled onto a grid (nearest neighbour by default, 0 outside)."""
    grid_to_voxel = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(grid_affine, np.float64)
    volume = np.asarray(volume)
    out = resample_affine(volume, grid_to_voxel[:3, :3], grid_to_voxel[:3, 3], grid_shape, order=order, cval=0.0)
    if order and np.issubdtype(volume.dtype, np.integer):
        out = np.rint(out)  # as scipy, which rounds interpolated values into integer outputs
    return out.astype(volume.dtype, copy=False)


def window_targets(label: np.ndarray, affine: np.ndarray, windows: DenseWindowResult) -> np.ndarray:
    """(N, 4) training targets of dense windows: the class fractions of the lung voxels of each window, from an
    emphysema label map (X, Y, Z) with ``affine`` resampled (nearest) onto the windows' 1 mm grid."""
    grid_labels = resample_to_grid(np.asarray(label, np.uint8), affine, windows.grid_affine, windows.grid_shape)
    return window_class_fractions(grid_labels, windows.origins, windows.window, len(SUBTYPE_CLASSES))


def subtype_labels(
    probabilities: np.ndarray,
    hu: np.ndarray,
    lung_mask: np.ndarray,
    decision: str = "attenuation",
    laa_threshold: float = LAA_THRESHOLD_HU,
    min_probability: float = 0.02,
) -> np.ndarray:
    """uint8 labels {0 outside lung, 1 normal, 2 CLE, 3 PSE, 4 PLE} from (4, X, Y, Z) probabilities (module doc)."""
    if decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r}: use one of {DECISIONS}")
    probabilities, hu = np.asarray(probabilities), np.asarray(hu)
    lung = np.asarray(lung_mask) > 0
    layout = _memory_layout(lung)
    labels = np.zeros(lung.shape, dtype=np.uint8, order=layout)
    for box in _slabs(lung, layout):
        inside = lung[box]
        p = probabilities[(slice(None), *box)]
        if decision == "argmax":
            labels[box] = np.where(inside, 1 + np.argmax(p, axis=0), 0)
            continue
        # the most probable emphysema subtype (ties to the first, as argmax) and its probability
        top = np.maximum(np.maximum(p[1], p[2]), p[3])
        best = np.where(p[1] == top, 2, np.where(p[2] == top, 3, 4)).astype(np.uint8)
        emphysema = inside & (hu[box] < laa_threshold) & (top >= min_probability)
        labels[box] = np.where(emphysema, best, inside.astype(np.uint8))
    return labels


class DenseSubtypeInferer:
    """Dense emphysema subtype maps of one subject (see the module docstring for the method).

    Reads ``image`` (HU), ``lung_mask`` and ``registration`` from the data dict and adds ``subtype_prob``
    (4, X, Y, Z) float32 and ``subtype_label`` (1, X, Y, Z) uint8, both MetaTensors with the image's affine,
    plus ``dense_info`` (window count and timings).

    Args:
        network: a :class:`~drasclr_ext.networks.heads.DrasCLRSubtypeNet` (``forward(x, loc) -> logits``).
        atlas: the atlas the registration used (an :class:`Atlas` or its name).
        device: where the network runs.
        batch_size: windows per forward pass (the same probabilities whatever the size, up to float rounding; on
            the 2-core CPU sandbox 8 to 12 ran fastest, about 1.4x faster than 32: docs/BENCHMARKS.md).
        window, stride, margin: the dense window grid (1 mm voxels).
        sigma_scale: Gaussian blending sigma as a fraction of the window.
        decision: "attenuation" or "argmax" (see :func:`subtype_labels`).
        min_probability: subtype probability needed to label a low-attenuation voxel emphysema.
        atlas_path: folder of the atlas files, for atlases that need it.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        atlas: Union[Atlas, str] = "default",
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 32,
        window: int = 32,
        stride: int = 16,
        margin: int = 4,
        sigma_scale: float = 0.25,
        decision: str = "attenuation",
        min_probability: float = 0.02,
        atlas_path: Optional[str] = None,
        image_key: str = "image",
        mask_key: str = "lung_mask",
        registration_key: str = "registration",
    ) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}: use one of {DECISIONS}")
        self.network = network
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.windows = DenseWindows(atlas, window, stride, margin, atlas_path)
        self.sigma_scale = float(sigma_scale)
        self.decision = decision
        self.min_probability = float(min_probability)
        self.image_key, self.mask_key, self.registration_key = image_key, mask_key, registration_key

    @torch.inference_mode()
    def predict(self, windows: DenseWindowResult) -> np.ndarray:
        """(N, C) softmax probabilities of every window, in batches of ``batch_size``."""
        self.network.eval()
        locations = torch.as_tensor(windows.locations, dtype=torch.float32)
        out = []
        for start in range(0, len(windows), self.batch_size):
            idx = np.arange(start, min(start + self.batch_size, len(windows)))
            x = torch.from_numpy(windows.windows(idx))[:, None].to(self.device)
            logits = self.network(x, locations[idx].to(self.device))
            out.append(torch.softmax(logits.float(), dim=1).cpu())
        return torch.cat(out).numpy()

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        image, registration = d[self.image_key], d[self.registration_key]
        hu, affine = _array_and_affine(image, None)
        lung, _ = _array_and_affine(d[self.mask_key], affine)
        if lung.shape != hu.shape:
            raise InputImageError(f"lung mask {lung.shape} and image {hu.shape} differ in shape: recompute the mask")
        timings = {}
        t = time.perf_counter()
        windows = self.windows(image, d[self.mask_key], registration)
        timings["windows_s"] = time.perf_counter() - t
        t = time.perf_counter()
        probabilities = self.predict(windows)
        timings["network_s"] = time.perf_counter() - t
        t = time.perf_counter()
        grid = blend_window_probabilities(windows, probabilities, self.sigma_scale)
        timings["blend_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prob = grid_to_image(grid, windows.grid_affine, affine, hu.shape, lung > 0)
        del grid
        label = subtype_labels(prob, hu, lung, self.decision, min_probability=self.min_probability)
        timings["to_input_grid_s"] = time.perf_counter() - t
        meta = dict(getattr(image, "meta", {}))
        meta["affine"] = torch.as_tensor(affine, dtype=torch.float64)
        d["subtype_prob"] = MetaTensor(torch.from_numpy(prob), meta=dict(meta))
        d["subtype_label"] = MetaTensor(torch.from_numpy(label[None]), meta=dict(meta))
        d["dense_info"] = {
            "windows": len(windows),
            "window": windows.window,
            "stride": self.windows.stride,
            "sigma_scale": self.sigma_scale,
            "decision": self.decision,
            "min_probability": self.min_probability,
            "timings": timings,
        }
        return d


def _write_nifti_gz(image: Any, path: Path) -> Path:
    """Write a nibabel image as .nii.gz atomically (gzip level 1: fast, most of the gain)."""
    return atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1))


def save_probabilities(prob: Any, affine: np.ndarray, path: Union[str, Path]) -> Path:
    """Write (C, X, Y, Z) probabilities as an (X, Y, Z, C) NIfTI, stored as uint8 with slope 1/255, atomically."""
    import nibabel as nib

    array = prob.detach().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob)
    # NIfTI's own (Fortran) order, filled a few slices at a time: no full-size float temporary, no transposed write
    data = np.empty((*array.shape[1:], array.shape[0]), dtype=np.uint8, order="F")
    slab = 8
    for c in range(array.shape[0]):
        for k in range(0, array.shape[-1], slab):
            scaled = np.multiply(array[c, ..., k : k + slab], np.float32(255.0))
            np.clip(scaled, 0.0, 255.0, out=scaled)
            data[..., k : k + slab, c] = np.rint(scaled, out=scaled)
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    image.header.set_intent("vector", (), name="subtype probability")
    return _write_nifti_gz(image, Path(path))


def _acquisition(image: Any, affine: np.ndarray, shape: Sequence[int]) -> dict[str, Any]:
    meta = getattr(image, "meta", {}) or {}
    acquisition = dict(meta.get("acquisition") or {})
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    return {
        "shape": [int(s) for s in shape],
        "spacing_mm": [float(s) for s in spacing],
        "slice_thickness_mm": acquisition.pop("slice_thickness", None),
        "convolution_kernel": acquisition.pop("convolution_kernel", "") or None,
        **{k: (v if v != "" else None) for k, v in acquisition.items()},
    }


def render_overview(
    hu: np.ndarray, label: np.ndarray, affine: np.ndarray, path: Union[str, Path], title: str = ""
) -> Path:
    """PNG with three axial slices (upper, middle, lower lung) and a coronal slice, subtype labels overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Patch

    ornt = nib.orientations.io_orientation(affine)  # to R, A, S axis order and direction
    hu_ras = nib.orientations.apply_orientation(hu, ornt)
    label_ras = nib.orientations.apply_orientation(label, ornt)
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)[ornt[:, 0].astype(int)]
    lung = label_ras > 0
    per_y = np.count_nonzero(lung, axis=(0, 2))  # lung voxels per coronal plane
    occupied_z = np.flatnonzero(np.any(lung, axis=(0, 1)))
    if occupied_z.size == 0:
        raise InputImageError("no lung voxels to show in the overview")
    z_lo, z_hi = occupied_z[0], occupied_z[-1]
    axial = [int(z_lo + f * (z_hi - z_lo)) for f in (0.8, 0.5, 0.2)]
    # the median y of the lung voxels (np.median of their y indices) from the counts per plane
    cumulative, n = np.cumsum(per_y), int(per_y.sum())
    coronal = int(np.searchsorted(cumulative, [(n - 1) // 2, n // 2], side="right").mean())
    colours = np.zeros((5, 4))
    for value, rgb in LABEL_COLOURS.items():
        colours[value] = (*rgb, 0.25 if value == 1 else 0.85)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    views = [(hu_ras[:, :, k], label_ras[:, :, k], spacing[1] / spacing[0], f"axial z={k}") for k in axial]
    views.append((hu_ras[:, coronal, :], label_ras[:, coronal, :], spacing[2] / spacing[0], f"coronal y={coronal}"))
    for ax, (img, lab, aspect, name) in zip(axes, views):
        # rows = second axis (A or S), columns = R->L as radiologists view (patient right on the left)
        ax.imshow(img.T[:, ::-1], cmap="gray", vmin=-1000, vmax=200, origin="lower", aspect=aspect)
        ax.imshow(colours[lab.T[:, ::-1].astype(int)], origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=LABEL_COLOURS[v], label=n) for v, n in zip((1, 2, 3, 4), SUBTYPE_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(title or "emphysema subtypes (patient right on the image's left)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path


class DenseSubtypeWriter:
    """Write a subject's dense results; ``report.json`` last (the cohort runner's done file).

    Files: ``subtype_prob.nii.gz`` (X, Y, Z, 4: normal, centrilobular, paraseptal, panlobular), ``subtype_label.nii.gz``
    (uint8), ``lung_mask.nii.gz`` (uint8, 1 right / 2 left), all in the input's affine and shape; ``overview.png``;
    ``report.json`` (:func:`~drasclr_ext.metrics.emphysema.emphysema_report` on the input HU, the bundle's lung mask
    and the predicted labels, plus acquisition facts, model and versions).

    Args:
        model_info: facts about the model to record (bundle name and version, weights sha256...).
        overview: write ``overview.png``.
    """

    DONE_FILE = "report.json"

    def __init__(self, model_info: Optional[Mapping[str, Any]] = None, overview: bool = True) -> None:
        self.model_info = dict(model_info or {})
        self.overview = overview

    def report(self, data: Mapping[str, Any], subject_name: str) -> dict[str, Any]:
        image = data["image"]
        hu, affine = _array_and_affine(image, None)
        lung, _ = _array_and_affine(data["lung_mask"], affine)
        label, _ = _array_and_affine(data["subtype_label"], affine)
        registration = data.get("registration")
        report: dict[str, Any] = {
            "subject": data.get("subject", subject_name),
            "input": str(getattr(image, "meta", {}).get("filename_or_obj", "")),
        }
        report.update(emphysema_report(hu, lung, affine, label))
        report["acquisition"] = _acquisition(image, affine, hu.shape)
        report["registration_dice"] = getattr(registration, "dice", None)
        report["dense"] = data.get("dense_info", {})
        report["model"] = self.model_info
        report["drasclr_ext_version"] = __version__
        report["definitions"] = {
            "laa950_percent": "100 x lung voxels below -950 HU / lung voxels (input HU, bundle lung mask)",
            "perc15_hu": "15th percentile of the lung HU histogram",
            "subtype_fractions": "share of the lung's voxels with each predicted label",
            "regions": "whole, right/left lung and upper/middle/lower third by height of each lung",
            "cle_grade": "0 <0.5 %, 1 0.5-1 %, 2 1-5 %, 3 5-10 %, 4 10-20 %, 5 >=20 % of the lung",
            "pse_grade": "0 <1 %, 1 1-5 %, 2 >=5 % of the lung",
        }
        return report

    def __call__(self, data: Mapping[str, Any], subject_dir: Union[str, Path]) -> Path:
        from drasclr_ext.transforms.io import save_like

        subject_dir = Path(subject_dir)
        image = data["image"]
        hu, affine = _array_and_affine(image, None)
        # the probability map, the largest file, is written on a second thread meanwhile (numpy and zlib release
        # the GIL, so the two cores share the work)
        with ThreadPoolExecutor(max_workers=1) as pool:
            written = pool.submit(save_probabilities, data["subtype_prob"], affine, subject_dir / "subtype_prob.nii.gz")
            save_like(data["subtype_label"], image, subject_dir / "subtype_label.nii.gz", np.uint8)
            save_like(data["lung_mask"], image, subject_dir / "lung_mask.nii.gz", np.uint8)
            report = self.report(data, subject_dir.name)
            if self.overview:
                label, _ = _array_and_affine(data["subtype_label"], affine)
                render_overview(hu, label, affine, subject_dir / "overview.png", title=str(report["subject"]))
            written.result()
        return atomic_write_json(subject_dir / self.DONE_FILE, report)


def dataset_or_phantom(
    dataset_dir: Optional[str], output_dir: Union[str, Path], seed: int = 0, resolution_scale: float = 2.0
) -> Union[str, list[str]]:
    """``dataset_dir`` when given; otherwise one phantom CT (written once to ``output_dir/embedded_phantom/``) so
    the bundle runs on a fresh machine without data."""
    if dataset_dir:
        return dataset_dir
    import nibabel as nib

    from drasclr_ext.data.phantom import generate_phantom

    path = Path(output_dir) / "embedded_phantom" / f"phantom_{int(seed):05d}.nii.gz"
    if not path.is_file():
        logger.info(f"no dataset_dir given: generating phantom {seed} into {path}")
        phantom = generate_phantom(int(seed), resolution_scale=float(resolution_scale))
        _write_nifti_gz(nib.Nifti1Image(phantom["image"].astype(np.int16), phantom["affine"]), path)
    return [str(path)]
