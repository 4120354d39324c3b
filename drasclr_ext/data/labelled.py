"""Labelled subjects for fine-tuning and evaluating the dense emphysema bundle.

A labelled datalist is a MONAI datalist JSON whose entries hold ``image`` (a CT file or DICOM folder) and
``label`` (a voxel emphysema label map on the image's grid: 0 outside lung, 1 normal, 2 centrilobular,
3 paraseptal, 4 panlobular), as :func:`~drasclr_ext.data.phantom.write_phantom_cohort` writes.

- :func:`labelled_subjects` reads one section, keeping a seeded ``label_fraction`` of it (nested: the 10 % subset
  lies inside the 25 % one).
- :class:`~drasclr_ext.transforms.labels.LoadLabelMapd` reads the label map and checks it lies on the image's grid.
- :class:`PreprocessedSubjects` runs the bundle's preprocessing once per subject and keeps the results (for
  validation and evaluation); a subject that fails is logged, listed in ``failures``, and left out.
- :class:`LabelledGridDataset` resamples each training subject and its labels onto the 1 mm atlas grid once,
  caches them on disk (resumable), and serves them to the random class-balanced crops of ``train.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from monai.data import MetaTensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from drasclr_ext.atlas import load_atlas
from drasclr_ext.errors import DrasCLRError, InputImageError
from drasclr_ext.fileio import atomic_save_npy, atomic_write_json
from drasclr_ext.geometry import array_and_affine, resample_to_grid
from drasclr_ext.networks.segmentation import SUBTYPE_CLASSES
from drasclr_ext.subjects import failure_row, subject_name, write_failures
from drasclr_ext.transforms.atlas_grid import atlas_grid

__all__ = [
    "LabelledGridDataset",
    "PreprocessedSubjects",
    "labelled_grid",
    "labelled_subjects",
    "load_grid",
    "save_grid",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
CACHE_VERSION = 2


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
        data: entries ``{"image", "label", "subject"}`` (see :func:`labelled_subjects`).
        preprocessing: dict -> dict callable (reading, label map, lung mask, registration).
        failures_file: where to list the subjects that failed (``failures.csv``), if anywhere.
        progress: show a progress bar.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        preprocessing: Callable[[dict], dict],
        failures_file: Optional[PathLike] = None,
        progress: bool = True,
    ) -> None:
        self.items, self.failures = _run_subjects(data, lambda s: preprocessing(dict(s)), "preprocessing", progress)
        if failures_file is not None and self.failures:
            write_failures(failures_file, self.failures)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _cache_key(subject: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Identifies a subject's cached grid: its files (path, size, mtime) and the grid settings."""
    facts: dict[str, Any] = {"version": CACHE_VERSION, **settings}
    for key in ("image", "label"):
        p = Path(subject[key])
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        facts[key] = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def labelled_grid(data: Mapping[str, Any], atlas: Any = "default", margin: int = 4, min_size: int = 64) -> dict:
    """A preprocessed labelled subject on its 1 mm atlas grid: ``image`` (1, X, Y, Z) windowed CT and ``label``
    (1, X, Y, Z) uint8 emphysema labels (nearest neighbour; 0 outside the grid's lung), both MetaTensors with the
    grid's affine, plus ``world_to_atlas`` and ``location_scale`` for the location channels."""
    grid = atlas_grid(data["image"], data["lung_mask"], data["registration"], atlas, margin, min_size=min_size)
    label, affine = array_and_affine(data["label"], what="label")
    grid_label = resample_to_grid(np.asarray(label, np.uint8), affine, grid.affine, grid.shape)
    grid_label[grid.lung == 0] = 0
    return {
        "image": MetaTensor(torch.from_numpy(grid.image[None]), affine=torch.as_tensor(grid.affine)),
        "label": MetaTensor(torch.from_numpy(grid_label[None]), affine=torch.as_tensor(grid.affine)),
        "world_to_atlas": grid.world_to_atlas,
        "location_scale": grid.location_scale,
    }


