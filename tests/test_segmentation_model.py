"""The voxel-level emphysema subtype network and its training pieces: DrasCLRSegNet (shapes, errors, the encoder
and its pretrained weights), sliding-window inference against a direct forward pass, the Dice + cross-entropy loss
over the lung, and the class-balanced crops of ``train.json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import ClassesToIndicesd

from drasclr_ext.checkpoint import load_official_encoder, load_pretrained_encoder
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.inference.dense import DenseSubtypeInferer, LungWindowPredictor
from drasclr_ext.networks.encoder import DrasCLREncoder
from drasclr_ext.networks.losses import LungDiceCELoss
from drasclr_ext.networks.segmentation import SUBTYPE_CLASSES, DrasCLRSegNet, split_location
from drasclr_ext.transforms.atlas_grid import AtlasGrid
from tests.bundle_utils import BUNDLES, config

SSL_BUNDLE = BUNDLES / "drasclr_lung_ct_ssl"
TRAIN_JSON = config("drasclr_emphysema_subtype", "train.json")[0]
SMALL = {"rep_dim": 16, "moco_dim": 8, "num_experts": 2, "decoder_channels": (8, 8, 8, 8)}


def small_net(seed: int = 0, **kwargs) -> DrasCLRSegNet:
    torch.manual_seed(seed)
    return DrasCLRSegNet(**{**SMALL, **kwargs})


def packed(batch: int, window: int, seed: int = 0) -> torch.Tensor:
    """(B, 4, W, W, W): a random CT window in [-1, 1] and random location channels."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 4, window, window, window, generator=g) * 2.0 - 1.0


# ------------------------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("window", [32, 64, 96])
def test_logits_have_the_window_shape_and_one_channel_per_class(window):
    net = small_net().eval()
    with torch.no_grad():
        logits = net(packed(2 if window == 32 else 1, window))
    assert logits.shape == (2 if window == 32 else 1, len(SUBTYPE_CLASSES), window, window, window)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_the_default_network_gives_per_voxel_logits_of_four_classes():
    net = DrasCLRSegNet().eval()
    with torch.no_grad():
        assert net(packed(1, 32)).shape == (1, 4, 32, 32, 32)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 4, 48, 48, 48), "multiples of 32"),
        ((1, 4, 32, 32, 40), "multiples of 32"),
        ((1, 1, 32, 32, 32), "3 location channels"),
        ((1, 5, 32, 32, 32), "3 location channels"),
        ((4, 32, 32, 32), "3 location channels"),
    ],
)
def test_bad_window_sizes_and_channel_counts_are_refused(shape, message):
    net = small_net().eval()
    with pytest.raises(DrasCLRError, match=message), torch.no_grad():
        net(torch.zeros(shape))


def test_decoder_channels_need_four_levels():
    with pytest.raises(DrasCLRError, match="decoder_channels"):
        DrasCLRSegNet(**{**SMALL, "decoder_channels": (8, 8, 8)})


def test_the_location_is_the_mean_of_the_location_channels():
    x = packed(2, 32)
    image, loc = split_location(x)
    torch.testing.assert_close(image, x[:, :1])
    expected = torch.stack([x[b, 1 + c].mean() for b in range(2) for c in range(3)]).reshape(2, 3)
    torch.testing.assert_close(loc, expected)


def test_the_encoder_has_exactly_the_drasclr_encoder_state():
    ours = DrasCLRSegNet().encoder.state_dict()
    reference = DrasCLREncoder().state_dict()
    assert list(ours) == list(reference)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert isinstance(DrasCLRSegNet().encoder, DrasCLREncoder)


def test_the_first_feature_map_of_a_32_window_is_the_encoder_representation():
    net = small_net().eval()
    x = packed(3, 32, seed=1)
    image, loc = split_location(x)
    with torch.no_grad():
        features = net.encode(image, loc)
        assert [tuple(f.shape[1:]) for f in features] == [
            (16, 1, 1, 1),
            (128, 2, 2, 2),
            (64, 4, 4, 4),
            (32, 8, 8, 8),
            (16, 16, 16, 16),
            (8, 32, 32, 32),
        ]
        torch.testing.assert_close(features[0].flatten(1), net.encoder.represent(image, loc))


