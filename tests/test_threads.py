"""Threads that fit the machine: processes x torch threads within the usable cores, with overrides
(``drasclr_ext.parallel.threads_per_process`` / ``set_threads``) and their wiring in the cohort commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from drasclr_ext import parallel
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.parallel import idle_cores, set_threads, threads_per_process, usable_cores
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


@pytest.mark.parametrize(
    "cores, workers, idle, expected",
    [
        (2, 1, 2.0, 2),  # an idle machine: every core
        (2, 1, 1.0, 1),  # one other busy process on 2 cores: 1 thread, not 2 that stall each other
        (2, 1, 1.6, 2),  # a half-busy core still counts as free
        (2, 1, 0.0, 1),  # every core busy: still one thread
        (16, 2, 8.3, 4),  # 8 idle cores for 2 workers
        (16, 2, 16.0, 8),  # idle cores never raise the fair share
        (2, 1, None, 2),  # unknown load: the fair share
    ],
)
def test_threads_leave_the_cores_that_others_keep_busy(cores, workers, idle, expected):
    assert threads_per_process(workers, environ={}, cores=cores, idle=idle) == expected


def test_a_busy_process_is_seen():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = idle_cores(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and busy <= usable_cores() - 0.5


def test_our_own_cpu_time_is_not_counted_as_load(monkeypatch):
    ticks = iter([(0, 0, 2), (150, 200, 2)])  # 2 CPUs, 1 s: 1.5 CPU-seconds busy
    own = iter([0.0, 1.0])  # of which 1 CPU-second was this process
    monkeypatch.setattr(parallel, "_cpu_jiffies", lambda cpus: next(ticks))
    monkeypatch.setattr(parallel.time, "process_time", lambda: next(own))
    monkeypatch.setattr(parallel.time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    assert idle_cores() == pytest.approx(1.5)


def test_cores_come_from_the_affinity_not_the_cpu_count(monkeypatch):
    monkeypatch.setattr(parallel, "idle_cores", lambda: None)  # the load of this machine is not under test
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
