"""Ignite handlers for the bundles: atomic checkpoints, resuming, a progress bar, encoder export."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from drasclr_ext.checkpoint import save_atomic

logger = logging.getLogger(__name__)
EPOCH_FILE = re.compile(r"^(?P<prefix>.+)_epoch=(?P<epoch>\d+)\.pt$")


def unwrap(module: Any) -> Any:
    """The module inside DistributedDataParallel/DataParallel, else the object itself."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, wrappers) else module


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
        metric = getattr(engine.state, "best_metric", None)
        if metric is None or metric <= self._best or engine.state.best_metric_epoch != engine.state.epoch:
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


class EncoderExporter:
    """Write the query encoder of a DrasCLR module (or an encoder-holding network) as a plain state dict."""

    def __init__(self, network: torch.nn.Module, filepath: str, attribute: str = "encoder_q") -> None:
        self.network = network
        self.filepath = filepath
        self.attribute = attribute

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, lambda _: self())

    def __call__(self) -> str:
        module = unwrap(self.network)
        encoder = getattr(module, self.attribute, module)
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        save_atomic(state, self.filepath)
        logger.info(f"exported encoder weights to {self.filepath}")
        return self.filepath
