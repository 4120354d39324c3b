"""MONAI Label train task: fine-tune the bundle on the datastore's final labels with its own ``train.json``.

MONAI Label runs training in a subprocess (``python -m monailabel.interfaces.utils.app -m train``). The bundle's
train workflow writes the fine-tuned weights to ``<bundle>/models/model.pt`` and their sha256 to
``large_files.yml``; the server's infer task notices the new file and reloads it.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from drasclr_ext.checkpoint import sha256sum
from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.monailabel.bundle import SubtypeBundle
from drasclr_ext.monailabel.errors import LabelAppSetupError, LabelRequestError, TrainingDataError

__all__ = ["TRAIN_DEFAULTS", "SubtypeTrainTask", "split_datalist"]

logger = logging.getLogger(__name__)
# request parameters (shown to clients): epochs, iterations per epoch (0: the whole training set), validation share,
# subjects per batch (0: train.json's batch_size; each subject gives crops_per_subject windows), and where training
# starts (train.json's init_from: "bundle" continues from the current models/model.pt, "pretrained" restarts from the
# pretrained encoder, "scratch")
TRAIN_DEFAULTS: Dict[str, Any] = {
    "max_epochs": 10,
    "epoch_length": 0,
    "val_split": 0.2,
    "batch_size": 0,
    "init_from": "bundle",
}
INIT_FROM = ("bundle", "pretrained", "scratch")


def split_datalist(pairs: List[Dict[str, str]], val_split: float) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Sorted pairs split into training and validation: ``round(n * val_split)`` validation subjects (the last
    ones), none with fewer than 2 pairs, and always at least one training subject."""
    pairs = sorted(pairs, key=lambda p: p["image"])
    n_val = int(round(len(pairs) * val_split)) if len(pairs) >= 2 else 0
    n_val = min(max(n_val, 0), len(pairs) - 1)
    return pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]


def _check_pairs(pairs: List[Dict[str, str]]) -> None:
    """Each label map must have its image's shape (NIfTI headers only; other formats are checked by training)."""
    import nibabel as nib

    bad = []
    for pair in pairs:
        if not all(p.endswith((".nii", ".nii.gz")) for p in (pair["image"], pair["label"])):
            continue
        image, label = nib.load(pair["image"]), nib.load(pair["label"])
        if image.shape[:3] != label.shape[:3]:
            bad.append(f"{pair['label']} {label.shape[:3]} vs image {image.shape[:3]}")
    if bad:
        raise TrainingDataError(
            "final labels that do not match their image's shape: " + "; ".join(bad) + ". Save the label of each "
            "scan in the scan's own geometry (Slicer: Submit Label from the MONAI Label module)"
        )


def _int_param(request: Mapping[str, Any], name: str, minimum: int) -> int:
    try:
        value = int(request.get(name, TRAIN_DEFAULTS[name]))
    except (TypeError, ValueError) as exc:
        raise LabelRequestError(f"{name} must be an integer, got {request.get(name)!r}") from exc
    if value < minimum:
        raise LabelRequestError(f"{name} must be at least {minimum}, got {value}")
    return value


