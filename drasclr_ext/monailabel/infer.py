"""MONAI Label infer task: the bundle's own pipeline (LoadCTd, lung mask, atlas registration, dense inferer) on one
scan; the result is the subtype label map in the scan's exact geometry plus the bundle's report JSON."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from drasclr_ext.errors import InputImageError, our_error
from drasclr_ext.fileio import json_safe
from drasclr_ext.monailabel.bundle import INFER_DEFAULTS, SubtypeBundle, SubtypePipeline
from drasclr_ext.monailabel.compat import move_string_image_keys
from drasclr_ext.monailabel.errors import LabelRequestError
from drasclr_ext.networks.segmentation import SUBTYPE_CLASSES
from drasclr_ext.subjects import subject_name
from drasclr_ext.transforms.io import save_like

__all__ = ["LABELS", "SubtypeInferTask"]

logger = logging.getLogger(__name__)
# label value of each segment in subtype_label (0 is outside the lung)
LABELS: Dict[str, int] = {name: value for value, name in enumerate(SUBTYPE_CLASSES, start=1)}


class _MoveStringImageKeys:
    """Pre-transform: MONAI Label's ``image_path`` string -> ``input_path`` (see ``move_string_image_keys``)."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        move_string_image_keys(data)
        return data


class SubtypeInferTask(BasicInferTask):
    """Dense emphysema subtypes of one CT (segmentation task, labels :data:`LABELS`).

    MONAI Label's request flow is kept (``pre_transforms`` -> ``run_inferer`` -> ``writer``, with its latencies),
    but every step is the bundle's: the preprocessing ``Compose`` and ``DenseSubtypeInferer`` of inference.json
    (parsed by ``ConfigParser``), weights from ``models/model.pt``. Requests may set ``overlap``,
    ``sw_batch_size`` and ``autocast`` (the inference.json settings).

    The result is ``subtype_label.nii.gz``-like: uint8, 0 outside lung, 1 normal, 2 centrilobular, 3 paraseptal,
    4 panlobular, with the input's affine and shape; the JSON holds ``report`` (``DenseSubtypeWriter.report``).
    """

    def __init__(self, bundle: SubtypeBundle, description: Optional[str] = None) -> None:
        config = dict(INFER_DEFAULTS, autocast=[False, True])
        super().__init__(
            path=str(bundle.model_path),
            network=None,
            type=InferType.SEGMENTATION,
            labels=LABELS,
            dimension=3,
            description=description or "Dense emphysema subtypes (DrasCLR) with the LAA-950 report",
            output_label_key="subtype_label",
            config=config,
        )
        self.bundle = bundle
        self._local = threading.local()

    def is_valid(self) -> bool:
        return self.bundle.model_path.is_file()

    def __call__(self, request: Dict[str, Any], callbacks: Any = None) -> Tuple[Optional[str], Dict[str, Any]]:
        """MONAI Label's infer flow; our errors become HTTP errors with their message (422 for a scan or
        parameter we cannot use, 500 otherwise) instead of a bare "Internal Server Error"."""
        try:
            return super().__call__(request, callbacks)
        except Exception as exc:
            ours = our_error(exc)
            if ours is None:
                raise
            status = 422 if isinstance(ours, (InputImageError, LabelRequestError)) else 500
            raise HTTPException(status_code=status, detail=f"{type(ours).__name__}: {ours}") from exc
        finally:
            self._local.pipeline = None

    def _pipeline(self, data: Dict[str, Any]) -> SubtypePipeline:
        params = {k: data[k] for k in INFER_DEFAULTS if k in data}
        self._local.pipeline = self.bundle.pipeline(data.get("device", "cpu"), params)
        return self._local.pipeline

    def _current(self, data: Dict[str, Any]) -> SubtypePipeline:
        pipeline = getattr(self._local, "pipeline", None)
        return pipeline if pipeline is not None else self._pipeline(data)

    def pre_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        pipeline = self._pipeline(data or {})
        return [_MoveStringImageKeys(), *pipeline.preprocessing.transforms]

    def post_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data: Dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> Dict[str, Any]:
        return self._current(data).inferer(data)

    def writer(self, data: Dict[str, Any], extension: Any = None, dtype: Any = None) -> Tuple[str, Dict[str, Any]]:
        """Write the label map as a temporary .nii.gz (MONAI Label sends and deletes it) and build the JSON."""
        pipeline = self._current(data)
        image = data["image"]
        fd, path = tempfile.mkstemp(prefix="subtype_label_", suffix=".nii.gz")
        os.close(fd)
        save_like(data["subtype_label"], image, path, np.uint8)
        source = data.get("input_path") or getattr(image, "meta", {}).get("filename_or_obj", "scan")
        report = pipeline.writer.report(data, subject_name(source))
        affine = np.asarray(image.affine.cpu(), dtype=np.float64)
        result = {
            "report": report,
            "subtype_label": {
                "dtype": "uint8",
                "shape": [int(s) for s in data["subtype_label"].shape[1:]],
                "affine": affine.tolist(),
                "values": {"outside lung": 0, **LABELS},
            },
        }
        return path, json_safe(result)
