"""Cohort commands under ``torchrun``: which share of the scans this process takes, and gathering the shares.

``torchrun`` (on one node or several) sets ``RANK`` and ``WORLD_SIZE``; a cohort command gives each process every
``WORLD_SIZE``-th scan from its ``RANK`` on, and rank 0 gathers the results (over a gloo process group) to write the
cohort's files once.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TypeVar

import torch.distributed as dist

__all__ = ["distributed_rank", "gather_to_all", "process_group", "share"]

T = TypeVar("T")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process: from an initialised ``torch.distributed`` group, else from the
    ``RANK`` / ``WORLD_SIZE`` variables that ``torchrun`` sets; (0, 1) for a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