class SubtypeTrainTask(TrainTask):
    """Fine-tune the emphysema bundle from the user's labels (MONAI Label tag ``final``).

    Request parameters: ``max_epochs``, ``epoch_length`` (0: the whole training set each epoch), ``val_split`` and
    ``batch_size`` (0: train.json's) and ``init_from`` (``"bundle"``, the default, continues from the current
    ``models/model.pt``; ``"pretrained"`` restarts from the pretrained encoder with a new decoder; ``"scratch"``).
    Every run trains on all final labels.
    Each run writes its datalist, logs and checkpoints to ``<work_dir>/<run>/`` and its summary to
    ``<work_dir>/stats.json`` (shown as ``train_stats`` by ``/info/``).

    Args:
        bundle: the bundle whose ``configs/train.json`` runs and whose ``models/model.pt`` is rewritten.
        work_dir: where training runs go (the app folder's ``train/``).
    """

    def __init__(self, bundle: SubtypeBundle, work_dir: Path, description: Optional[str] = None) -> None:
        super().__init__(description or "Fine-tune the emphysema subtype network on the final labels")
        self.bundle = bundle
        self.work_dir = Path(work_dir)

    def config(self) -> Dict[str, Any]:
        return dict(TRAIN_DEFAULTS)

    def stats(self) -> Dict[str, Any]:
        path = self.work_dir / "stats.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def datalist(self, datastore: Datastore, val_split: float) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
        pairs = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d.get("label")]
        if not pairs:
            raise TrainingDataError(
                "no final labels to fine-tune from: save at least one label with the tag 'final' (3D Slicer: "
                "Submit Label; files: <studies>/labels/final/<image id>.nii.gz)"
            )
        _check_pairs(pairs)
        return split_datalist(pairs, val_split)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        if not self.bundle.has_train_config:
            raise LabelAppSetupError(f"{self.bundle.train_config} does not exist: this bundle cannot be fine-tuned")
        max_epochs = _int_param(request, "max_epochs", 1)
        epoch_length = _int_param(request, "epoch_length", 0)
        batch_size = _int_param(request, "batch_size", 0)
        try:
            val_split = float(request.get("val_split", TRAIN_DEFAULTS["val_split"]))
        except (TypeError, ValueError) as exc:
            raise LabelRequestError(f"val_split must be a number, got {request.get('val_split')!r}") from exc
        if not 0.0 <= val_split < 1.0:
            raise LabelRequestError(f"val_split must be in [0, 1), got {val_split}")
        init_from = str(request.get("init_from", TRAIN_DEFAULTS["init_from"]))
        if init_from not in INIT_FROM:
            raise LabelRequestError(f"init_from must be one of {INIT_FROM}, got {init_from!r}")
        training, validation = self.datalist(datastore, val_split)
        run_dir = self.work_dir / datetime.now().strftime("run_%Y%m%d_%H%M%S_%f")
        datalist = atomic_write_json(run_dir / "datalist.json", {"training": training, "validation": validation})
        before = sha256sum(self.bundle.model_path)
        logger.info(f"fine-tuning on {len(training)} subjects ({len(validation)} for validation) in {run_dir}")
        start = time.perf_counter()
        overrides = {"max_epochs": max_epochs, "epoch_length": epoch_length or None, "init_from": init_from}
        if batch_size:
            overrides["batch_size"] = batch_size
        self._run_workflow(datalist, run_dir, overrides)
        after = sha256sum(self.bundle.model_path)
        stats = {
            "finished": datetime.now().isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - start, 1),
            "training_subjects": len(training),
            "validation_subjects": len(validation),
            "max_epochs": max_epochs,
            "epoch_length": epoch_length or None,
            "batch_size": batch_size or None,
            "init_from": init_from,
            "run_dir": str(run_dir),
            "model": str(self.bundle.model_path),
            "weights_sha256_before": before,
            "weights_sha256": after,
            "weights_changed": before != after,
        }
        atomic_write_json(self.work_dir / "stats.json", stats)
        return stats

    def _run_workflow(self, datalist: Path, run_dir: Path, overrides: Mapping[str, Any]) -> None:
        """The bundle's train workflow (``ConfigWorkflow`` on train.json) with our datalist and output folder."""
        from monai.bundle import ConfigWorkflow

        workflow = ConfigWorkflow(
            config_file=str(self.bundle.train_config),
            meta_file=str(self.bundle.metadata),
            workflow_type="train",
            bundle_root=str(self.bundle.root),
            datalist=str(datalist),
            output_dir=str(run_dir / "output"),
            cache_dir=str(run_dir / "cache"),
            **overrides,
        )
        workflow.initialize()
        try:
            workflow.run()
        finally:
            workflow.finalize()
