"""The outcome of an atlas registration (:class:`~drasclr_ext.transforms.registration.AtlasRegistration`).

:class:`RegistrationResult` holds ``atlas_to_subject``, a 4x4 matrix mapping atlas RAS WORLD (mm) coordinates to
subject RAS WORLD coordinates (MONAI's convention), and its inverse ``subject_to_atlas``; it round-trips through JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np

from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.geometry import apply_affine

__all__ = ["RegistrationResult"]


@dataclass
class RegistrationResult:
    """The outcome of :class:`AtlasRegistration`.

    Attributes:
        atlas_to_subject: 4x4, atlas RAS world (mm) -> subject RAS world (mm).
        subject_to_atlas: its inverse.
        dice: Dice of the warped subject mask vs the atlas mask (on the registration grid).
        metric: final value of the ITK metric (mean squares of the mask fractions, lower is better).
        iterations: optimiser iterations of the last level.
        seconds: wall time of the registration.
        atlas_name: name of the atlas the subject was registered to.
        stop_condition: the optimiser's stop condition.
    """

    atlas_to_subject: np.ndarray
    subject_to_atlas: np.ndarray = field(default=None)  # type: ignore[assignment]
    dice: float = float("nan")
    metric: float = float("nan")
    iterations: int = 0
    seconds: float = 0.0
    atlas_name: str = ""
    stop_condition: str = ""

    def __post_init__(self) -> None:
        self.atlas_to_subject = np.asarray(self.atlas_to_subject, dtype=np.float64)
        if self.subject_to_atlas is None:
            self.subject_to_atlas = np.linalg.inv(self.atlas_to_subject)
        self.subject_to_atlas = np.asarray(self.subject_to_atlas, dtype=np.float64)

    def atlas_voxel_to_subject_world(self, atlas_affine: np.ndarray) -> np.ndarray:
        """4x4 mapping atlas voxel indices to subject RAS world coordinates."""
        return self.atlas_to_subject @ np.asarray(atlas_affine, dtype=np.float64)

    def map_atlas_voxels(self, atlas_affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
        """Subject world coordinates (..., 3) of atlas voxel coordinates (..., 3)."""
        return apply_affine(self.atlas_voxel_to_subject_world(atlas_affine), ijk)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["atlas_to_subject"] = self.atlas_to_subject.tolist()
        d["subject_to_atlas"] = self.subject_to_atlas.tolist()
        d["convention"] = "atlas_to_subject maps atlas RAS world mm to subject RAS world mm"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegistrationResult:
        keys = {"atlas_to_subject", "subject_to_atlas", "iterations", "atlas_name"}
        numbers = {k: float("nan") if d.get(k) is None else float(d[k]) for k in ("dice", "metric", "seconds")}
        return cls(**{k: d[k] for k in keys if k in d}, **numbers, stop_condition=str(d.get("stop_condition") or ""))

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write as JSON atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> RegistrationResult:
        with open(path) as f:
            return cls.from_dict(json.load(f))
