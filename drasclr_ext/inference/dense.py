"""Dense emphysema subtype maps: the CT on the 1 mm atlas grid -> sliding-window segmentation -> the input's grid.

1. :func:`~drasclr_ext.transforms.atlas_grid.atlas_grid` resamples the CT and lung mask onto a 1 mm grid with the
   atlas axes over the lungs; every voxel gets its normalised atlas location from the registration.
2. :class:`~drasclr_ext.networks.segmentation.DrasCLRSegNet` segments each window (image + location channels)
   into normal, centrilobular, paraseptal and panlobular lung; MONAI's ``sliding_window_inference`` tiles the grid
   with overlapping windows and blends their softmax probabilities with Gaussian weights. Windows without lung
   are not computed.
3. :func:`grid_to_image` resamples the probabilities trilinearly onto the input scan's voxels inside the lung mask
   (renormalised to sum to 1); outside the lung they are 0.
4. :func:`subtype_labels`: each lung voxel takes its most probable class, {0 outside lung, 1 normal, 2 CLE,
   3 PSE, 4 PLE}. LAA-950 and Perc15 in the report are measured directly on the HU; the subtype fractions,
   grades and maps come from these labels.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference

from drasclr_ext import __version__
from drasclr_ext.atlas import Atlas, load_atlas
from drasclr_ext.errors import InputImageError
from drasclr_ext.fileio import atomic_write_json, check_finite, prepare_output_dir, write_nifti
from drasclr_ext.geometry import array_and_affine, grid_to_image, mask_slabs, memory_layout, voxel_spacing
from drasclr_ext.inference.overview import render_overview
from drasclr_ext.metrics.emphysema import emphysema_report, laa950_percent, perc15
from drasclr_ext.quality import scan_quality, subject_quality
from drasclr_ext.transforms.atlas_grid import AtlasGrid, atlas_grid

__all__ = [
    "DenseSubtypeInferer",
    "DenseSubtypeWriter",
    "LungWindowPredictor",
    "dataset_or_phantom",
    "native_bfloat16",
    "subtype_labels",
]

logger = logging.getLogger(__name__)


def subtype_labels(probabilities: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """uint8 labels {0 outside lung, 1 normal, 2 CLE, 3 PSE, 4 PLE}: the most probable class of each lung voxel of
    (4, X, Y, Z) probabilities."""
    lung = np.asarray(lung_mask) > 0
    layout = memory_layout(lung)
    labels = np.zeros(lung.shape, dtype=np.uint8, order=layout)
    for box in mask_slabs(lung, layout):
        best = np.argmax(probabilities[(slice(None), *box)], axis=0).astype(np.uint8)
        labels[box] = np.where(lung[box], best + 1, 0)
    return labels


def native_bfloat16(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (elsewhere torch emulates bfloat16 convolutions, several times slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


class LungWindowPredictor:
    """The ``predictor`` of ``sliding_window_inference``: softmax probabilities of the windows that hold lung.

    Input windows (B, 5, W, W, W): image, three location channels and the lung mask; windows without lung get
    zero probabilities without running the network (they lie outside the lung, where the maps are 0 anyway).

    Args:
        network: ``forward((B, 4, W, W, W)) -> logits (B, C, W, W, W)``.
        autocast: run the network under bfloat16 autocast.
    """

    def __init__(self, network: torch.nn.Module, autocast: bool = False) -> None:
        self.network = network
        self.autocast = bool(autocast)
        self.windows = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        has_lung = batch[:, 4].flatten(1).amax(1) > 0
        if bool(has_lung.any()):
            with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.network(batch[has_lung, :4])
            probabilities = torch.softmax(logits.float(), dim=1)
            self.windows += int(has_lung.sum())
            if bool(has_lung.all()):
                return probabilities
            out = probabilities.new_zeros((batch.shape[0], *probabilities.shape[1:]))
            out[has_lung] = probabilities
            return out
        classes = getattr(self.network, "num_classes", 4)
        return batch.new_zeros((batch.shape[0], classes, *batch.shape[2:]))


class DenseSubtypeInferer:
    """Dense emphysema subtype maps of one subject (see the module docstring for the method).

    Reads ``image`` (HU), ``lung_mask`` and ``registration`` from the data dict and adds ``subtype_prob``
    (4, X, Y, Z) float32 and ``subtype_label`` (1, X, Y, Z) uint8, both MetaTensors with the image's affine,
    plus ``dense_info`` (window count and timings).

    Args:
        network: a :class:`~drasclr_ext.networks.segmentation.DrasCLRSegNet`.
        atlas: the atlas the registration used (an :class:`Atlas` or its name).
        device: where the network runs.
        sw_batch_size: windows per forward pass.
        window: window edge in mm (1 mm voxels; a multiple of 32).
        overlap: overlap of neighbouring windows (``sliding_window_inference``'s).
        sigma_scale: Gaussian blending sigma as a fraction of the window.
        margin: mm of grid around the lung bounding box.
        autocast: run the network under bfloat16 autocast: True, False, or "auto" (on where the device computes
            bfloat16 natively, see :func:`native_bfloat16`; emulated bfloat16 is several times slower).
        atlas_path: folder of the atlas files, for atlases that need it.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        atlas: Union[Atlas, str] = "default",
        device: Union[str, torch.device] = "cpu",
        sw_batch_size: int = 2,
        window: int = 64,
        overlap: float = 0.25,
        sigma_scale: float = 0.125,
        margin: int = 4,
        autocast: Union[bool, str] = False,
        atlas_path: Optional[str] = None,
        image_key: str = "image",
        mask_key: str = "lung_mask",
        registration_key: str = "registration",
    ) -> None:
        if int(window) % 32:
            raise ValueError(f"window must be a multiple of 32 mm, got {window}")
        self.network = network
        self.atlas = load_atlas(atlas, atlas_path)
        self.device = torch.device(device)
        self.sw_batch_size = int(sw_batch_size)
        self.window, self.overlap, self.sigma_scale = int(window), float(overlap), float(sigma_scale)
        self.margin = int(margin)
        self.autocast = native_bfloat16(self.device) if autocast == "auto" else bool(autocast)
        self.image_key, self.mask_key, self.registration_key = image_key, mask_key, registration_key

    @torch.inference_mode()
    def predict(self, grid: AtlasGrid) -> tuple[np.ndarray, int]:
        """(C, X, Y, Z) blended class probabilities on the atlas grid, and the number of windows computed."""
        self.network.eval()
        inputs = np.concatenate([grid.image[None], grid.locations(), grid.lung[None] > 0], axis=0)
        inputs = torch.from_numpy(inputs.astype(np.float32, copy=False))[None]
        predictor = LungWindowPredictor(self.network, self.autocast)
        probabilities = sliding_window_inference(
            inputs,
            roi_size=self.window,
            sw_batch_size=self.sw_batch_size,
            predictor=predictor,
            overlap=self.overlap,
            mode="gaussian",
            sigma_scale=self.sigma_scale,
            sw_device=self.device,
            device="cpu",
        )
        return probabilities[0].numpy(), predictor.windows

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        image, registration = d[self.image_key], d[self.registration_key]
        hu, affine = array_and_affine(image)
        lung, _ = array_and_affine(d[self.mask_key], affine, "lung mask")
        if lung.shape != hu.shape:
            raise InputImageError(f"lung mask {lung.shape} and image {hu.shape} differ in shape: recompute the mask")
        timings = {}
        t = time.perf_counter()
        grid = atlas_grid(image, d[self.mask_key], registration, self.atlas, self.margin, min_size=self.window)
        timings["atlas_grid_s"] = time.perf_counter() - t
        t = time.perf_counter()
        probabilities, windows = self.predict(grid)
        timings["network_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prob = grid_to_image(probabilities, grid.affine, affine, hu.shape, lung > 0)
        del probabilities
        label = subtype_labels(prob, lung)
        timings["to_input_grid_s"] = time.perf_counter() - t
        meta = dict(getattr(image, "meta", {}))
        meta["affine"] = torch.as_tensor(affine, dtype=torch.float64)
        d["subtype_prob"] = MetaTensor(torch.from_numpy(prob), meta=dict(meta))
        d["subtype_label"] = MetaTensor(torch.from_numpy(label[None]), meta=dict(meta))
        d["dense_info"] = {
            "windows": windows,
            "window": self.window,
            "overlap": self.overlap,
            "sigma_scale": self.sigma_scale,
            "grid_shape": list(grid.shape),
            "autocast": self.autocast,
            "timings": timings,
        }
        return d


def save_probabilities(prob: Any, affine: np.ndarray, path: Union[str, Path]) -> Path:
    """Write (C, X, Y, Z) probabilities as an (X, Y, Z, C) NIfTI, stored as uint8 with slope 1/255, atomically."""
    array = prob.detach().cpu().numpy() if isinstance(prob, torch.Tensor) else np.asarray(prob)
    check_finite(array, path)
    # NIfTI's own (Fortran) order, filled a few slices at a time: no full-size float temporary, no transposed write
    data = np.empty((*array.shape[1:], array.shape[0]), dtype=np.uint8, order="F")
    slab = 8
    for c in range(array.shape[0]):
        for k in range(0, array.shape[-1], slab):
            scaled = np.multiply(array[c, ..., k : k + slab], np.float32(255.0))
            np.clip(scaled, 0.0, 255.0, out=scaled)
            data[..., k : k + slab, c] = np.rint(scaled, out=scaled)
    return write_nifti(path, data, affine, slope=1.0 / 255.0, intent=("vector", "subtype probability"))


def _acquisition(image: Any, affine: np.ndarray, shape: Sequence[int]) -> dict[str, Any]:
    meta = getattr(image, "meta", {}) or {}
    acquisition = dict(meta.get("acquisition") or {})
    spacing = voxel_spacing(affine)
    return {
        "shape": [int(s) for s in shape],
        "spacing_mm": [float(s) for s in spacing],
        "slice_thickness_mm": acquisition.pop("slice_thickness", None),
        "convolution_kernel": acquisition.pop("convolution_kernel", "") or None,
        **{k: (v if v != "" else None) for k, v in acquisition.items()},
    }


def _harmonisation_section(
    info: Mapping[str, Any],
    hu: np.ndarray,
    hu_raw: np.ndarray,
    lung: np.ndarray,
    affine: np.ndarray,
    raw: Mapping,
    dicom_kernel: Optional[str] = None,
) -> dict:
    """The report's ``harmonisation``: the lung noise estimate and what was done to the model's input (``applied``,
    ``target_noise_hu``, ``sigma_mm``, ``noise_hu_after``; ``model_input``: LAA-950 / Perc15 of the image the model
    saw), which image the subtype map used, the DICOM kernel, and the kernel-harmonised densitometry:
    ``laa950_percent`` and ``perc15_hu`` as a soft reference kernel would give them, how under ``densitometry``
    (:func:`~drasclr_ext.metrics.kernel_harmonise.harmonised_densitometry`)."""
    from drasclr_ext.metrics.kernel_harmonise import dicom_kernel_class, harmonised_densitometry

    applied = bool(info.get("applied"))
    section = dict(info)
    section["used_for_subtype_map"] = "harmonised" if applied else "raw"
    section["model_input"] = {
        "laa950_percent": laa950_percent(hu, lung) if applied else raw["laa950_percent"],
        "perc15_hu": perc15(hu, lung) if applied else raw["perc15_hu"],
    }
    densitometry = harmonised_densitometry(hu_raw, lung, affine, raw, dicom_kernel)
    section["laa950_percent"] = densitometry.pop("laa950_percent")
    section["perc15_hu"] = densitometry.pop("perc15_hu")
    section.setdefault("noise_hu", densitometry["noise_hu"])
    densitometry.pop("noise_hu")
    section["densitometry"] = densitometry
    section["dicom_kernel"] = {"name": dicom_kernel or None, "class": dicom_kernel_class(dicom_kernel)}
    return section


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
        hu, affine = array_and_affine(image)
        lung, _ = array_and_affine(data["lung_mask"], affine, "lung mask")
        label, _ = array_and_affine(data["subtype_label"], affine, "subtype label")
        registration = data.get("registration")
        report: dict[str, Any] = {
            "subject": data.get("subject", subject_name),
            "input": str(getattr(image, "meta", {}).get("filename_or_obj", "")),
        }
        raw = data.get("image_raw")  # the scan before noise harmonisation, when it was harmonised
        hu_raw = array_and_affine(raw, affine)[0] if raw is not None else hu
        report.update(emphysema_report(hu_raw, lung, affine, label))
        if data.get("harmonisation") is not None:
            kernel = (getattr(image, "meta", {}).get("acquisition") or {}).get("convolution_kernel")
            report["harmonisation"] = _harmonisation_section(
                data["harmonisation"], hu, hu_raw, lung, affine, report, kernel
            )
        report["acquisition"] = _acquisition(image, affine, hu.shape)
        report["quality"] = scan_quality(image, affine)
        report["registration_dice"] = getattr(registration, "dice", None)
        airways = getattr(data["lung_mask"], "meta", {}).get("airways")
        if airways:
            report["airways"] = dict(airways)
        report["quality"] += subject_quality(report, lung, affine)
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
            "airways": "whether the lung mask found the trachea, and the volume of trachea and main bronchi (with "
            "their walls) it removed from the lungs",
            "harmonisation": "noise in the lung parenchyma (HU, robust in-plane high-pass estimate) and the in-plane "
            "Gaussian that brought it to the target before the model (model_input: LAA-950 and Perc15 of that image); "
            "laa950_percent and perc15_hu: the densitometry harmonised to a soft reference kernel (sharpness measured "
            "on the pleural edges, kernel conversion and noise matching, see densitometry); the report's other "
            "densitometry is on the raw scan",
        }
        return report

    def __call__(self, data: Mapping[str, Any], subject_dir: Union[str, Path]) -> Path:
        from drasclr_ext.transforms.io import save_like

        subject_dir = Path(subject_dir)
        image = data["image"]
        hu, affine = array_and_affine(image)
        # the probability map, the largest file, is written on a second thread meanwhile (numpy and zlib release
        # the GIL, so the two cores share the work)
        with ThreadPoolExecutor(max_workers=1) as pool:
            written = pool.submit(save_probabilities, data["subtype_prob"], affine, subject_dir / "subtype_prob.nii.gz")
            save_like(data["subtype_label"], image, subject_dir / "subtype_label.nii.gz", np.uint8)
            save_like(data["lung_mask"], image, subject_dir / "lung_mask.nii.gz", np.uint8)
            report = self.report(data, subject_dir.name)
            if self.overview:
                label, _ = array_and_affine(data["subtype_label"], affine, "subtype label")
                flags = ", ".join(f["flag"] for f in report["quality"])
                title = f"{report['subject']}" + (f"  (quality flags: {flags})" if flags else "")
                render_overview(hu, label, affine, subject_dir / "overview.png", title=title)
            written.result()
        return atomic_write_json(subject_dir / self.DONE_FILE, report)


def dataset_or_phantom(
    dataset_dir: Optional[str], output_dir: Union[str, Path], seed: int = 0, resolution_scale: float = 2.0
) -> Union[str, list[str]]:
    """``dataset_dir`` when given; otherwise one phantom CT (written once to ``output_dir/embedded_phantom/``) so
    the bundle runs on a fresh machine without data."""
    if dataset_dir:
        return dataset_dir
    prepare_output_dir(output_dir)  # a bad output directory is a run-level error, stated before any work
    from drasclr_ext.data.phantom import generate_phantom

    path = Path(output_dir) / "embedded_phantom" / f"phantom_{int(seed):05d}.nii.gz"
    if not path.is_file():
        logger.info(f"no dataset_dir given: generating phantom {seed} into {path}")
        phantom = generate_phantom(int(seed), resolution_scale=float(resolution_scale))
        write_nifti(path, phantom["image"], phantom["affine"], np.int16)
    return [str(path)]
