"""CondConv3d equals its per-sample definition: kernel_i = sum_e sigmoid(routing(loc_i))_e * W_e."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drasclr_ext.networks import CondConv3d


def per_sample_reference(conv: CondConv3d, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """The definition, one sample at a time, with the routing computed by hand."""
    outs = []
    for xi, li in zip(x, loc):
        r = torch.sigmoid(li.reshape(-1) @ conv.routing.weight.T + conv.routing.bias)
        kernel = sum(r[e] * conv.weight[e] for e in range(conv.num_experts))
        outs.append(F.conv3d(xi[None], kernel, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    return torch.cat(outs)


CASES = [
    # in, out, kernel, stride, padding, dilation, groups, bias, experts, coordinates, input size
    (1, 8, 3, 1, 1, 1, 1, True, 8, 1, (9, 10, 11)),  # grouped convolution
    (8, 8, 3, 2, 1, 1, 1, True, 8, 1, (9, 10, 11)),
    (4, 6, 3, 1, 0, 2, 2, False, 3, 1, (9, 10, 11)),
    (6, 6, 1, 1, 0, 1, 6, True, 4, 2, (9, 10, 11)),
    (1, 3, 3, 1, 1, 1, 1, True, 2, 1, (16, 16, 17)),  # grouped, channels-last (one input channel)
    (16, 8, 3, 2, 1, 1, 1, True, 8, 1, (2, 2, 2)),  # one output voxel: expert outputs mixed
    (4, 5, 3, 1, 1, 1, 1, False, 8, 1, (2, 2, 2)),  # 8 output voxels = 8 experts: expert outputs mixed
]


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,bias,experts,coords,size", CASES)
@pytest.mark.parametrize("same_location", [False, True])
def test_matches_per_sample_definition(
    cin, cout, k, stride, pad, dil, groups, bias, experts, coords, size, same_location
):
    torch.manual_seed(0)
    conv = CondConv3d(cin, cout, k, stride, pad, dil, groups, bias, experts, coords).double()
    x = torch.randn(5, cin, *size, dtype=torch.float64)
    loc = torch.rand(5, 3 * coords, dtype=torch.float64) * 2 - 1
    if same_location:
        loc = loc[:1].expand(5, -1)
    torch.testing.assert_close(conv(x, loc), per_sample_reference(conv, x, loc), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(6, 6, 6), (16, 16, 16), (1, 1, 2)])
def test_gradients_match_per_sample_definition(size):
    torch.manual_seed(1)
    conv = CondConv3d(3, 4, 3, padding=1, num_experts=4).double()
    x = torch.randn(4, 3, *size, dtype=torch.float64)
    loc = torch.rand(4, 3, dtype=torch.float64)
    conv(x, loc).square().sum().backward()
    fast = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    per_sample_reference(conv, x, loc).square().sum().backward()
    for g_fast, p in zip(fast, conv.parameters()):
        torch.testing.assert_close(g_fast, p.grad, rtol=1e-9, atol=1e-9)


def test_parameter_shapes():
    conv = CondConv3d(8, 16, 3, groups=2, num_experts=5, num_coordinates=2)
    assert conv.weight.shape == (5, 16, 4, 3, 3, 3)
    assert conv.bias.shape == (16,)
    assert conv.routing.in_features == 6 and conv.routing.out_features == 5


def test_batch_and_location_mismatch_is_an_error():
    conv = CondConv3d(1, 2, 3)
    with pytest.raises(ValueError, match="2 images but 3 locations"):
        conv(torch.zeros(2, 1, 4, 4, 4), torch.zeros(3, 3))
