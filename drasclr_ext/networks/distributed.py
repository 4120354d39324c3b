"""Collectives for MoCo training: gathering keys from all ranks and shuffling BatchNorm across ranks.

Every function works in a single process too (no process group): then gathering returns the input and the
shuffle is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (rank order); equal shapes on every rank, no gradient."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Shuffle samples across all ranks (same permutation for every tensor), for shuffled BatchNorm.

    Returns this rank's share of the shuffled tensors and the index that undoes the shuffle
    (``None`` in a single process, where the tensors are returned unchanged).
    """
    if not is_distributed():
        return list(tensors), None
    local = tensors[0].shape[0]
    gathered = [concat_all_gather(t) for t in tensors]
    total = gathered[0].shape[0]
    perm = torch.randperm(total, device=gathered[0].device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    rank = dist.get_rank()
    mine = perm[rank * local : (rank + 1) * local]
    return [g[mine] for g in gathered], unshuffle


@torch.no_grad()
def batch_unshuffle(tensor: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`batch_shuffle` for an output computed on the shuffled share."""
    if unshuffle is None:
        return tensor
    local = tensor.shape[0]
    gathered = concat_all_gather(tensor)
    rank = dist.get_rank()
    return gathered[unshuffle[rank * local : (rank + 1) * local]]
