"""DrasCLREncoder: the architecture of REFERENCE.md, TorchScript export, the single-tensor bundle wrapper."""

from __future__ import annotations

import pytest
import torch

from drasclr_ext.networks import CondConv3d, DrasCLREncoder, DrasCLRFeatures


def test_architecture_and_shapes():
    encoder = DrasCLREncoder().eval()
    convs = [m for m in encoder.modules() if isinstance(m, CondConv3d)]
    assert len(convs) == 13
    assert [c.stride[0] for c in convs] == [1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 2]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64, 128, 128]
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 8.1e6 < n_params < 8.4e6  # "about 8.2 M parameters with 8 experts"
    with torch.no_grad():
        z, h = encoder(torch.zeros(3, 1, 32, 32, 32), torch.zeros(3, 3))
    assert z.shape == (3, 128) and h.shape == (3, 128)


@pytest.mark.parametrize("mlp", [True, False])
def test_projection_head(mlp):
    encoder = DrasCLREncoder(rep_dim=32, moco_dim=16, num_experts=2, mlp=mlp).eval()
    assert isinstance(encoder.fc, torch.nn.Sequential) == mlp
    with torch.no_grad():
        z, h = encoder(torch.rand(2, 1, 32, 32, 32), torch.rand(2, 3))
    torch.testing.assert_close(z, encoder.fc(h))
    assert z.shape == (2, 16) and h.shape == (2, 32)


def test_location_changes_the_representation():
    torch.manual_seed(0)
    encoder = DrasCLREncoder(num_experts=4).eval()
    x = torch.rand(1, 1, 32, 32, 32).expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        _, h = encoder(x, torch.tensor([[-0.5, 0.0, 0.5], [0.5, 0.0, -0.5]]))
    assert (h[0] - h[1]).abs().max() > 1e-4


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    encoder = DrasCLREncoder(num_experts=2).eval()
    scripted = torch.jit.script(encoder)
    x, loc = torch.rand(3, 1, 32, 32, 32), torch.rand(3, 3)
    with torch.no_grad():
        for locations in (loc, loc[:1].expand(3, -1)):
            torch.testing.assert_close(scripted(x, locations)[1], encoder(x, locations)[1])


def test_features_wrapper_single_tensor_input():
    torch.manual_seed(0)
    net = DrasCLRFeatures(num_experts=2).eval()
    x, loc = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 3)
    packed = torch.cat([x, loc[:, :, None, None, None].expand(-1, -1, 32, 32, 32)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(net(packed), DrasCLREncoder.forward(net, x, loc)[1])
        assert set(net.state_dict()) == set(DrasCLREncoder(num_experts=2).state_dict())
        torch.testing.assert_close(torch.jit.script(net)(packed), net(packed))
