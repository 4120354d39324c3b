"""The voxel-level emphysema subtype network: the DrasCLR encoder with a U-Net decoder.

The encoder is :class:`~drasclr_ext.networks.encoder.DrasCLREncoder` itself (same layer names and shapes, so the
pretraining bundle's weights and official checkpoints load into ``network.encoder`` unchanged). The decoder climbs
back from the encoder's deepest output (``W / 32``) to the full window resolution ``W``, joining at each scale the
encoder feature map of that scale (skip connections from every encoder stage), and ends in per-voxel logits for
normal, centrilobular, paraseptal and panlobular lung.

At full resolution the last step is a 1x1x1 convolution of ``[upsampled half-resolution features, full-resolution
encoder features]``. It is computed as ``upsample(conv_a(half)) + conv_b(full)``, which is the same linear map
(a 1x1x1 convolution commutes with trilinear upsampling) but upsamples 4 class channels instead of the decoder's
features: the full-resolution work, most of the cost on a CPU, is about halved.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from torch import nn

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.networks.encoder import DrasCLREncoder

__all__ = ["SUBTYPE_CLASSES", "DrasCLRSegNet", "split_location"]

# output channel c is emphysema label c + 1 (label 0 is "outside the lung")
SUBTYPE_CLASSES = ("normal", "centrilobular", "paraseptal", "panlobular")
# channels of the encoder feature maps the decoder joins, from deep to shallow (W/16 ... W/2; W: 8)
_SKIP_CHANNELS = (128, 64, 32, 16)
_FULL_CHANNELS = 8


def split_location(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (B, 1, ...), location (B, 3)) of a packed input (B, 4, ...) whose channels 1..3 hold the normalised
    atlas location of each voxel: the window's location is their mean (the location at the window's centre)."""
    if x.ndim != 5 or x.shape[1] != 4:
        raise DrasCLRError(f"expected a (B, 4, W, W, W) window with 3 location channels, got shape {x.shape}")
    return x[:, :1], x[:, 1:4].flatten(2).mean(-1)


class DrasCLRSegNet(nn.Module):
    """DrasCLR encoder + U-Net decoder: per-voxel emphysema subtype logits of lung CT windows.

    ``forward(x)``: ``x`` (B, 4, W, W, W), channel 0 the windowed CT in [-1, 1], channels 1..3 the normalised atlas
    location (see :func:`split_location`); W a multiple of 32. Returns logits (B, num_classes, W, W, W).

    Args:
        rep_dim, moco_dim, num_experts, num_coordinates, mlp, in_channels: the :class:`DrasCLREncoder`'s (the
            projection ``fc`` is kept so that checkpoints load, and never trained here).
        num_classes: output classes (4: normal, centrilobular, paraseptal, panlobular).
        decoder_channels: output channels of the four decoder levels, W/16 to W/2 (3x3x3 convolutions with
            BatchNorm and ELU); full resolution is the 1x1x1 output convolution described above.
        freeze_encoder: keep the encoder's weights and BatchNorm statistics fixed in training.
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
        decoder_channels: Sequence[int] = (64, 32, 16, 16),
        freeze_encoder: bool = False,
    ) -> None:
        super().__init__()
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != len(_SKIP_CHANNELS):
            raise DrasCLRError(
                f"decoder_channels needs {len(_SKIP_CHANNELS)} sizes (W/16 to W), got {decoder_channels}"
            )
        self.encoder = DrasCLREncoder(rep_dim, moco_dim, num_experts, num_coordinates, mlp, in_channels)
        self.encoder.fc.requires_grad_(False)  # the contrastive projection plays no part in segmentation
        self.num_classes = int(num_classes)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
        ups, convs = [], []
        below = int(rep_dim)
        for skip, out in zip(_SKIP_CHANNELS, decoder_channels):
            ups.append(_upsample(below))
            convs.append(Convolution(3, below + skip, out, kernel_size=3, act="ELU", norm="BATCH"))
            below = out
        self.up = nn.ModuleList(ups)
        self.decode = nn.ModuleList(convs)
        self.out_half = nn.Conv3d(below, self.num_classes, kernel_size=1)
        self.out_full = nn.Conv3d(_FULL_CHANNELS, self.num_classes, kernel_size=1, bias=False)
        self.up_out = _upsample(self.num_classes)

    def train(self, mode: bool = True) -> DrasCLRSegNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen: BatchNorm keeps the pretrained statistics
        return self

    def encode(self, image: torch.Tensor, loc: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps ``[W/32 (rep_dim), W/16 (128), W/8 (64), W/4 (32), W/2 (16), W (8)]``; the first,
        flattened, is the encoder's representation ``h`` for 32^3 windows."""
        e = self.encoder
        full = e.act(e.bn1(e.conv1(image, loc)))
        x = e.act(e.bn2(e.conv2(full, loc)))
        half, x = e.downsample1.stages(x, loc)
        quarter, x = e.downsample2.stages(x, loc)
        eighth, x = e.downsample3.stages(x, loc)
        sixteenth = e.act(e.bn3(e.conv3(x, loc)))
        deepest = e.act(e.bn4(e.conv4(sixteenth, loc)))
        return [deepest, sixteenth, eighth, quarter, half, full]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, loc = split_location(x)
        for side in image.shape[2:]:
            if side % 32 != 0:
                raise DrasCLRError(f"window sides must be multiples of 32, got shape {image.shape}")
        features = self.encode(image, loc)
        y = features[0]
        for level, (up, decode) in enumerate(zip(self.up, self.decode)):
            y = decode(torch.cat([up(y), features[level + 1]], dim=1))
        return self.up_out(self.out_half(y)) + self.out_full(features[-1])


def _upsample(channels: int) -> UpSample:
    """MONAI's trilinear x2 upsampling (no weights)."""
    return UpSample(3, channels, channels, scale_factor=2, mode="nontrainable", interp_mode="trilinear")
