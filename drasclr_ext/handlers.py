"""Ignite handlers for the bundles: atomic checkpoints, resuming, a progress bar, weight export, metrics JSON."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from drasclr_ext.bundle_files import record_large_file
from drasclr_ext.checkpoint import save_atomic, unwrap
from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.parallel import distributed_rank

logger = logging.getLogger(__name__)
EPOCH_FILE = re.compile(r"^(?P<prefix>.+)_epoch=(?P<epoch>\d+)\.pt$")


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the checkpoint of the highest epoch ``<prefix>_epoch=N.pt`` in ``ckpt_dir``, or None."""
    best: tuple[int, Path] | None = None
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    for path in folder.iterdir():
        match = EPOCH_FILE.match(path.name)
        if match and match["prefix"] == prefix and (best is None or int(match["epoch"]) > best[0]):
            best = (int(match["epoch"]), path)
    return str(best[1]) if best else None


def improved_best_metric(engine: Engine, previous: float) -> float | None:
    """The validator's best key metric when this epoch set it above ``previous``, else None."""
    metric = getattr(engine.state, "best_metric", None)
    if metric is None or metric <= previous or engine.state.best_metric_epoch != engine.state.epoch:
        return None
    return metric


class AtomicCheckpointSaver:
    """Save ``save_dict`` objects every ``save_interval`` epochs as ``<prefix>_epoch=N.pt``, atomically.

    Keeps the newest ``n_saved`` files. With ``key_metric=True`` it also keeps ``<prefix>_key_metric.pt``, the
    state at the best ``engine.state.best_metric`` so far (for validators), instead of the epoch files.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name -> object with ``state_dict()`` (DDP wrappers are unwrapped); the engine it is attached to
            is added as ``trainer``.
        save_interval: epochs between saves.
        n_saved: epoch checkpoints kept.
        file_prefix: file name prefix.
        key_metric: save the best state by the engine's key metric (attach to a validator).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        n_saved: int = 1,
        file_prefix: str = "checkpoint",
        key_metric: bool = False,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.n_saved = n_saved
        self.file_prefix = file_prefix
        self.key_metric = key_metric
        self._best = -math.inf

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)  # epoch and iteration, for resuming
        if self.key_metric:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)
        else:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save_epoch)

    def state(self) -> dict[str, Any]:
        return {name: unwrap(obj).state_dict() for name, obj in self.save_dict.items()}

    def save_epoch(self, engine: Engine) -> None:
        path = self.save_dir / f"{self.file_prefix}_epoch={engine.state.epoch}.pt"
        save_atomic(self.state(), path)
        logger.info(f"saved checkpoint {path}")
        files = sorted(
            (int(m["epoch"]), p)
            for p in self.save_dir.iterdir()
            if (m := EPOCH_FILE.match(p.name)) and m["prefix"] == self.file_prefix
        )
        for _, old in files[: -self.n_saved]:
            old.unlink(missing_ok=True)

    def save_best(self, engine: Engine) -> None:
        metric = improved_best_metric(engine, self._best)
        if metric is None:
            return
        self._best = metric
        path = self.save_dir / f"{self.file_prefix}_key_metric.pt"
        save_atomic(self.state(), path)
        logger.info(f"saved best checkpoint {path} (metric {metric:.4f})")


class ResumeFromLatest(CheckpointLoader):
    """Resume training from the newest ``<prefix>_epoch=N.pt`` in ``ckpt_dir`` (weights_only loading).

    The engine it is attached to is restored as ``trainer`` (epoch and iteration); without a checkpoint, or with
    ``enabled=False``, it does nothing.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping[str, Any],
        enabled: bool = True,
        file_prefix: str = "checkpoint",
        map_location: Any = None,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.enabled = enabled
        self.file_prefix = file_prefix
        super().__init__(load_path=os.devnull, load_dict=dict(load_dict), map_location=map_location)

    def attach(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.file_prefix)
        if not self.enabled:
            return
        if path is None:
            logger.info(f"no checkpoint to resume from in {self.ckpt_dir}: training starts from scratch")
            return
        self.load_path = path
        self.load_dict.setdefault("trainer", engine)
        super().attach(engine)


