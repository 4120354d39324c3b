"""Cohort commands under ``torchrun``: which share of the scans this process takes, gathering the shares, and how
many threads each process uses.

``torchrun`` (on one node or several) sets ``RANK`` and ``WORLD_SIZE``; a cohort command gives each process every
``WORLD_SIZE``-th scan from its ``RANK`` on, and rank 0 gathers the results (over a gloo process group) to write the
cohort's files once. :func:`set_threads` keeps processes x torch threads within the cores a process may use.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import LOCK_FILE, OutputLock, clean_stale_temporaries, prepare_output_dir

__all__ = [
    "THREADS_ENV",
    "distributed_rank",
    "gather_to_all",
    "idle_cores",
    "on_rank0",
    "process_group",
    "run_shares",
    "set_threads",
    "share",
    "threads_per_process",
    "usable_cores",
]

THREADS_ENV = "DRASCLR_THREADS"
logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process: from an initialised ``torch.distributed`` group, else from the
    ``RANK`` / ``WORLD_SIZE`` variables that ``torchrun`` sets; (0, 1) for a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def on_rank0(items: Sequence[T]) -> list[T]:
    """``items`` on rank 0 (or without ``torchrun``), nothing on the other ranks: work that one process does."""
    return list(items) if distributed_rank()[0] == 0 else []


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share of ``items``: every ``world``-th from ``rank`` on."""
    return list(items[rank::world])


@contextmanager
def process_group() -> Iterator[None]:
    """A gloo process group from torchrun's environment for the block (an existing one is used and kept)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def gather_to_all(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def run_shares(
    output_dir: Union[str, os.PathLike], work: Sequence[T], process: Callable[[list[T], bool], R]
) -> tuple[R, Optional[list[R]]]:
    """Run ``process(share, alone)`` on this process's share of ``work`` while holding ``output_dir``'s lock.

    A plain run does all the work under :class:`~drasclr_ext.fileio.OutputLock` (``alone`` True: it may write the
    cohort's files as it goes). Under ``torchrun`` each rank takes its :func:`share` under a lock of its own, rank 0
    having first cleaned stale temporary files, and the results are gathered. Returns this process's result and,
    on the process that writes the cohort's files (the plain run, or rank 0), every rank's results in rank order;
    ``None`` on the other ranks.
    """
    rank, world = distributed_rank()
    if world == 1:
        with OutputLock(output_dir):
            mine = process(list(work), True)
        return mine, [mine]
    with process_group():
        prepare_output_dir(Path(output_dir))
        if rank == 0:
            clean_stale_temporaries(output_dir)
        dist.barrier()
        with OutputLock(output_dir, name=f"{LOCK_FILE}.rank{rank}", clean=False):
            mine = process(share(work, rank, world), False)
        parts = gather_to_all(mine)
    return mine, parts if rank == 0 else None


# ---------------------------------------------------------------------------------------------------- threads


def usable_cores() -> int:
    """The number of CPU cores this process may run on: its affinity (``taskset``, cgroup cpusets), else all CPUs."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on macOS and Windows
        return os.cpu_count() or 1


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int, int]:
    """(busy, total) clock ticks so far of those of the CPUs ``cpus`` that ``/proc/stat`` lists, and how many."""
    busy = total = count = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
                count += 1
    return busy, total, count


def idle_cores(interval: float = 0.25) -> Optional[float]:
    """How many of this process's usable cores other processes left idle over the next ``interval`` seconds (this
    process's own CPU time not counted as busy); None where ``/proc/stat`` cannot tell (not Linux)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        busy0, total0, count = _cpu_jiffies(cpus)
        own0 = time.process_time()
        time.sleep(interval)
        busy1, total1, _ = _cpu_jiffies(cpus)
        own1 = time.process_time()
    except (OSError, ValueError):
        return None
    if count == 0 or total1 <= total0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    wall = (total1 - total0) / hz / count  # seconds that passed, per CPU
    others = max(0.0, (busy1 - busy0) / hz - (own1 - own0)) / wall
    return max(0.0, count - others)


def _positive_int(value: Any, source: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise DrasCLRError(f"{source} must be a whole number >= 1, got {value!r}")
    return number


def threads_per_process(
    workers: int = 1,
    threads: Optional[int] = None,
    environ: Optional[Mapping[str, str]] = None,
    cores: Optional[int] = None,
    idle: Optional[float] = None,
) -> int:
    """The torch intra-op threads for one process of a cohort command.

    The first that is set: ``threads``; ``$DRASCLR_THREADS``; ``$OMP_NUM_THREADS``; else the usable cores divided
    by the processes that share them (``workers`` per torchrun process times torchrun's ``LOCAL_WORLD_SIZE``),
    at least 1, so that processes x threads never exceed the cores; and no more than the cores that other
    processes leave idle allow (on a 2-core machine with one other busy process, 1 thread: OpenMP threads that
    wait for a busy core stall each other, measured 2-3x slower than 1 thread in docs/BENCHMARKS.md).

    Args:
        workers: worker processes that this process starts (each runs scans), 1 when it runs them itself.
        threads: an explicit number of threads (``--threads``), None for the rule.
        environ: the environment (default ``os.environ``).
        cores: the usable cores (default :func:`usable_cores`).
        idle: the cores other processes leave idle (default: measured by :func:`idle_cores` when ``cores`` is
            not given; not limited when unknown).

    Raises:
        DrasCLRError: an override or ``workers`` that is not a whole number >= 1.
    """
    env = os.environ if environ is None else environ
    if threads is not None:
        return _positive_int(threads, "threads")
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if env.get(name, "").strip():
            return _positive_int(env[name], f"${name}")
    processes = _positive_int(workers, "workers") * _positive_int(env.get("LOCAL_WORLD_SIZE", "1"), "LOCAL_WORLD_SIZE")
    if idle is None and cores is None:
        idle = idle_cores()
    fair = (usable_cores() if cores is None else cores) // processes
    if idle is not None:
        fair = min(fair, int(idle + 0.5) // processes)
    return max(1, fair)


def set_threads(workers: int = 1, threads: Optional[int] = None) -> int:
    """``torch.set_num_threads`` to :func:`threads_per_process` (``workers``, ``threads``); returns the number."""
    number = threads_per_process(workers, threads)
    torch.set_num_threads(number)
    logger.info("torch threads per process: %d (%d usable cores)", number, usable_cores())
    return number
