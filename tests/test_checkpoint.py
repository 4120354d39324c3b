"""Official DrasCLR checkpoints: parity with the reference outputs, other shapes, bad files, conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drasclr_ext.checkpoint import (
    convert_official_checkpoint,
    load_encoder,
    load_official_encoder,
    ours_to_official,
    sha256sum,
)
from drasclr_ext.errors import CheckpointError
from drasclr_ext.networks import DrasCLR


def test_parity_with_reference_implementation(reference_fixture_dir):
    encoder = load_official_encoder(reference_fixture_dir / "checkpoint_0020.pth.tar")
    io = np.load(reference_fixture_dir / "io.npz")
    with torch.no_grad():
        z, h = encoder(torch.from_numpy(io["patches"]), torch.from_numpy(io["locations"]))
    assert not encoder.training
    assert np.abs(z.numpy() - io["z"]).max() < 1e-4
    assert np.abs(h.numpy() - io["h"]).max() < 1e-4


def write_official(model: DrasCLR, path) -> None:
    """Save ``model`` as DrasCLR's training script does (DDP ``module.`` prefix, official routing names)."""
    state = {}
    for name in ("encoder_q", "encoder_k"):
        enc_state = ours_to_official(getattr(model, name).state_dict())
        state.update({f"module.{name}.{k}": v for k, v in enc_state.items()})
    state["module.queue"], state["module.queue_ptr"] = model.queue, model.queue_ptr
    torch.save({"epoch": 3, "arch": "custom", "state_dict": state, "optimizer": {"state": {}}}, path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rep_dim": 64, "moco_dim": 32, "num_experts": 4, "mlp": False},
        {"rep_dim": 96, "moco_dim": 16, "num_experts": 2, "mlp": True, "num_coordinates": 2},
    ],
)
def test_other_shapes_are_inferred(tmp_path, kwargs):
    torch.manual_seed(0)
    model = DrasCLR(num_locations=3, queue_size=4, **kwargs)
    with torch.no_grad():  # make the key encoder differ so that taking the wrong one would show
        for p in model.encoder_k.parameters():
            p.add_(0.5)
    write_official(model, tmp_path / "ckpt.pth.tar")
    encoder = load_official_encoder(tmp_path / "ckpt.pth.tar")
    assert (encoder.rep_dim, encoder.moco_dim, encoder.num_experts, encoder.mlp) == (
        kwargs["rep_dim"],
        kwargs["moco_dim"],
        kwargs["num_experts"],
        kwargs["mlp"],
    )
    x = torch.rand(2, 1, 32, 32, 32)
    loc = torch.rand(2, 3 * kwargs.get("num_coordinates", 1))
    with torch.no_grad():
        expected = model.encoder_q.eval()(x, loc)
        got = encoder(x, loc)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_convert_then_load_bundle_weights(reference_fixture_dir, tmp_path):
    src = reference_fixture_dir / "checkpoint_0020.pth.tar"
    dst = convert_official_checkpoint(src, tmp_path / "models" / "model.pt")
    state = torch.load(dst, weights_only=True)
    assert "conv1.routing.weight" in state and not any(k.startswith("module.") for k in state)
    io = np.load(reference_fixture_dir / "io.npz")
    with torch.no_grad():
        _, h = load_encoder(dst, expected_sha256=sha256sum(dst))(
            torch.from_numpy(io["patches"]), torch.from_numpy(io["locations"])
        )
    assert np.abs(h.numpy() - io["h"]).max() < 1e-4
    assert not list(tmp_path.joinpath("models").glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "could not read"),
        (b"not a checkpoint at all", "could not read"),
        ({"epoch": 1}, "no 'state_dict'"),
        ({"state_dict": {"queue": torch.zeros(1)}}, "no 'module.encoder_q"),
        ({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, "lacks"),
    ],
)
def test_not_a_checkpoint_gets_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pth.tar"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_official_encoder(path)


class Arbitrary:
    """A pickled object that weights_only loading must refuse."""


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_encoder(path)


def test_truncated_and_tampered_files(reference_fixture_dir, tmp_path):
    data = (reference_fixture_dir / "checkpoint_0020.pth.tar").read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read"):
        load_official_encoder(truncated)
    with pytest.raises(CheckpointError, match="sha256"):
        load_official_encoder(reference_fixture_dir / "checkpoint_0020.pth.tar", expected_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_encoder(tmp_path / "missing.pt")


def _segnet_with_statistics(seed: int = 0):
    """A small DrasCLRSegNet with non-trivial BatchNorm statistics (a few forward passes in training mode)."""
    from drasclr_ext.networks.segmentation import DrasCLRSegNet

    torch.manual_seed(seed)
    net = DrasCLRSegNet(rep_dim=32, moco_dim=32, num_experts=2, decoder_channels=(16, 8, 8, 8))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 4, 32, 32, 32))
    return net.eval()


def test_compact_weights_halve_the_file_and_keep_the_labels(tmp_path):
    from drasclr_ext.checkpoint import compact_weights_file, save_atomic

    net = _segnet_with_statistics()
    path = tmp_path / "model.pt"
    save_atomic(net.state_dict(), path)
    size = path.stat().st_size
    compact_weights_file(path)
    state = torch.load(path, weights_only=True)
    assert path.stat().st_size < 0.6 * size
    assert all(v.dtype == torch.float16 for k, v in state.items() if "num_batches_tracked" not in k)
    assert state[next(k for k in state if "num_batches_tracked" in k)].dtype == torch.int64
    half = _segnet_with_statistics(seed=1)
    half.load_state_dict(state)  # float16 values go into the float32 parameters
    assert all(p.dtype == torch.float32 for p in half.parameters())
    x = torch.randn(2, 4, 32, 32, 32)
    with torch.no_grad():
        agree = (net(x).argmax(1) == half(x).argmax(1)).float().mean()
    assert agree >= 0.999, agree


def test_compact_weights_refuse_values_float16_cannot_hold(tmp_path):
    from drasclr_ext.checkpoint import compact_state

    with pytest.raises(CheckpointError, match="float16"):
        compact_state({"w": torch.tensor([1e6])})
    with pytest.raises(CheckpointError, match="float16"):
        compact_state({"w": torch.tensor([float("nan")])})


def test_shipped_weights_files_fit_the_model_zoo_limit():
    from pathlib import Path

    bundles = Path(__file__).resolve().parents[1] / "bundles"
    files = sorted(bundles.glob("*/models/*.pt"))
    assert len(files) == 3
    assert all(f.stat().st_size <= 25 * 2**20 for f in files), [(f.name, f.stat().st_size) for f in files]
