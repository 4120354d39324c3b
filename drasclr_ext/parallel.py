"""Cohort commands under ``torchrun``: which share of the scans this process takes, gathering the shares, and how
many threads each process uses.

``torchrun`` (on one node or several) sets ``RANK`` and ``WORLD_SIZE``; a cohort command gives each process every
``WORLD_SIZE``-th scan from its ``RANK`` on, and rank 0 gathers the results (over a gloo process group) to write the
cohort's files once. :func:`set_threads` keeps processes x torch threads within the cores a process may use.
"""

from __future__ import annotations

import logging
import os
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
) -> int:
    """The torch intra-op threads for one process of a cohort command.

    The first that is set: ``threads``; ``$DRASCLR_THREADS``; ``$OMP_NUM_THREADS``; else the usable cores divided
    by the processes that share them (``workers`` per torchrun process times torchrun's ``LOCAL_WORLD_SIZE``),
    at least 1, so that processes x threads never exceed the cores.

    Args:
        workers: worker processes that this process starts (each runs scans), 1 when it runs them itself.
        threads: an explicit number of threads (``--threads``), None for the rule.
        environ: the environment (default ``os.environ``).
        cores: the usable cores (default :func:`usable_cores`).

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
    return max(1, (usable_cores() if cores is None else cores) // processes)


def set_threads(workers: int = 1, threads: Optional[int] = None) -> int:
    """``torch.set_num_threads`` to :func:`threads_per_process` (``workers``, ``threads``); returns the number."""
    number = threads_per_process(workers, threads)
    torch.set_num_threads(number)
    logger.info("torch threads per process: %d (%d usable cores)", number, usable_cores())
    return number
