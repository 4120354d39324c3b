"""Threads that fit the machine: processes x torch threads within the usable cores, with overrides
(``drasclr_ext.parallel.threads_per_process`` / ``set_threads``) and their wiring in the cohort commands."""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.parallel import set_threads, threads_per_process, usable_cores
from tests.bundle_utils import config


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "cores, workers, env, threads, expected",
    [
        (2, 1, {}, None, 2),  # one process takes every core
        (2, 2, {}, None, 1),  # drasclr preprocess --workers 2
        (2, 1, {"LOCAL_WORLD_SIZE": "2"}, None, 1),  # torchrun --nproc_per_node 2
        (16, 2, {"LOCAL_WORLD_SIZE": "4"}, None, 2),  # 4 torchrun processes x 2 workers on 16 cores
        (16, 3, {}, None, 5),  # rounded down: 3 x 5 <= 16
        (2, 4, {"LOCAL_WORLD_SIZE": "2"}, None, 1),  # more processes than cores: at least one thread
        (8, 1, {"OMP_NUM_THREADS": "3"}, None, 3),  # an explicit OpenMP setting is kept
        (8, 1, {"OMP_NUM_THREADS": "3", "DRASCLR_THREADS": "5"}, None, 5),  # ours wins over OpenMP's
        (8, 1, {"DRASCLR_THREADS": " 6 ", "LOCAL_WORLD_SIZE": "8"}, None, 6),  # an override is not divided
        (8, 2, {"DRASCLR_THREADS": "6", "OMP_NUM_THREADS": "2"}, 7, 7),  # the argument (--threads) wins
        (8, 2, {"OMP_NUM_THREADS": ""}, None, 4),  # empty variables are unset
    ],
)
def test_threads_per_process(cores, workers, env, threads, expected):
    assert threads_per_process(workers, threads, environ=env, cores=cores) == expected


@pytest.mark.parametrize(
    "workers, env, threads, message",
    [
        (1, {"DRASCLR_THREADS": "0"}, None, r"\$DRASCLR_THREADS must be a whole number >= 1, got '0'"),
        (1, {"OMP_NUM_THREADS": "two"}, None, r"\$OMP_NUM_THREADS must be .* got 'two'"),
        (1, {}, -1, "threads must be"),
        (0, {}, None, "workers must be"),
    ],
)
def test_bad_thread_settings_are_refused_with_the_source(workers, env, threads, message):
    with pytest.raises(DrasCLRError, match=message):
        threads_per_process(workers, threads, environ=env, cores=4)


def test_cores_come_from_the_affinity_not_the_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 3
    assert threads_per_process(1, environ={}) == 3
    assert threads_per_process(1, environ={"LOCAL_WORLD_SIZE": "2"}) == 1
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    assert usable_cores() == 64


def test_set_threads_sets_torch(monkeypatch, keep_torch_threads):
    monkeypatch.setenv("DRASCLR_THREADS", "1")
    assert set_threads(workers=1) == 1 and torch.get_num_threads() == 1
    assert set_threads(threads=2) == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("bundle", ["drasclr_emphysema_subtype", "drasclr_lung_ct_ssl"])
def test_bundle_inference_sets_threads_first(bundle, monkeypatch, keep_torch_threads):
    """``initialize`` starts with ``set_threads(@threads)``: ``--threads`` or the rule, before any work."""
    parser = ConfigParser()
    parser.read_config(config(bundle, "inference.json")[0])
    assert parser["threads"] is None
    assert "set_threads" in parser["initialize"][0]
    parser["threads"] = 1
    parser.parse()
    parser.get_parsed_content("initialize#0")
    assert torch.get_num_threads() == 1
    monkeypatch.setenv("DRASCLR_THREADS", "2")
    parser["threads"] = None
    parser.parse()
    parser.get_parsed_content("initialize#0")
    assert torch.get_num_threads() == 2
