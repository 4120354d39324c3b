"""Labelled subjects for fine-tuning and evaluating the dense emphysema bundle.

A labelled datalist is a MONAI datalist JSON whose entries hold ``image`` (a CT file or DICOM folder) and
``label`` (a voxel emphysema label map on the image's grid: 0 outside lung, 1 normal, 2 centrilobular,
3 paraseptal, 4 panlobular), as :func:`~drasclr_ext.data.phantom.write_phantom_cohort` writes.

- :func:`labelled_subjects` reads one section, keeping a seeded ``label_fraction`` of it (nested: the 10 % subset
  lies inside the 25 % one).
- :class:`LoadLabelMapd` reads the label map and checks it lies on the image's grid.
- :class:`PreprocessedSubjects` runs the bundle's preprocessing once per subject and keeps the results (for
  validation and evaluation); a subject that fails is logged, listed in ``failures``, and left out.
- :class:`LabelledWindowDataset` cuts each training subject's dense windows with their targets (the class
  fractions of the window's lung voxels) once, caches them on disk (resumable), and serves single windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from drasclr_ext.atlas import box_counts
from drasclr_ext.errors import DrasCLRError, InputImageError
from drasclr_ext.fileio import atomic_save_npy, atomic_write_json
from drasclr_ext.inference.dense import window_targets
from drasclr_ext.inference.runner import failure_row, write_failures
from drasclr_ext.transforms.io import subject_name
from drasclr_ext.transforms.patches import DenseWindows
from drasclr_ext.transforms.registration import _array_and_affine

__all__ = ["LabelledWindowDataset", "LoadLabelMapd", "PreprocessedSubjects", "labelled_subjects"]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
CACHE_VERSION = 1


def labelled_subjects(
    datalist: PathLike, section: str = "training", label_fraction: float = 1.0, seed: int = 0
) -> list[dict[str, str]]:
    """Entries ``{"image", "label", "subject"}`` (absolute paths) of one section of a labelled datalist.

    ``label_fraction`` keeps ``max(1, round(fraction * n))`` subjects, chosen by a permutation seeded by ``seed``;
    smaller fractions give subsets of larger ones. ``section="test"`` falls back to ``testing``.
    """
    path = Path(datalist)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DrasCLRError(f"cannot read the datalist {path} ({exc}); give a MONAI datalist JSON") from exc
    if section == "test" and "test" not in content:
        section = "testing"
    items = content.get(section) or []
    if not 0.0 < float(label_fraction) <= 1.0:
        raise DrasCLRError(f"label_fraction must be in (0, 1], got {label_fraction}")
    entries = []
    for item in items:
        if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
            raise DrasCLRError(f"datalist {path}, section {section!r}: entry {item!r} needs 'image' and 'label'")
        image, label = (
            Path(item[k]) if Path(item[k]).is_absolute() else path.parent / item[k] for k in ("image", "label")
        )
        entries.append({"image": str(image), "label": str(label), "subject": subject_name(image)})
    if not entries:
        return []
    keep = max(1, int(round(float(label_fraction) * len(entries))))
    order = np.random.default_rng(int(seed)).permutation(len(entries))
    return [entries[i] for i in sorted(order[:keep])]


class LoadLabelMapd(MapTransform):
    """Read label maps (NIfTI/NRRD/MHA) as uint8 (X, Y, Z) MetaTensors and check they lie on the grid of
    ``d[reference_key]`` (same shape, affine within ``atol`` mm)."""

    def __init__(
        self, keys: KeysCollection = "label", reference_key: str = "image", atol: float = 1e-3, allow_missing_keys=False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.atol = float(atol)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import LoadImage

        d = dict(data)
        _, ref_affine = _array_and_affine(d[self.reference_key], None)
        ref_shape = tuple(d[self.reference_key].shape[-3:])
        for key in self.key_iterator(d):
            source = d[key]
            try:
                label = LoadImage(image_only=True, dtype=np.uint8)(source)
            except Exception as exc:
                raise InputImageError(
                    f"cannot read the label map {source} ({exc}); give a NIfTI/NRRD/MHA file"
                ) from exc
            if tuple(label.shape[-3:]) != ref_shape or not np.allclose(
                label.affine.numpy(), ref_affine, atol=self.atol
            ):
                raise InputImageError(
                    f"the label map {source} (shape {tuple(label.shape)}) does not lie on the grid of its image "
                    f"(shape {ref_shape}): resample the labels onto the image (nearest neighbour) first"
                )
            values = np.unique(np.asarray(label))
            if values.max() > 4:
                raise InputImageError(
                    f"the label map {source} has values {values.tolist()}; emphysema labels are 0 outside lung, "
                    "1 normal, 2 centrilobular, 3 paraseptal, 4 panlobular"
                )
            d[key] = MetaTensor(torch.as_tensor(np.asarray(label), dtype=torch.uint8), affine=label.affine)
        return d


def _run_subjects(
    subjects: Sequence[Mapping[str, Any]], work: Callable[[Mapping[str, Any]], Any], desc: str, progress: bool
) -> tuple[list[Any], list[dict[str, str]]]:
    """``work(subject)`` for every subject; our errors (and unexpected ones) are logged and collected, never raised."""
    results, failures = [], []
    for subject in tqdm(subjects, desc=desc, unit="subject", disable=not progress):
        try:
            results.append(work(subject))
        except Exception as exc:  # one bad subject never stops the cohort
            failures.append(failure_row(str(subject.get("subject", "")), subject.get("image", ""), exc))
    return results, failures


class PreprocessedSubjects(Dataset):
    """Subjects after the bundle's preprocessing (run once, kept in memory), for validation and evaluation.

    Args:
        subjects: entries ``{"image", "label", "subject"}`` (see :func:`labelled_subjects`).
        preprocessing: dict -> dict callable (reading, label map, lung mask, registration).
        failures_file: where to list the subjects that failed (``failures.csv``), if anywhere.
        progress: show a progress bar.
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any]],
        preprocessing: Callable[[dict], dict],
        failures_file: Optional[PathLike] = None,
        progress: bool = True,
    ) -> None:
        self.items, self.failures = _run_subjects(subjects, lambda s: preprocessing(dict(s)), "preprocessing", progress)
        if failures_file is not None and self.failures:
            write_failures(failures_file, self.failures)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _cache_key(subject: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Identifies a subject's cached windows: its files (path, size, mtime) and the window settings."""
    facts: dict[str, Any] = {"version": CACHE_VERSION, **settings}
    for key in ("image", "label"):
        p = Path(subject[key])
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        facts[key] = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


class LabelledWindowDataset(Dataset):
    """Dense training windows of labelled subjects, one window per item.

    Each subject is preprocessed once (``preprocessing``: reading, label map, lung mask, registration), cut into
    windows with :class:`~drasclr_ext.transforms.patches.DenseWindows` and given its targets (the class fractions of
    the lung voxels of the label map in each window); windows whose lung share is below ``min_lung_fraction`` are
    dropped. The windows (float16), locations and targets are written to ``cache_dir/<subject>_<key>/`` and reused
    by later runs (memory-mapped). Items: ``{"image": (1, W, W, W), "location": (3,), "label": (C,)}``.

    Args:
        subjects: entries ``{"image", "label", "subject"}`` (see :func:`labelled_subjects`).
        preprocessing: dict -> dict callable producing ``image``, ``label``, ``lung_mask`` and ``registration``.
        cache_dir: where the windows are cached.
        atlas: the registration's atlas (name or :class:`~drasclr_ext.atlas.Atlas`).
        stride: window stride in mm (32: windows side by side).
        window: window edge in mm.
        min_lung_fraction: smallest share of lung voxels in a kept window.
        transform: optional callable applied to each item dict.
        progress: show a progress bar.
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any]],
        preprocessing: Callable[[dict], dict],
        cache_dir: PathLike,
        atlas: Any = "default",
        stride: int = 32,
        window: int = 32,
        min_lung_fraction: float = 0.1,
        transform: Optional[Callable[[dict], dict]] = None,
        progress: bool = True,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.preprocessing = preprocessing
        self.windows = DenseWindows(atlas, window=window, stride=stride)
        self.min_lung_fraction = float(min_lung_fraction)
        self.transform = transform
        self.settings = {
            "atlas": getattr(self.windows.atlas, "name", str(atlas)),
            "stride": int(stride),
            "window": int(window),
            "min_lung_fraction": self.min_lung_fraction,
        }
        parts, self.failures = _run_subjects(subjects, self._subject_windows, "training windows", progress)
        if self.failures:
            write_failures(self.cache_dir / "failures.csv", self.failures)
        if not parts:
            raise DrasCLRError(
                f"none of the {len(subjects)} training subjects gave windows (see {self.cache_dir / 'failures.csv'}); "
                "check the datalist's image and label paths"
            )
        self.subjects = [p["subject"] for p in parts]
        self._windows = [p["windows"] for p in parts]
        self.locations = np.concatenate([p["locations"] for p in parts]).astype(np.float32)
        self.targets = np.concatenate([p["targets"] for p in parts]).astype(np.float32)
        self.subject_index = np.concatenate([np.full(len(p["targets"]), i) for i, p in enumerate(parts)])
        self.row = np.concatenate([np.arange(len(p["targets"])) for p in parts])

    def _subject_windows(self, subject: Mapping[str, Any]) -> dict[str, Any]:
        folder = self.cache_dir / f"{subject['subject']}_{_cache_key(subject, self.settings)}"
        if not (folder / "done.json").is_file():
            d = self.preprocessing(dict(subject))
            windows = self.windows(d["image"], d["lung_mask"], d["registration"])
            label, affine = _array_and_affine(d["label"], None)
            targets = window_targets(label, affine, windows)
            w = windows.window
            lung_share = box_counts(windows.lung > 0, windows.origins, w) / float(w**3)
            keep = np.flatnonzero((lung_share >= self.min_lung_fraction) & (targets.sum(1) > 0))
            atomic_save_npy(folder / "windows.npy", windows.windows(keep).astype(np.float16))
            atomic_save_npy(folder / "locations.npy", windows.locations[keep])
            atomic_save_npy(folder / "targets.npy", targets[keep])
            atomic_write_json(folder / "done.json", {"subject": subject["subject"], "windows": int(len(keep))})
        return {
            "subject": subject["subject"],
            "windows": np.load(folder / "windows.npy", mmap_mode="r"),
            "locations": np.load(folder / "locations.npy"),
            "targets": np.load(folder / "targets.npy"),
        }

    def class_balance(self) -> dict[str, float]:
        """Mean target of each class over all windows (the share of each class among the lung voxels seen)."""
        from drasclr_ext.networks.heads import SUBTYPE_CLASSES

        mean = self.targets.mean(0) if len(self.targets) else np.zeros(len(SUBTYPE_CLASSES))
        return {c: float(v) for c, v in zip(SUBTYPE_CLASSES, mean)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, r = int(self.subject_index[index]), int(self.row[index])
        item = {
            "image": torch.from_numpy(np.asarray(self._windows[s][r], dtype=np.float32))[None],
            "location": torch.from_numpy(self.locations[index]),
            "label": torch.from_numpy(self.targets[index]),
        }
        return self.transform(item) if self.transform is not None else item