def test_feature_maps_of_a_64_window_are_at_every_scale():
    net = small_net().eval()
    image, loc = split_location(packed(1, 64))
    with torch.no_grad():
        sides = [f.shape[2:] for f in net.encode(image, loc)]
    assert [tuple(s) for s in sides] == [(n, n, n) for n in (2, 4, 8, 16, 32, 64)]


def _assert_encoder_state(net: DrasCLRSegNet, expected: dict) -> None:
    state = net.encoder.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():  # exactly the stored values (float16 files widen exactly to float32)
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def test_pretraining_bundle_weights_load_into_the_encoder_unchanged():
    path = SSL_BUNDLE / "models" / "model.pt"
    net = DrasCLRSegNet()
    decoder_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("encoder.")}
    assert load_pretrained_encoder(net, path, SSL_BUNDLE) is net
    _assert_encoder_state(net, torch.load(path, weights_only=True))
    for key, value in net.state_dict().items():  # the decoder keeps its initialisation
        if not key.startswith("encoder."):
            assert torch.equal(value, decoder_before[key]), key


def test_official_checkpoint_loads_into_the_encoder_and_keeps_the_reference_outputs(reference_fixture_dir):
    checkpoint = reference_fixture_dir / "checkpoint_0020.pth.tar"
    net = load_pretrained_encoder(DrasCLRSegNet(), checkpoint).eval()
    _assert_encoder_state(net, load_official_encoder(checkpoint).state_dict())
    io = np.load(reference_fixture_dir / "io.npz")
    patches, locations = torch.from_numpy(io["patches"][:4]), torch.from_numpy(io["locations"][:4])
    with torch.no_grad():
        h = net.encode(patches, locations)[0].flatten(1)
        torch.testing.assert_close(h, net.encoder.represent(patches, locations))
    assert np.abs(h.numpy() - io["h"][:4]).max() < 1e-4


def test_a_frozen_encoder_keeps_its_weights_and_batchnorm_statistics():
    net = small_net(freeze_encoder=True).train()
    assert not net.encoder.training and all(m.training for m in net.decode)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for n, p in net.named_parameters() if not n.startswith("encoder."))
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    with torch.no_grad():
        net(packed(2, 32))  # a training-mode pass would update BatchNorm running statistics
    _assert_encoder_state(net, before)
    trainable = small_net().train()
    assert trainable.encoder.training
    assert not any(p.requires_grad for p in trainable.encoder.fc.parameters())  # the projection is never trained


# ------------------------------------------------------------------------------------------- sliding windows


def _grid(shape, seed=0, lung=None) -> AtlasGrid:
    """A random subject grid with a non-trivial atlas map (rotation, scale, shift)."""
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    affine[:3, 3] = [-20.0, 10.0, -30.0]
    c, s = np.cos(0.3), np.sin(0.3)
    world_to_atlas = np.eye(4)
    world_to_atlas[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) * 1.1
    world_to_atlas[:3, 3] = [90.0, 80.0, 70.0]
    image = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    lung = np.ones(shape, np.uint8) if lung is None else lung
    return AtlasGrid(image, lung, affine, world_to_atlas, np.array([2 / 180, 2 / 150, 2 / 160]))


def test_sliding_window_on_one_window_equals_a_direct_forward_pass():
    net = small_net().eval()
    grid = _grid((32, 32, 32))
    inferer = DenseSubtypeInferer(net, atlas="default", window=32, overlap=0.25)
    probabilities, windows = inferer.predict(grid)
    x = torch.from_numpy(np.concatenate([grid.image[None], grid.locations()]))[None]
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1)[0].numpy()
    assert windows == 1 and probabilities.shape == (4, 32, 32, 32)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_windows_without_lung_are_not_computed_and_leave_zeros():
    net = small_net().eval()
    lung = np.zeros((32, 32, 64), np.uint8)
    lung[10:20, 10:20, 5:20] = 1  # only the first of the two windows (z 0..31, 32..63) holds lung
    grid = _grid((32, 32, 64), lung=lung)
    probabilities, windows = DenseSubtypeInferer(net, window=32, overlap=0.0).predict(grid)
    assert windows == 1
    assert np.all(probabilities[:, :, :, 32:] == 0)
    x = torch.from_numpy(np.concatenate([grid.image[None], grid.locations()])[:, :, :, :32].copy())[None]
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1)[0].numpy()
    np.testing.assert_allclose(probabilities[:, :, :, :32], expected, atol=1e-5)


