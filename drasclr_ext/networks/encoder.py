"""The DrasCLR encoder: 13 location-conditioned 3x3x3 convolutions, a flattened representation and a projection."""

from __future__ import annotations

import torch
from torch import nn

from drasclr_ext.networks.condconv import CondConv3d


class CondConvBlock(nn.Module):
    """Three location-conditioned convolutions (stride 1, 1, 2), each followed by BatchNorm3d and ELU."""

    def __init__(self, in_channels: int, out_channels: int, num_experts: int = 8, num_coordinates: int = 1) -> None:
        super().__init__()
        kw = {"kernel_size": 3, "padding": 1, "num_experts": num_experts, "num_coordinates": num_coordinates}
        self.conv1 = CondConv3d(in_channels, out_channels, stride=1, **kw)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = CondConv3d(out_channels, out_channels, stride=1, **kw)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.conv3 = CondConv3d(out_channels, out_channels, stride=2, **kw)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.act = nn.ELU()

    def stages(self, x: torch.Tensor, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's feature map before its strided convolution (a U-Net skip) and its output."""
        x = self.act(self.bn1(self.conv1(x, loc)))
        before = self.act(self.bn2(self.conv2(x, loc)))
        return before, self.act(self.bn3(self.conv3(before, loc)))

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return self.stages(x, loc)[1]


class DrasCLREncoder(nn.Module):
    """Location-conditioned 3D CNN of DrasCLR for 32^3 lung CT patches.

    Layer names follow the official checkpoints (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample1..3``,
    ``conv3``, ``bn3``, ``conv4``, ``bn4``, ``fc``), so their weights load with only the routing layer renamed.

    Args:
        rep_dim: size of the representation ``h`` (channels of the last convolution).
        moco_dim: size of the projection ``z``.
        num_experts: expert kernels per convolution.
        num_coordinates: 3D coordinates per location.
        mlp: projection head ``Linear, ReLU, Linear`` if True, else a single ``Linear``.
        in_channels: image channels (1 for CT).
    """

    def __init__(
        self,
        rep_dim: int = 128,
        moco_dim: int = 128,
        num_experts: int = 8,
        num_coordinates: int = 1,
        mlp: bool = True,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.rep_dim = rep_dim
        self.moco_dim = moco_dim
        self.num_experts = num_experts
        self.num_coordinates = num_coordinates
        self.mlp = mlp
        kw = {"kernel_size": 3, "padding": 1, "num_experts": num_experts, "num_coordinates": num_coordinates}
        self.conv1 = CondConv3d(in_channels, 8, stride=1, **kw)
        self.bn1 = nn.BatchNorm3d(8)
        self.conv2 = CondConv3d(8, 8, stride=2, **kw)
        self.bn2 = nn.BatchNorm3d(8)
        self.downsample1 = CondConvBlock(8, 16, num_experts, num_coordinates)
        self.downsample2 = CondConvBlock(16, 32, num_experts, num_coordinates)
        self.downsample3 = CondConvBlock(32, 64, num_experts, num_coordinates)
        self.conv3 = CondConv3d(64, 128, stride=1, **kw)
        self.bn3 = nn.BatchNorm3d(128)
        self.conv4 = CondConv3d(128, rep_dim, stride=2, **kw)
        self.bn4 = nn.BatchNorm3d(rep_dim)
        self.act = nn.ELU()
        if mlp:
            self.fc = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU(), nn.Linear(rep_dim, moco_dim))
        else:
            self.fc = nn.Linear(rep_dim, moco_dim)

    def represent(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """Representation ``h`` (B, rep_dim) of patches ``x`` (B, 1, 32, 32, 32) at locations ``loc`` (B, 3)."""
        x = self.act(self.bn1(self.conv1(x, loc)))
        x = self.act(self.bn2(self.conv2(x, loc)))
        x = self.downsample1(x, loc)
        x = self.downsample2(x, loc)
        x = self.downsample3(x, loc)
        x = self.act(self.bn3(self.conv3(x, loc)))
        x = self.act(self.bn4(self.conv4(x, loc)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z, h)``: the projection (B, moco_dim) and the representation (B, rep_dim)."""
        h = self.represent(x, loc)
        return self.fc(h), h


class DrasCLRFeatures(DrasCLREncoder):
    """The encoder with a single-tensor output for bundles: ``forward(x, loc) -> h`` (B, rep_dim).

    Same parameters and state dict as :class:`DrasCLREncoder`. ``forward`` also takes one tensor
    (B, 4, 32, 32, 32) whose channels 1..3 hold the location broadcast over the patch, so that
    ``monai.bundle verify_net_in_out`` and single-input inferers can call it.
    """

    def forward(self, x: torch.Tensor, loc: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if loc is None:
            x, loc = x[:, :1], x[:, 1:4].flatten(2).mean(-1)
        return self.represent(x, loc)