def save_grid(folder: PathLike, grid: Mapping[str, Any], info: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a :func:`labelled_grid` result to ``folder`` (``image.npy`` float16, ``label.npy``, ``grid.json``), each
    file atomically; ``done.json`` (with ``info``) is written last and marks the grid complete."""
    folder = Path(folder)
    atomic_save_npy(folder / "image.npy", np.asarray(grid["image"])[0].astype(np.float16))
    atomic_save_npy(folder / "label.npy", np.asarray(grid["label"])[0].astype(np.uint8))
    facts = {k: np.asarray(grid[k]).tolist() for k in ("world_to_atlas", "location_scale")}
    facts["affine"] = np.asarray(grid["image"].affine).tolist()
    atomic_write_json(folder / "grid.json", facts)
    atomic_write_json(folder / "done.json", {**dict(info or {}), "shape": list(grid["image"].shape)})
    return folder


def load_grid(folder: PathLike) -> dict[str, Any]:
    """A grid written by :func:`save_grid`: ``image`` (float16) and ``label`` (uint8) (1, X, Y, Z) MetaTensors with
    the grid's affine, ``world_to_atlas`` and ``location_scale``."""
    folder = Path(folder)
    facts = json.loads((folder / "grid.json").read_text())
    affine = torch.as_tensor(facts["affine"], dtype=torch.float64)
    return {
        "image": MetaTensor(torch.from_numpy(np.load(folder / "image.npy"))[None], affine=affine),
        "label": MetaTensor(torch.from_numpy(np.load(folder / "label.npy"))[None], affine=affine),
        "world_to_atlas": np.asarray(facts["world_to_atlas"]),
        "location_scale": np.asarray(facts["location_scale"]),
    }


class LabelledGridDataset(Dataset):
    """Training subjects on their 1 mm atlas grids, for random windows (MONAI's ``RandCropByLabelClassesd``).

    Each subject is preprocessed once (``preprocessing``: reading, label map, lung mask, registration) and
    resampled with :func:`labelled_grid`; the grid (windowed CT as float16, labels) is written to
    ``cache_dir/<subject>_<key>/`` and reused by later runs. The subjects stay in memory with the voxel indices of
    each class (``label_cls_indices``, at most ``max_samples_per_class`` per class, MONAI's ``ClassesToIndicesd``),
    so class-balanced crops cost no scan of the volume. Item ``i`` is subject ``i % n`` through ``transform`` (the
    random crops and augmentation of ``train.json``); the length is ``n * repeats``.

    Args:
        data: entries ``{"image", "label", "subject"}`` (see :func:`labelled_subjects`).
        preprocessing: dict -> dict callable producing ``image``, ``label``, ``lung_mask`` and ``registration``.
        cache_dir: where the grids are cached.
        atlas: the registration's atlas (name or :class:`~drasclr_ext.atlas.Atlas`).
        window: the training window edge (grids are at least this large).
        transform: callable applied to each subject dict (returns a dict or a list of crops).
        repeats: items per subject and epoch.
        max_samples_per_class: voxel indices kept per class for sampling.
        progress: show a progress bar.
        cache_settings: further settings of ``preprocessing`` that change the grids (e.g. the noise
            harmonisation); they are part of the cache key, so changing them rebuilds the grids.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        preprocessing: Callable[[dict], dict],
        cache_dir: PathLike,
        atlas: Any = "default",
        window: int = 64,
        transform: Optional[Callable[[dict], Any]] = None,
        repeats: int = 1,
        max_samples_per_class: int = 100_000,
        progress: bool = True,
        cache_settings: Optional[Mapping[str, Any]] = None,
    ) -> None:
        from monai.transforms import ClassesToIndicesd

        self.cache_dir = Path(cache_dir)
        self.preprocessing = preprocessing
        self.atlas = load_atlas(atlas) if isinstance(atlas, str) else atlas
        self.window = int(window)
        self.transform = transform
        self.repeats = max(1, int(repeats))
        self.settings = {
            "atlas": getattr(self.atlas, "name", str(atlas)),
            "window": self.window,
            **{str(k): v for k, v in (cache_settings or {}).items()},
        }
        self._indices = ClassesToIndicesd("label", num_classes=5, max_samples_per_class=int(max_samples_per_class))
        self.items, self.failures = _run_subjects(data, self._subject_grid, "training grids", progress)
        if self.failures:
            write_failures(self.cache_dir / "failures.csv", self.failures)
        if not self.items:
            raise DrasCLRError(
                f"none of the {len(data)} training subjects could be prepared (see "
                f"{self.cache_dir / 'failures.csv'}); check the datalist's image and label paths"
            )
        self.subjects = [item["subject"] for item in self.items]

    def _subject_grid(self, subject: Mapping[str, Any]) -> dict[str, Any]:
        folder = self.cache_dir / f"{subject['subject']}_{_cache_key(subject, self.settings)}"
        if not (folder / "done.json").is_file():
            grid = labelled_grid(self.preprocessing(dict(subject)), self.atlas, min_size=self.window)
            save_grid(folder, grid, {"subject": subject["subject"]})
        item = load_grid(folder)
        if not torch.any(item["label"] > 0):
            raise InputImageError(f"{subject['label']}: no labelled lung voxel on the atlas grid")
        item["subject"] = subject["subject"]
        return self._indices(item)

    def class_balance(self) -> dict[str, float]:
        """Share of each class among the lung voxels of all training grids."""
        counts = np.zeros(len(SUBTYPE_CLASSES))
        for item in self.items:
            counts += np.bincount(item["label"].numpy().ravel(), minlength=5)[1:5]
        return {c: float(v) for c, v in zip(SUBTYPE_CLASSES, counts / max(counts.sum(), 1))}

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def __getitem__(self, index: int) -> Any:
        item = dict(self.items[index % len(self.items)])
        item["image"] = item["image"].float()  # float16 in memory, float32 for the transforms
        return self.transform(item) if self.transform is not None else item