def test_the_lung_window_predictor_runs_the_network_on_lung_windows_only():
    calls = []

    class Recorder(torch.nn.Module):
        num_classes = 4

        def forward(self, x):
            calls.append(x.clone())
            return torch.zeros(x.shape[0], 4, *x.shape[2:])

    batch = torch.rand(3, 5, 32, 32, 32)
    batch[:, 4] = 0
    batch[1, 4, 3, 4, 5] = 1  # the middle window has one lung voxel
    out = LungWindowPredictor(Recorder())(batch)
    assert len(calls) == 1 and torch.equal(calls[0], batch[1:2, :4])
    assert out.shape == (3, 4, 32, 32, 32)
    assert torch.all(out[[0, 2]] == 0) and torch.allclose(out[1], torch.full_like(out[1], 0.25))


class Constant(torch.nn.Module):
    """Class 0 for windows whose first image voxel is negative, class 3 for the others (steep logits)."""

    num_classes = 4

    def forward(self, x):
        p = torch.zeros(x.shape[0], 4, *x.shape[2:])
        first = x[:, 0, 0, 0, 0] < 0
        p[first, 0], p[~first, 3] = 10.0, 10.0
        return p


def test_overlapping_windows_are_blended_with_gaussian_weights():
    """Two windows (z 0..31 and 16..47) with different answers: each alone where it alone covers, and in the overlap
    a mix weighted towards the nearer window centre, more sharply for a smaller sigma."""
    image = np.ones((32, 32, 48), np.float32)
    image[:, :, :16] = -1.0  # the windows start at z 0 and 16: their first voxel tells them apart
    grid = _grid((32, 32, 48))
    grid.image = image
    top = float(torch.softmax(torch.tensor([10.0, 0.0, 0.0, 0.0]), 0)[0])
    first = {}
    for sigma in (0.125, 0.5):
        out, windows = DenseSubtypeInferer(Constant(), window=32, overlap=0.5, sigma_scale=sigma).predict(grid)
        assert windows == 2
        np.testing.assert_allclose(out[0, :, :, :16], top, rtol=1e-5)  # the first window only
        np.testing.assert_allclose(out[3, :, :, 32:], top, rtol=1e-5)  # the second window only
        np.testing.assert_allclose(out.sum(0), 1.0, rtol=1e-5)
        middle = out[0, 16, 16, 16:32]
        assert np.all(np.diff(middle) < 0)  # the first window's share falls towards the second's centre
        first[sigma] = middle
    assert first[0.125][0] > 0.9 * top and first[0.125][-1] < 0.1 * top  # a narrow Gaussian: nearly one window
    assert first[0.5][0] < first[0.125][0] and first[0.5][-1] > first[0.125][-1]  # a wide one mixes more


# --------------------------------------------------------------------------------------------------- the loss


