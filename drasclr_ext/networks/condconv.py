"""Location-conditioned 3D convolution: a mixture of expert kernels routed by the anatomical location."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drasclr_ext.networks.utils import as_triple


class CondConv3d(nn.Module):
    """3D convolution whose kernel depends on the anatomical location of each sample.

    The kernel of sample ``i`` is ``sum_e r[i, e] * weight[e]`` with routing weights
    ``r = sigmoid(routing(loc))``; all experts share one bias. The whole batch is convolved in one call:
    with a single kernel when every sample has the same location, else as a grouped convolution with one
    group per sample.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution kernel size (int or triple).
        stride: convolution stride.
        padding: zero padding on each side.
        dilation: kernel dilation.
        groups: channel groups, as in ``nn.Conv3d``.
        bias: whether to add a bias shared by all experts.
        num_experts: number of expert kernels ``E``.
        num_coordinates: number of 3D coordinates per location (the routing layer takes ``3 * num_coordinates``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 8,
        num_coordinates: int = 1,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must divide by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_triple(kernel_size)
        self.stride = as_triple(stride)
        self.padding = as_triple(padding)
        self.dilation = as_triple(dilation)
        self.groups = groups
        self.num_experts = num_experts
        self.num_coordinates = num_coordinates
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.routing = nn.Linear(3 * num_coordinates, num_experts)
        # (kernel, stride, padding, dilation) per spatial axis, as lists so that TorchScript can index them
        self._axis_geometry = [list(g) for g in zip(self.kernel_size, self.stride, self.padding, self.dilation)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for expert in self.weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0, 0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def routing_weights(self, loc: torch.Tensor) -> torch.Tensor:
        """Routing weights (B, E) of locations ``loc`` (B, 3 * num_coordinates) or (B, num_coordinates, 3)."""
        return torch.sigmoid(self.routing(loc.reshape(loc.shape[0], -1)))

    def output_voxels(self, x: torch.Tensor) -> int:
        """Voxels per output channel and sample for input ``x`` (B, C, D, H, W)."""
        voxels = 1
        for axis in range(3):
            k, s, p, d = self._axis_geometry[axis]
            voxels *= (x.shape[2 + axis] + 2 * p - d * (k - 1) - 1) // s + 1
        return voxels

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` (B, C_in, D, H, W) with the kernels of locations ``loc`` (B, 3 * num_coordinates).

        Three equivalent evaluations, chosen by cost: one mixed kernel when all locations are equal; for tiny
        outputs (no more voxels than experts, the deepest layers) every expert as one plain convolution whose
        outputs are mixed per sample, since mixing B kernels would cost more than the convolution; otherwise
        one grouped convolution with a mixed kernel per sample. On CPU, batches of about 64 patches run fastest.
        """
        batch = x.shape[0]
        if loc.shape[0] != batch:
            raise ValueError(f"got {batch} images but {loc.shape[0]} locations")
        if batch == 1 or bool((loc == loc[:1]).all()):
            kernel = torch.einsum("e,eoi...->oi...", self.routing_weights(loc[:1])[0], self.weight)
            return F.conv3d(x, kernel, self.bias, self.stride, self.padding, self.dilation, self.groups)
        routing = self.routing_weights(loc)
        if self.groups == 1 and self.output_voxels(x) <= self.num_experts:
            experts = F.conv3d(x, self.weight.flatten(0, 1), None, self.stride, self.padding, self.dilation)
            out = torch.einsum("be,beo...->bo...", routing, experts.unflatten(1, (self.num_experts, self.out_channels)))
        else:
            kernels = torch.einsum("be,eoi...->boi...", routing, self.weight).flatten(0, 1)
            x = x.flatten(0, 1).unsqueeze(0)
            if self.in_channels == self.groups:
                # oneDNN runs one-input-channel-per-group 3D convolutions several times faster channels-last
                x = x.contiguous(memory_format=torch.channels_last_3d)
            out = F.conv3d(x, kernels, None, self.stride, self.padding, self.dilation, batch * self.groups)
            out = out.squeeze(0).unflatten(0, (batch, self.out_channels))
        out = out.contiguous()
        bias = self.bias
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, num_experts={self.num_experts}, num_coordinates={self.num_coordinates}"
        )
