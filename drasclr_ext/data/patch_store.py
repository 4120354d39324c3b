"""A location-grouped, memory-mapped store of anatomical patches for pretraining.

Layout of ``store_dir`` (built from the per-subject ``patches.npy`` of a preprocessed cohort):

- ``patches.npy``: (L, N, 32, 32, 32) float16, landmark-major, so all subjects' patches of one landmark are
  contiguous on disk (memory-mapped, never loaded whole);
- ``subjects.json``: the N subject names in store order;
- ``locations.npy`` (L, 3) float32 and ``neighbours.npy`` (L, k) int64.

Rebuilding after more subjects finished writes a new store beside the old one and swaps it in atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from drasclr_ext.errors import DrasCLRError

__all__ = ["LocationPatchDataset", "build_patch_store", "finished_subjects"]

PathLike = Union[str, os.PathLike]
STORE_FILES = ("patches.npy", "subjects.json", "locations.npy", "neighbours.npy")


def finished_subjects(out_dir: PathLike) -> list[str]:
    """Subjects of a preprocessed cohort folder that are complete (``meta.json`` and ``patches.npy``), sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in out_dir.iterdir()
        if p.is_dir() and (p / "meta.json").is_file() and (p / "patches.npy").is_file()
    )


def build_patch_store(
    out_dir: PathLike, store_dir: Optional[PathLike] = None, subjects: Optional[Sequence[str]] = None
) -> Optional[Path]:
    """Build (or refresh) the store from ``out_dir/<subject>/patches.npy``; returns its folder, None if no subject.

    Skips the work when the existing store already holds exactly these subjects.
    """
    out_dir = Path(out_dir)
    store_dir = Path(store_dir) if store_dir is not None else out_dir / "store"
    subjects = list(subjects) if subjects is not None else finished_subjects(out_dir)
    if not subjects:
        return None
    existing = store_dir / "subjects.json"
    if existing.is_file() and all((store_dir / f).is_file() for f in STORE_FILES):
        with open(existing) as f:
            if json.load(f) == subjects:
                return store_dir
    first = out_dir / subjects[0]
    locations = np.load(first / "locations.npy")
    neighbours = np.load(first / "neighbours.npy")
    shape = np.load(first / "patches.npy", mmap_mode="r").shape  # (L, P, P, P)
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=store_dir.parent, prefix=f".{store_dir.name}."))
    try:
        patches = np.lib.format.open_memmap(
            tmp / "patches.npy", mode="w+", dtype=np.float16, shape=(shape[0], len(subjects), *shape[1:])
        )
        for j, name in enumerate(subjects):
            sub = np.load(out_dir / name / "patches.npy", mmap_mode="r")
            if sub.shape != shape or not np.array_equal(np.load(out_dir / name / "locations.npy"), locations):
                raise DrasCLRError(
                    f"subject {name} has patches {sub.shape} / locations unlike {subjects[0]} {shape}: the cohort "
                    "mixes atlases; preprocess all subjects with one atlas (or use separate output folders)"
                )
            patches[:, j] = sub
        patches.flush()
        del patches
        np.save(tmp / "locations.npy", locations.astype(np.float32))
        np.save(tmp / "neighbours.npy", neighbours.astype(np.int64))
        with open(tmp / "subjects.json", "w") as f:
            json.dump(subjects, f, indent=1)
        # swap: the old store (if any) is moved aside first, so a crash leaves either store intact
        old = None
        if store_dir.exists():
            old = Path(tempfile.mkdtemp(dir=store_dir.parent, prefix=f".{store_dir.name}.old."))
            os.replace(store_dir, old / store_dir.name)
        os.replace(tmp, store_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return store_dir


class LocationPatchDataset(Dataset):
    """(landmark, subject) pairs of a patch store, for DrasCLR pretraining.

    Item ``i`` is landmark ``i // N`` of subject ``i % N``: a dict with ``image`` (1, 32, 32, 32) float32,
    ``location`` (3,) float32, ``location_index`` and ``subject_index`` (int), and with ``neighbours=True``
    ``neighbour_images`` (k, 1, 32, 32, 32) and ``neighbour_locations`` (k, 3) of the same subject.

    Args:
        store_dir: folder written by :func:`build_patch_store`.
        neighbours: also return the k neighbouring landmarks' patches.
        transform: optional callable applied to the item dict (e.g. MONAI dictionary transforms).
    """

    def __init__(
        self, store_dir: PathLike, neighbours: bool = True, transform: Optional[Callable[[dict], Any]] = None
    ) -> None:
        self.store_dir = Path(store_dir)
        missing = [f for f in STORE_FILES if not (self.store_dir / f).is_file()]
        if missing:
            raise DrasCLRError(
                f"{self.store_dir} is not a patch store (missing {', '.join(missing)}); run `drasclr preprocess` "
                "on the cohort first"
            )
        with open(self.store_dir / "subjects.json") as f:
            self.subjects: list[str] = json.load(f)
        self.locations = np.load(self.store_dir / "locations.npy").astype(np.float32)
        self.neighbour_index = np.load(self.store_dir / "neighbours.npy").astype(np.int64)
        self.with_neighbours = bool(neighbours)
        self.transform = transform
        self._patches: Optional[np.ndarray] = None  # opened lazily: one memmap per DataLoader worker

    @property
    def patches(self) -> np.ndarray:
        if self._patches is None:
            self._patches = np.load(self.store_dir / "patches.npy", mmap_mode="r")
        return self._patches

    @property
    def num_locations(self) -> int:
        return int(len(self.locations))

    @property
    def num_subjects(self) -> int:
        return len(self.subjects)

    def __len__(self) -> int:
        return self.num_locations * self.num_subjects

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_patches"] = None
        return state

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        loc, subject = divmod(int(index), self.num_subjects)
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.asarray(self.patches[loc, subject], dtype=np.float32)[None]),
            "location": torch.from_numpy(self.locations[loc].copy()),
            "location_index": loc,
            "subject_index": subject,
        }
        if self.with_neighbours:
            nbr = self.neighbour_index[loc]
            images = np.stack([np.asarray(self.patches[n, subject], dtype=np.float32) for n in nbr])[:, None]
            item["neighbour_images"] = torch.from_numpy(images)
            item["neighbour_locations"] = torch.from_numpy(self.locations[nbr].copy())
        return self.transform(item) if self.transform is not None else item
