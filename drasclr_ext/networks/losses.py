"""Losses of the dense emphysema model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn

__all__ = ["LungDiceCELoss"]


class LungDiceCELoss(nn.Module):
    """Dice + cross-entropy over the lung voxels only (MONAI's ``MaskedDiceLoss`` and ``F.cross_entropy`` with an
    ignored index).

    ``loss(logits, labels)``: logits (B, C, ...) for classes 1..C (normal, CLE, PSE, PLE); labels (B, 1, ...) with
    0 outside the lung (ignored) and 1..C inside. The Dice is computed over the whole batch per class (``batch``),
    so a rare subtype present in a single window still counts fully.

    Args:
        lambda_dice, lambda_ce: weights of the two terms.
        batch: Dice over the batch (True) or per window.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, batch: bool = True) -> None:
        super().__init__()
        self.dice = MaskedDiceLoss(softmax=True, batch=batch)
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = torch.as_tensor(labels).long()[:, 0] - 1  # -1 outside the lung
        inside = target >= 0
        if not bool(inside.any()):
            return logits.sum() * 0.0
        onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        dice = self.dice(logits, onehot, mask=inside[:, None].to(logits.dtype))
        ce = F.cross_entropy(logits.float(), target, ignore_index=-1)
        return self.lambda_dice * dice + self.lambda_ce * ce
