"""Two CPU processes (gloo): keys gathered from all ranks, BatchNorm shuffled across ranks, queues in sync."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drasclr_ext.networks import DrasCLR
from drasclr_ext.networks.distributed import batch_shuffle, batch_unshuffle, concat_all_gather

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.arange(3, dtype=torch.float32)[:, None] + 10 * rank
    gathered = concat_all_gather(x)
    torch.manual_seed(7)  # the permutation is broadcast from rank 0 anyway
    (shuffled,), unshuffle = batch_shuffle(x)
    restored = batch_unshuffle(shuffled, unshuffle)

    torch.manual_seed(0)  # same initial weights on both ranks, as DDP would broadcast
    model = DrasCLR(num_locations=4, rep_dim=8, moco_dim=4, num_experts=2, queue_size=6)
    g = torch.Generator().manual_seed(rank)
    out = model(
        image_q=torch.rand(2, 1, 32, 32, 32, generator=g),
        image_k=torch.rand(2, 1, 32, 32, 32, generator=g),
        location=torch.rand(2, 3, generator=g),
        location_index=torch.tensor([rank, 3]),
    )
    torch.save(
        {
            "gathered": gathered,
            "shuffled": shuffled,
            "restored": restored,
            "x": x,
            "queue": model.queue,
            "queue_ptr": model.queue_ptr,
            "key_logit": out["logits_local"][:, 0],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_gather_shuffle_and_queues(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    everything = torch.cat([r0["x"], r1["x"]])
    # gather: all ranks' tensors in rank order, on every rank
    torch.testing.assert_close(r0["gathered"], everything)
    torch.testing.assert_close(r1["gathered"], everything)
    # shuffle: the two shares together are a permutation of all samples; unshuffle restores each rank's own
    torch.manual_seed(7)
    perm = torch.randperm(2 * WORLD + 2)  # what rank 0 drew and broadcast
    torch.testing.assert_close(torch.cat([r0["shuffled"], r1["shuffled"]]), everything[perm])
    assert not torch.equal(perm, torch.arange(6))
    torch.testing.assert_close(r0["restored"], r0["x"])
    torch.testing.assert_close(r1["restored"], r1["x"])
    # queues: identical on both ranks and hold the keys of both ranks
    torch.testing.assert_close(r0["queue"], r1["queue"])
    assert r0["queue_ptr"].tolist() == [1, 1, 0, 2]
    assert torch.equal(r0["queue_ptr"], r1["queue_ptr"])
