"""The emphysema bundle as the MONAI Label tasks use it: its ``inference.json`` parsed with ``ConfigParser`` into
preprocessing, dense inferer and writer, with the weights of ``models/model.pt`` (reloaded when the file changes)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from monai.bundle import ConfigParser

from drasclr_ext.checkpoint import load_bundle_weights
from drasclr_ext.inference.dense import DenseSubtypeInferer, DenseSubtypeWriter
from drasclr_ext.monailabel.errors import LabelAppSetupError, LabelRequestError

__all__ = ["BUNDLE_NAME", "INFER_DEFAULTS", "SubtypeBundle", "SubtypePipeline", "default_bundle_path"]

logger = logging.getLogger(__name__)
BUNDLE_NAME = "drasclr_emphysema_subtype"
# inference.json settings a MONAI Label request may change (name -> default shown to clients)
INFER_DEFAULTS: dict[str, Any] = {
    "overlap": 0.25,
    "sw_batch_size": 2,
    "autocast": False,
}


def default_bundle_path() -> Optional[Path]:
    """``bundles/drasclr_emphysema_subtype`` of the source checkout this package runs from, if there is one."""
    path = Path(__file__).resolve().parents[2] / "bundles" / BUNDLE_NAME
    return path if (path / "configs" / "inference.json").is_file() else None


def check_infer_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inference.json overrides among ``params`` (INFER_DEFAULTS' keys), converted and checked."""
    out: dict[str, Any] = {}
    try:
        if "overlap" in params:
            out["overlap"] = float(params["overlap"])
            if not 0.0 <= out["overlap"] < 1.0:
                raise ValueError("overlap must be in [0, 1)")
        if "sw_batch_size" in params:
            out["sw_batch_size"] = int(params["sw_batch_size"])
            if out["sw_batch_size"] < 1:
                raise ValueError("sw_batch_size must be at least 1")
        if "autocast" in params:
            value = params["autocast"]
            value = value[0] if isinstance(value, (list, tuple)) else value
            if str(value).lower() not in ("true", "false", "1", "0"):
                raise ValueError("autocast must be true or false")
            out["autocast"] = str(value).lower() in ("true", "1")
    except (TypeError, ValueError) as exc:
        raise LabelRequestError(f"bad inference parameter: {exc}") from exc
    return out


@dataclass
class SubtypePipeline:
    """One parsed inference.json: what the infer task runs, for one set of weights and overrides."""

    preprocessing: Any
    inferer: DenseSubtypeInferer
    writer: DenseSubtypeWriter
    stamp: tuple


class SubtypeBundle:
    """A local copy of the dense emphysema subtype bundle (never the model zoo).

    Args:
        root: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
    """

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.configs = self.root / "configs"
        self.inference_config = self.configs / "inference.json"
        self.metadata = self.configs / "metadata.json"
        self.train_config = self.configs / "train.json"
        self.model_path = self.root / "models" / "model.pt"
        missing = [p for p in (self.inference_config, self.metadata, self.model_path) if not p.is_file()]
        if missing:
            raise LabelAppSetupError(
                f"{self.root} is not the {BUNDLE_NAME} bundle: {', '.join(str(p) for p in missing)} missing. "
                "Give the bundle folder with --conf bundle_path DIR (a local copy; the model zoo is never used)"
            )
        self._lock = threading.Lock()
        self._pipeline: Optional[SubtypePipeline] = None

    @property
    def has_train_config(self) -> bool:
        return self.train_config.is_file()

    def version(self) -> str:
        return str(self.parser().get("_meta_", {}).get("version", ""))

    def weights_stamp(self) -> tuple:
        """(mtime_ns, size, inode) of ``models/model.pt``: changes when training rewrites it."""
        st = self.model_path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def parser(self, **overrides: Any) -> ConfigParser:
        """``ConfigParser`` of inference.json with the metadata, ``bundle_root`` set to this folder."""
        parser = ConfigParser()
        parser.read_meta(str(self.metadata))
        parser.read_config(str(self.inference_config))
        parser.update({"bundle_root": str(self.root), **overrides})
        return parser

    def pipeline(self, device: Any = "cpu", overrides: Optional[Mapping[str, Any]] = None) -> SubtypePipeline:
        """The parsed pipeline with the current weights; re-parsed when the weights, device or overrides change."""
        overrides = check_infer_overrides(overrides or {})
        stamp = (self.weights_stamp(), str(device), tuple(sorted(overrides.items())))
        with self._lock:
            if self._pipeline is None or self._pipeline.stamp != stamp:
                self._pipeline = None  # free the old network first
                self._pipeline = self._build(device, overrides, stamp)
            return self._pipeline

    def _build(self, device: Any, overrides: Mapping[str, Any], stamp: tuple) -> SubtypePipeline:
        logger.info(f"loading {self.model_path} ({dict(overrides) or 'bundle defaults'}) on {device}")
        parser = self.parser(device=str(device), **overrides)
        network = parser.get_parsed_content("network")
        load_bundle_weights(network, parser.get_parsed_content("ckpt_path"), self.root)
        network.eval()
        return SubtypePipeline(
            preprocessing=parser.get_parsed_content("preprocessing"),
            inferer=parser.get_parsed_content("inferer"),
            writer=parser.get_parsed_content("writer"),
            stamp=stamp,
        )