def _labels(shape=(2, 1, 8, 8, 8), seed=0) -> torch.Tensor:
    """Labels 0..4 with every class present; 0 (outside the lung) on a border."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, 5, shape, generator=g)
    labels[..., :2] = 0
    return labels


def test_the_loss_ignores_voxels_outside_the_lung():
    labels = _labels()
    logits = torch.randn(2, 4, 8, 8, 8)
    loss = LungDiceCELoss()(logits, labels)
    changed = logits.clone()
    changed[:, :, :, :, :2] = torch.randn(2, 4, 8, 8, 2) * 50.0
    torch.testing.assert_close(LungDiceCELoss()(changed, labels), loss)
    assert float(loss) > 0.5  # random logits are far from the labels


def test_the_loss_is_zero_for_perfect_confident_logits():
    labels = _labels()
    onehot = F.one_hot((labels[:, 0] - 1).clamp(min=0), 4).movedim(-1, 1).float()
    logits = 50.0 * onehot - 25.0
    assert float(LungDiceCELoss()(logits, labels)) < 1e-4
    assert float(LungDiceCELoss()(-logits, labels)) > 10.0


def test_the_loss_terms_equal_cross_entropy_and_dice_over_the_lung_voxels():
    labels = _labels(seed=1)
    logits = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    inside = labels[:, 0] > 0
    target = labels[:, 0][inside] - 1
    voxel_logits = logits.movedim(1, -1)[inside]  # (N, 4)
    ce = F.cross_entropy(voxel_logits, target)
    torch.testing.assert_close(LungDiceCELoss(lambda_dice=0.0)(logits, labels), ce)
    p = torch.softmax(voxel_logits, dim=1)
    onehot = F.one_hot(target, 4).float()
    dice = 1.0 - (2.0 * (p * onehot).sum(0) + 1e-5) / (p.sum(0) + onehot.sum(0) + 1e-5)  # pooled over the batch
    torch.testing.assert_close(LungDiceCELoss(lambda_ce=0.0)(logits, labels), dice.mean(), atol=1e-5, rtol=1e-5)


def test_gradients_reach_lung_voxels_only_and_every_part_of_the_network():
    labels = _labels()
    logits = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
    LungDiceCELoss()(logits, labels).backward()
    outside = (labels == 0).expand(-1, 4, -1, -1, -1)
    assert torch.all(logits.grad[outside] == 0)
    assert torch.all(logits.grad[~outside] != 0)
    assert float(LungDiceCELoss()(logits, torch.zeros_like(labels)).detach()) == 0.0  # no lung: nothing to learn

    net = small_net().train()
    x = packed(2, 32)  # training needs 2 windows: the deepest BatchNorm sees 1 value per window of 32
    window_labels = torch.randint(0, 5, (2, 1, 32, 32, 32), generator=torch.Generator().manual_seed(3))
    LungDiceCELoss()(net(x), window_labels).backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.encoder.fc[0].weight.grad is None


# --------------------------------------------------------------------------------------- class-balanced crops


def _train_crop(window: int, samples: int):
    """``train.json``'s RandCropByLabelClassesd, with a smaller window and more samples."""
    parser = ConfigParser()
    parser.read_config(TRAIN_JSON)
    assert parser["crop_ratios"] == [0, 1, 1, 1, 1]
    parser["window"], parser["crops_per_subject"] = window, samples
    crop = parser.get_parsed_content("train#transforms#0", instantiate=True)
    crop.set_random_state(0)
    return crop


def test_class_balanced_crops_are_centred_on_every_class_even_a_rare_one():
    label = np.zeros((64, 64, 64), np.uint8)
    label[16:48, 16:48, 16:48] = 1
    label[16:48, 16:48, 16:30] = 2
    label[16:48, 34:48, 34:48] = 4
    label[30:33, 30:33, 30:33] = 3  # 27 voxels: under 1 % of the lung and of the volume
    assert (label == 3).sum() < 0.01 * (label > 0).sum()
    affine = torch.eye(4, dtype=torch.float64)
    data = {
        "image": MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=affine),
        "label": MetaTensor(torch.from_numpy(label[None]), affine=affine),
    }
    data = ClassesToIndicesd("label", num_classes=5)(data)
    crops = _train_crop(16, 40)(data)
    assert len(crops) == 40
    centres = [int(c["label"][0, 8, 8, 8]) for c in crops]
    counts = np.bincount(centres, minlength=5)
    assert counts[0] == 0 and np.all(counts[1:] >= 4), counts  # each class about 10 of 40; none outside the lung
    for c in crops:  # the image crop is the label crop (the image holds the labels here)
        assert c["image"].shape == (1, 16, 16, 16)
        np.testing.assert_array_equal(c["image"].numpy(), c["label"].numpy())


def test_train_json_keeps_the_crops_and_the_location_channels_in_step():
    content = json.loads(open(TRAIN_JSON).read())
    names = [t["_target_"].rsplit(".", 1)[-1] for t in content["train"]["transforms"]]
    assert names[0] == "RandCropByLabelClassesd" and names[-2:] == ["AtlasLocationd", "SelectItemsd"]
    assert content["train"]["transforms"][0]["indices_key"] == "label_cls_indices"
