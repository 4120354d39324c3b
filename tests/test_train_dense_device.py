"""The GPU-machine training script of the dense model: seeds, grids built without ITK, the crop stream, shards."""

from __future__ import annotations

import importlib.util
import json
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from drasclr_ext.data.labelled import load_grid
from drasclr_ext.data.phantom import draw_subject

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_dense_device", REPO / "scripts" / "train_dense_device.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_seeds_cap_healthy_and_pure_centrilobular_subjects(script):
    seeds = script.training_seeds(1000, 40)
    assert len(seeds) == 40 and seeds == sorted(set(seeds)) and seeds == script.training_seeds(1000, 40)
    subjects = [draw_subject(s, resolution_scale=1.0) for s in seeds]
    healthy = sum(s.emphysema_fraction == 0 for s in subjects)
    cle = sum(s.subtype_mix == "centrilobular" for s in subjects)
    assert healthy <= 0.15 * 40 and cle <= 0.3 * 40
    assert {s.subtype_mix for s in subjects} >= set(script.MIXES)


def test_validation_seeds_hold_every_subtype_mix(script):
    seeds = script.validation_seeds(1900, 2)
    mixes = [draw_subject(s, resolution_scale=1.0).subtype_mix for s in seeds]
    assert len(seeds) == 10 and all(mixes.count(m) == 2 for m in script.MIXES)
    assert not set(seeds) & set(script.training_seeds(1000, 400)), "validation must stay out of training"


def test_lr_factor_warms_up_then_decays_to_zero(script):
    assert script.lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert script.lr_factor(9, 0.0, 10) == pytest.approx(1.0)
    assert script.lr_factor(500, 0.5, 10) == pytest.approx(0.5)
    assert script.lr_factor(500, 1.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_shards_stay_under_the_limit_and_merge_back(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "SHARD_BYTES", 4000)
    state = {f"layer{i}.weight": torch.randn(20, 10) for i in range(6)}  # 800 bytes each
    names = script.save_shards(state, tmp_path, "model_best")
    payload = [sum(t.numel() * 4 for t in torch.load(tmp_path / n, weights_only=True).values()) for n in names]
    assert len(names) == 2 and max(payload) <= 4000
    merged = script.merge_shards(tmp_path)
    assert list(merged) == list(state) and all(torch.equal(merged[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError):
        script.merge_shards(tmp_path, "other")


def test_grid_built_without_itk_feeds_the_bundle_crops(script, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "itk", None)
    name = script.build_grid(5, str(tmp_path), 3.0, 64, deadline=float("inf"))
    assert name == "phantom_00005" and (tmp_path / name / "done.json").is_file()
    grid = load_grid(tmp_path / name)
    assert grid["image"].shape == grid["label"].shape and min(grid["image"].shape[1:]) >= 64
    assert int(grid["label"].max()) <= 4 and bool((grid["label"] > 0).any())
    assert script.build_grid(6, str(tmp_path), 3.0, 64, deadline=0.0) is None  # too late: skipped
    parts = script.bundle_parts(64, 2)
    crops = list(islice(iter(script.GridStream(tmp_path, {name}, parts["transform"], rescan_s=0.0)), 4))
    assert all(c["image"].shape == (4, 64, 64, 64) and c["label"].shape == (1, 64, 64, 64) for c in crops)
    assert all(set(np.unique(c["label"].numpy())) <= set(range(5)) for c in crops)


def test_every_nth_seed_gets_thick_slices_and_keeps_its_in_plane_spacing(script, tmp_path, monkeypatch):
    assert [script.thick_slices(s, 4, 5.0) for s in (8, 9, 12)] == [5.0, None, 5.0]
    assert script.thick_slices(8, 0, 5.0) is None
    monkeypatch.setitem(sys.modules, "itk", None)
    name = script.build_grid(8, str(tmp_path), 3.0, 64, deadline=float("inf"), slice_mm=5.0)
    spacing = json.loads((tmp_path / name / "done.json").read_text())["spacing"]
    drawn = draw_subject(8, resolution_scale=3.0).spacing
    assert spacing == pytest.approx([drawn[0], drawn[1], 5.0])
