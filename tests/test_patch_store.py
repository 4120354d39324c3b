"""The location-grouped patch store and its pretraining dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drasclr_ext.data.patch_store import LocationPatchDataset, build_patch_store
from drasclr_ext.errors import DrasCLRError

L = 4
LOCATIONS = np.array([[-1, -1, -1], [0, -1, -1], [1, 0, 0], [1, 1, 1]], dtype=np.float32)
NEIGHBOURS = np.array([[1, 2], [0, 2], [1, 3], [2, 1]], dtype=np.int64)


def _subject(out, name: str, value: float) -> np.ndarray:
    folder = out / name
    folder.mkdir(parents=True)
    patches = (value + np.arange(L, dtype=np.float32)[:, None, None, None] / 10 + np.zeros((L, 32, 32, 32))).astype(
        np.float16
    )
    np.save(folder / "patches.npy", patches)
    np.save(folder / "locations.npy", LOCATIONS)
    np.save(folder / "neighbours.npy", NEIGHBOURS)
    (folder / "meta.json").write_text(json.dumps({"subject": name}))
    return patches


def test_store_is_location_grouped(tmp_path):
    a, b = _subject(tmp_path, "a", 0.0), _subject(tmp_path, "b", -0.5)
    store = build_patch_store(tmp_path)
    patches = np.load(store / "patches.npy", mmap_mode="r")
    assert patches.shape == (L, 2, 32, 32, 32) and patches.dtype == np.float16
    np.testing.assert_array_equal(patches[2, 1], b[2])
    np.testing.assert_array_equal(patches[3, 0], a[3])
    assert json.loads((store / "subjects.json").read_text()) == ["a", "b"]


def test_unfinished_subject_is_left_out_and_rebuild_adds_it(tmp_path):
    _subject(tmp_path, "a", 0.0)
    _subject(tmp_path, "b", 0.5)
    (tmp_path / "b" / "meta.json").unlink()
    assert np.load(build_patch_store(tmp_path) / "patches.npy", mmap_mode="r").shape[1] == 1
    (tmp_path / "b" / "meta.json").write_text("{}")
    _subject(tmp_path, "c", 0.25)
    store = build_patch_store(tmp_path)
    assert np.load(store / "patches.npy", mmap_mode="r").shape[1] == 3
    assert len(LocationPatchDataset(store)) == 3 * L


def test_dataset_item_with_neighbours_from_the_same_subject(tmp_path):
    _subject(tmp_path, "a", 0.0)
    b = _subject(tmp_path, "b", -0.5)
    dataset = LocationPatchDataset(build_patch_store(tmp_path), neighbours=True)
    item = dataset[2 * 2 + 1]  # landmark 2 of subject b
    assert item["location_index"] == 2 and item["subject_index"] == 1
    assert item["image"].shape == (1, 32, 32, 32) and item["image"].dtype.is_floating_point
    np.testing.assert_allclose(item["image"][0].numpy(), b[2].astype(np.float32))
    np.testing.assert_array_equal(item["location"].numpy(), LOCATIONS[2])
    assert item["neighbour_images"].shape == (2, 1, 32, 32, 32)
    np.testing.assert_allclose(item["neighbour_images"][1, 0].numpy(), b[3].astype(np.float32))
    np.testing.assert_array_equal(item["neighbour_locations"].numpy(), LOCATIONS[[1, 3]])


def test_dataset_on_a_missing_store_says_what_to_do(tmp_path):
    with pytest.raises(DrasCLRError, match="drasclr preprocess"):
        LocationPatchDataset(tmp_path)
