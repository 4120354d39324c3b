"""Prediction heads on the DrasCLR representation, and the emphysema subtype network of the dense bundle.

Window target (see :func:`window_class_fractions`): a 32^3 window is labelled with the *class distribution of its
lung voxels* (normal, centrilobular, paraseptal, panlobular fractions, summing to 1), and the head is trained with a
soft cross-entropy (:func:`soft_cross_entropy`). Its softmax is therefore an estimate of the subtype composition of
the lung around the window's centre; :mod:`drasclr_ext.inference.dense` blends those estimates into voxel maps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from drasclr_ext.atlas import box_counts
from drasclr_ext.networks.encoder import DrasCLREncoder

__all__ = [
    "SUBTYPE_CLASSES",
    "DrasCLRSubtypeNet",
    "SoftCrossEntropyLoss",
    "SubtypeHead",
    "soft_cross_entropy",
    "window_class_fractions",
]

# output channel c of the head is emphysema label c + 1 (0 is "outside the lung")
SUBTYPE_CLASSES = ("normal", "centrilobular", "paraseptal", "panlobular")


class SubtypeHead(nn.Module):
    """MLP from the encoder representation ``h`` (B, rep_dim) to class logits (B, num_classes).

    Args:
        rep_dim: size of ``h``.
        num_classes: output classes (4: normal, centrilobular, paraseptal, panlobular).
        hidden: hidden units; 0 makes the head a single linear layer.
        dropout: dropout before the last layer (training only).
    """

    def __init__(self, rep_dim: int = 128, num_classes: int = 4, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.rep_dim, self.num_classes, self.hidden = int(rep_dim), int(num_classes), int(hidden)
        if hidden > 0:
            self.layers = nn.Sequential(
                nn.Linear(rep_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(rep_dim, num_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class DrasCLRSubtypeNet(nn.Module):
    """DrasCLR encoder + :class:`SubtypeHead`: per-window emphysema subtype logits.

    ``forward(x, loc=None)``: ``x`` (B, 1, 32, 32, 32) windows in [-1, 1] with ``loc`` (B, 3) normalised atlas
    locations, or one packed tensor (B, 4, 32, 32, 32) whose channels 1..3 hold the location broadcast over the
    window (as :class:`~drasclr_ext.networks.DrasCLRFeatures`), so ``verify_net_in_out`` and ``ckpt_export`` work.
    Returns logits (B, num_classes).

    Args:
        rep_dim, moco_dim, num_experts, num_coordinates, mlp, in_channels: the :class:`DrasCLREncoder`'s.
        num_classes: output classes.
        hidden: hidden units of the head.
        dropout: dropout of the head.
        freeze_encoder: keep the encoder's weights and BatchNorm statistics fixed in training (linear evaluation).
    """

    def __init__(
        self,
        rep_dim: int = 128,
        moco_dim: int = 128,
        num_experts: int = 8,
        num_coordinates: int = 1,
        mlp: bool = True,
        in_channels: int = 1,
        num_classes: int = 4,
        hidden: int = 64,
        dropout: float = 0.1,
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = DrasCLREncoder(rep_dim, moco_dim, num_experts, num_coordinates, mlp, in_channels)
        self.head = SubtypeHead(rep_dim, num_classes, hidden, dropout)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> DrasCLRSubtypeNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen: BatchNorm keeps the pretrained statistics
        return self

    def represent(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder representation ``h`` (B, rep_dim) of windows (see ``forward`` for the inputs)."""
        if loc is None:
            x, loc = x[:, :1], x[:, 1:4].flatten(2).mean(-1)
        return self.encoder.represent(x, loc)

    def forward(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.represent(x, loc))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c log softmax(logits)_c``; ``target`` (B, C) rows sum to 1."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


class SoftCrossEntropyLoss(nn.Module):
    """:func:`soft_cross_entropy` as a loss module: ``loss(logits, target)`` with target rows summing to 1."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, target)


def window_class_fractions(
    labels: np.ndarray, origins: np.ndarray, window: int = 32, num_classes: int = 4
) -> np.ndarray:
    """(N, num_classes) float32 fractions of each emphysema label 1..num_classes among the lung voxels
    (label > 0) of each ``window``^3 box at ``origins`` (N, 3) of the (X, Y, Z) label map; rows of windows without
    lung voxels are all zero."""
    labels = np.asarray(labels)
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 3)
    counts = np.stack([box_counts(labels == c, origins, window) for c in range(1, num_classes + 1)], axis=1)
    total = counts.sum(axis=1, keepdims=True)
    return (counts / np.maximum(total, 1)).astype(np.float32)
