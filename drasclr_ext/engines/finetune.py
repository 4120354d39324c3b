"""Pieces of the emphysema bundle's fine-tuning and evaluation workflows (``train.json``, ``evaluate.json``).

Training runs MONAI's ``SupervisedTrainer`` on random class-balanced windows of the subjects' atlas grids
(:class:`~drasclr_ext.data.labelled.LabelledGridDataset`, voxel labels, Dice + cross-entropy); validation and
evaluation run MONAI's ``SupervisedEvaluator`` on whole subjects, one per iteration, through the same dense
inference as the bundle's ``inference.json`` (:class:`SubjectDenseInferer`), scored by
:class:`~drasclr_ext.metrics.subtype.SubtypeMetric`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from monai.inferers import Inferer

from drasclr_ext.checkpoint import load_bundle_weights, load_pretrained_encoder, unwrap
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.inference.dense import DenseSubtypeInferer

__all__ = [
    "SubjectDenseInferer",
    "first_item",
    "initialise",
    "labelled_datalist",
    "lung_voxels",
    "param_groups",
    "prepare_subject_batch",
]

logger = logging.getLogger(__name__)


def prepare_subject_batch(
    batchdata: Mapping[str, Any], device: Union[str, torch.device, None] = None, non_blocking: bool = False, **_
) -> tuple[Mapping[str, Any], Any]:
    """(the subject's data dict, its ground-truth label map): :class:`SubjectDenseInferer` takes the whole dict."""
    return batchdata, batchdata["label"]


def lung_voxels(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), class index (N,)) of the lung voxels of a training batch (``pred`` (B, C, ...), ``label``
    (B, 1, ...) with 0 outside the lung and 1..C inside): the input of ``train#key_metric`` (ignite ``Accuracy``)."""
    target = torch.as_tensor(output["label"]).long()[:, 0] - 1
    inside = target >= 0
    return output["pred"].detach().movedim(1, -1)[inside].float(), target[inside]


def first_item(batch: Sequence[Any]) -> Any:
    """``collate_fn`` of the subject loaders: batches of one subject, kept as its dict."""
    if len(batch) != 1:
        raise ValueError(f"subject loaders take batch_size 1, got a batch of {len(batch)}")
    return batch[0]


class SubjectDenseInferer(Inferer):
    """MONAI ``Inferer`` that runs :class:`~drasclr_ext.inference.dense.DenseSubtypeInferer` with the engine's
    network on one preprocessed subject dict and returns the dict with ``subtype_prob`` and ``subtype_label``.

    Keyword arguments are those of ``DenseSubtypeInferer`` (atlas, device, sw_batch_size, window, overlap, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.dense = DenseSubtypeInferer(network=None, **kwargs)  # type: ignore[arg-type]

    def __call__(self, inputs: Mapping[str, Any], network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        network = unwrap(network)  # no collective calls: validation may run on one rank only
        self.dense.network = network
        was_training = network.training
        try:
            return self.dense(inputs)
        finally:
            network.train(was_training)


INITIALISATIONS = ("pretrained", "scratch", "bundle")


def initialise(
    network: torch.nn.Module,
    init_from: str,
    pretrained_path: Union[str, Path],
    ckpt_path: Union[str, Path],
    bundle_root: Optional[Union[str, Path]] = None,
) -> torch.nn.Module:
    """Initialise the network before fine-tuning: ``"pretrained"`` loads the pretrained encoder (the decoder starts
    fresh), ``"scratch"`` keeps the random initialisation, ``"bundle"`` continues from the bundle's current
    ``model.pt`` (encoder and decoder, e.g. for MONAI Label's repeated training). Hashes are checked where listed."""
    if init_from == "pretrained":
        return load_pretrained_encoder(network, pretrained_path, bundle_root)
    if init_from == "bundle":
        return load_bundle_weights(unwrap(network), ckpt_path, bundle_root)
    if init_from == "scratch":
        return network
    raise DrasCLRError(f"init_from must be one of {INITIALISATIONS}, got {init_from!r}")


def param_groups(network: torch.nn.Module, lr: float, encoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the decoder at ``lr``, the encoder at ``lr * encoder_lr_scale`` (left out when
    frozen or when the scale is 0)."""
    named = list(unwrap(network).named_parameters())
    decoder = [p for n, p in named if not n.startswith("encoder.") and p.requires_grad]
    encoder = [p for n, p in named if n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": decoder, "lr": float(lr)}]
    if encoder and encoder_lr_scale > 0:
        groups.append({"params": encoder, "lr": float(lr) * float(encoder_lr_scale)})
    return groups


def labelled_datalist(
    dataset_dir: Optional[str],
    output_dir: Union[str, Path],
    n: int = 6,
    seed: int = 5000,
    resolution_scale: float = 4.0,
) -> str:
    """The datalist JSON of ``dataset_dir`` (``dataset_dir`` itself when it is a JSON file, else its
    ``datalist.json``); with no ``dataset_dir``, a small labelled phantom cohort written once to
    ``output_dir/embedded_phantoms/`` so the workflow runs on a fresh machine."""
    if dataset_dir:
        path = Path(dataset_dir)
        return str(path if path.suffix == ".json" else path / "datalist.json")
    from drasclr_ext.data.phantom import write_phantom_cohort

    out = Path(output_dir) / "embedded_phantoms"
    logger.info(f"no dataset_dir given: writing {n} labelled phantoms into {out}")
    return write_phantom_cohort(out, n=n, seed=seed, resolution_scale=resolution_scale)
