"""DrasCLR training module: MoCo v2 with per-location queues, local and neighbouring InfoNCE losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from drasclr_ext.networks.distributed import batch_shuffle, batch_unshuffle, concat_all_gather
from drasclr_ext.networks.encoder import DrasCLREncoder


def info_nce_logits(anchor: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float):
    """Logits (B, 1 + K) with the positive ``anchor . key`` at index 0 and ``anchor . negatives[b]`` after it.

    Args:
        anchor: (B, C) query embeddings (or sums of neighbour embeddings).
        key: (B, C) positive keys.
        negatives: (C, K, B) the queue of each sample's location.
        temperature: softmax temperature ``tau``.
    """
    positive = (anchor * key).sum(dim=1, keepdim=True)
    negative = torch.einsum("bc,ckb->bk", anchor, negatives)
    return torch.cat([positive, negative], dim=1) / temperature


def top1_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Share of samples whose positive (index 0) has the largest logit."""
    return (logits.argmax(dim=1) == 0).float().mean()


class DrasCLR(nn.Module):
    """MoCo v2 with one queue of keys per anatomical location, and DrasCLR's local and neighbour losses.

    A batch may mix locations: each sample is contrasted against its own location's queue and its key is
    enqueued there. Under ``torch.distributed`` keys are gathered from all ranks before enqueueing and the key
    encoder's BatchNorm sees a batch shuffled across ranks.

    Args:
        num_locations: number of anatomical landmarks ``L`` (one queue each).
        rep_dim: representation size of the encoder.
        moco_dim: embedding size of the contrastive space.
        num_experts: expert kernels per convolution.
        num_coordinates: 3D coordinates per location.
        mlp: MLP projection head.
        queue_size: keys per location ``K``.
        momentum: momentum ``m`` of the key encoder.
        temperature: softmax temperature ``tau``.
        beta: weight of the neighbour loss.
    """

    def __init__(
        self,
        num_locations: int = 581,
        rep_dim: int = 128,
        moco_dim: int = 128,
        num_experts: int = 8,
        num_coordinates: int = 1,
        mlp: bool = True,
        queue_size: int = 4096,
        momentum: float = 0.999,
        temperature: float = 0.2,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        self.beta = beta
        encoder_kwargs = {
            "rep_dim": rep_dim,
            "moco_dim": moco_dim,
            "num_experts": num_experts,
            "num_coordinates": num_coordinates,
            "mlp": mlp,
        }
        self.encoder_q = DrasCLREncoder(**encoder_kwargs)
        self.encoder_k = DrasCLREncoder(**encoder_kwargs)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for param in self.encoder_k.parameters():
            param.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(moco_dim, queue_size, num_locations), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(num_locations, dtype=torch.long))

    @property
    def queue_size(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Key encoder parameters <- m * key + (1 - m) * query; BatchNorm statistics are the key encoder's own."""
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, image: torch.Tensor, location: torch.Tensor) -> torch.Tensor:
        """Normalised keys of the key encoder, with BatchNorm shuffled across ranks."""
        (image, location), unshuffle = batch_shuffle(image, location)
        key = F.normalize(self.encoder_k(image, location)[0], dim=1)
        return batch_unshuffle(key, unshuffle)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, location_index: torch.Tensor) -> None:
        """Write ``keys`` (B, C) into the queues of their locations (all ranks' keys, rank order)."""
        keys = concat_all_gather(keys)
        location_index = concat_all_gather(location_index).long()
        order = torch.argsort(location_index, stable=True)
        index, keys = location_index[order], keys[order]
        locations, counts = torch.unique_consecutive(index, return_counts=True)
        group_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        group_size = torch.repeat_interleave(counts, counts)
        rank_in_group = torch.arange(index.numel(), device=index.device) - group_start
        keep = rank_in_group >= group_size - self.queue_size  # only the newest K keys of a location survive
        slot = (self.queue_ptr[index] + rank_in_group) % self.queue_size
        self.queue[:, slot[keep], index[keep]] = keys[keep].T.to(self.queue.dtype)
        self.queue_ptr[locations] = (self.queue_ptr[locations] + counts) % self.queue_size

    def forward(
        self,
        image_q: torch.Tensor,
        image_k: torch.Tensor,
        location: torch.Tensor,
        location_index: torch.Tensor,
        neighbour_images: torch.Tensor | None = None,
        neighbour_locations: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One contrastive step.

        Args:
            image_q: (B, 1, 32, 32, 32) first view of each patch.
            image_k: (B, 1, 32, 32, 32) second view.
            location: (B, 3) normalised atlas coordinates.
            location_index: (B,) landmark index of each patch (its queue).
            neighbour_images: (B, k, 1, 32, 32, 32) patches of the k neighbouring landmarks, or None.
            neighbour_locations: (B, k, 3) their locations.

        Returns:
            ``loss`` (local + beta * neighbour), ``loss_local``, ``loss_neighbour``, ``acc_local``,
            ``acc_neighbour`` and the logits ``logits_local`` / ``logits_neighbour`` (positive at index 0).
        """
        query = F.normalize(self.encoder_q(image_q, location)[0], dim=1)
        with torch.no_grad():
            self.momentum_update()
            key = self.encode_keys(image_k, location)
        negatives = self.queue[:, :, location_index].clone().detach()
        logits_local = info_nce_logits(query, key, negatives, self.temperature)
        target = torch.zeros(logits_local.shape[0], dtype=torch.long, device=logits_local.device)
        loss_local = F.cross_entropy(logits_local, target)
        out = {
            "loss_local": loss_local.detach(),
            "acc_local": top1_accuracy(logits_local),
            "logits_local": logits_local,
        }
        loss = loss_local
        if neighbour_images is not None and self.beta != 0:
            batch, k = neighbour_images.shape[:2]
            z_n = self.encoder_q(neighbour_images.flatten(0, 1), neighbour_locations.flatten(0, 1))[0]
            anchor = F.normalize(z_n, dim=1).view(batch, k, -1).sum(dim=1)
            logits_neighbour = info_nce_logits(anchor, key, negatives, self.temperature)
            loss_neighbour = F.cross_entropy(logits_neighbour, target)
            loss = loss + self.beta * loss_neighbour
            out.update(
                loss_neighbour=loss_neighbour.detach(),
                acc_neighbour=top1_accuracy(logits_neighbour),
                logits_neighbour=logits_neighbour,
            )
        self.enqueue(key, location_index)
        out["loss"] = loss
        return out