class ProgressBar:
    """A tqdm progress bar over each epoch's iterations that shows the step's scalar outputs."""

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, persist: bool = False) -> None:
        self.output_transform = output_transform or (lambda out: out if isinstance(out, Mapping) else {})
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar as IgniteProgressBar

        IgniteProgressBar(persist=self.persist).attach(engine, output_transform=self.output_transform)


class WeightsExporter:
    """Write a network's weights (or one of its submodules') as a plain CPU state dict, atomically.

    Args:
        network: the trained network (DDP wrappers are unwrapped).
        filepath: where the state dict goes (usually ``<bundle>/models/model.pt``).
        attribute: submodule to export (e.g. ``encoder_q`` of :class:`~drasclr_ext.networks.DrasCLR`); None exports
            the whole network. A network without that attribute is exported whole.
        bundle_root: when given and ``filepath`` lies inside it, the new file's sha256 is written into the bundle's
            ``large_files.yml`` (so the bundle's own hash check accepts the user's training result).
        on_best: attach to a validator and export whenever its key metric improves; otherwise export when the
            engine it is attached to completes.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        filepath: str,
        attribute: str | None = None,
        bundle_root: str | None = None,
        on_best: bool = False,
    ) -> None:
        self.network = network
        self.filepath = filepath
        self.attribute = attribute
        self.bundle_root = bundle_root
        self.on_best = on_best
        self._best = -math.inf

    def attach(self, engine: Engine) -> None:
        if self.on_best:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._export_if_best)
        else:
            engine.add_event_handler(Events.COMPLETED, lambda _: self())

    def _export_if_best(self, engine: Engine) -> None:
        metric = improved_best_metric(engine, self._best)
        if metric is None:
            return
        self._best = metric
        self()
        logger.info(f"best metric so far ({metric:.4f}): weights written to {self.filepath}")

    def __call__(self) -> str:
        module = unwrap(self.network)
        if self.attribute:
            module = getattr(module, self.attribute, module)
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_atomic(state, self.filepath)
        if self.bundle_root is not None and _inside(self.filepath, self.bundle_root):
            record_large_file(self.bundle_root, self.filepath)
        logger.info(f"exported weights to {self.filepath}")
        return self.filepath


class EncoderExporter(WeightsExporter):
    """:class:`WeightsExporter` of the query encoder of a DrasCLR module (pretraining)."""

    def __init__(
        self, network: torch.nn.Module, filepath: str, attribute: str = "encoder_q", bundle_root: str | None = None
    ) -> None:
        super().__init__(network, filepath, attribute, bundle_root)


class MetricsJSONWriter:
    """Write an engine's scalar metrics (``engine.state.metrics``, JSON-safe) to ``filepath`` when it completes.

    Args:
        filepath: the JSON file.
        extra: more top-level entries (bundle version, settings, ...).
        per_subject: a metric with ``scores.subjects`` (a :class:`~drasclr_ext.metrics.subtype.SubtypeMetric`)
            whose per-subject rows go under ``subjects``.
    """

    def __init__(self, filepath: str, extra: Mapping[str, Any] | None = None, per_subject: Any = None) -> None:
        self.filepath = filepath
        self.extra = dict(extra or {})
        self.per_subject = per_subject

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scalars = {k: v for k, v in engine.state.metrics.items() if not isinstance(v, (Mapping, list, tuple))}
        content = {**self.extra, **scalars}
        if self.per_subject is not None:
            content["subjects"] = list(self.per_subject.scores.subjects)
        atomic_write_json(self.filepath, content)
        logger.info(f"metrics written to {self.filepath}")


def trainer_handlers(
    handlers: Sequence[Any],
    rank0_handlers: Sequence[Any],
    validation_handlers: Sequence[Any] = (),
    final_export_handlers: Sequence[Any] = (),
    validation_data: Sequence[Any] = (),
) -> list[Any]:
    """The trainer's handlers: ``handlers`` on every process; on rank 0 (or a single process) also
    ``rank0_handlers`` and, with validation data, ``validation_handlers`` (the best model is exported), without it
    ``final_export_handlers`` (the last model is)."""
    if distributed_rank()[0] != 0:
        return list(handlers)
    chosen = validation_handlers if len(validation_data) > 0 else final_export_handlers
    return [*handlers, *rank0_handlers, *chosen]
