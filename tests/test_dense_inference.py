"""Dense emphysema subtype inference: window targets, the subtype network, blending, resampling to the input grid,
labels, and the inferer + writer on a small synthetic chest."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from drasclr_ext.inference.dense import (
    DenseSubtypeInferer,
    DenseSubtypeWriter,
    _blend_loop,
    blend_window_probabilities,
    gaussian_window_weights,
    grid_to_image,
    resample_to_grid,
    save_probabilities,
    subtype_labels,
)
from drasclr_ext.metrics.emphysema import emphysema_report
from drasclr_ext.networks.heads import DrasCLRSubtypeNet, soft_cross_entropy, window_class_fractions
from drasclr_ext.transforms.patches import DenseWindowResult
from drasclr_ext.transforms.registration import RegistrationResult
from tests.synthetic_chest import make_chest


def _windows(shape, origins, window=4) -> DenseWindowResult:
    origins = np.asarray(origins, dtype=np.int64)
    return DenseWindowResult(
        np.zeros(shape, np.float32), np.ones(shape, np.uint8), np.eye(4), origins, np.zeros((len(origins), 3)), window
    )


def test_window_class_fractions_count_lung_voxels_per_class():
    labels = np.zeros((8, 4, 4), np.uint8)
    labels[:4, :2] = 1  # first window: 32 normal
    labels[:4, 2:, :2] = 2  # 16 centrilobular
    labels[4:, :, :] = 4  # second window: all panlobular
    fractions = window_class_fractions(labels, np.array([[0, 0, 0], [4, 0, 0], [8, 0, 0]]), window=4)
    np.testing.assert_allclose(fractions, [[2 / 3, 1 / 3, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot_targets():
    logits = torch.randn(5, 4)
    target = torch.tensor([0, 3, 1, 2, 2])
    torch.testing.assert_close(
        soft_cross_entropy(logits, torch.nn.functional.one_hot(target, 4).float()),
        torch.nn.functional.cross_entropy(logits, target),
    )


def test_subtype_net_packed_input_equals_patch_and_location():
    torch.manual_seed(0)
    net = DrasCLRSubtypeNet(num_experts=2).eval()
    x, loc = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 3)
    packed = torch.cat([x, loc[:, :, None, None, None].expand(2, 3, 32, 32, 32)], dim=1)
    with torch.no_grad():
        logits = net(x, loc)
        torch.testing.assert_close(net(packed), logits)
    assert logits.shape == (2, 4)


def test_frozen_encoder_keeps_weights_and_batchnorm_statistics():
    net = DrasCLRSubtypeNet(num_experts=2, freeze_encoder=True).train()
    assert not net.encoder.training and net.head.training
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.head.parameters())


def test_blend_is_the_window_probability_where_windows_agree_and_zero_uncovered():
    res = _windows((12, 4, 4), [[0, 0, 0], [4, 0, 0]])
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32)
    out = blend_window_probabilities(res, probs)
    np.testing.assert_allclose(out[:, :8], np.broadcast_to(probs[0][:, None, None, None], (4, 8, 4, 4)), rtol=1e-6)
    assert np.all(out[:, 8:] == 0)


def test_blend_weights_overlaps_by_distance_to_each_window_centre():
    res = _windows((6, 4, 4), [[0, 0, 0], [2, 0, 0]])
    out = blend_window_probabilities(res, np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32))
    np.testing.assert_allclose(out[:, :2], np.array([1, 0, 0, 0])[:, None, None, None] * np.ones((4, 2, 4, 4)))
    np.testing.assert_allclose(out[0, 2:4].mean(), 0.5, atol=1e-6)  # the overlap is symmetric
    assert out[0, 2].mean() > 0.5 > out[0, 3].mean()  # x=2 is nearer window 1's centre
    np.testing.assert_allclose(out.sum(0), 1.0, rtol=1e-6)


def test_grid_to_image_resamples_through_both_affines_exactly():
    # a linear function of world x on a 1 mm grid, read back on a flipped 2 mm image grid: trilinear is exact
    grid_affine = np.eye(4)
    grid_affine[:3, 3] = [-20.0, -20.0, -20.0]
    i = np.arange(41, dtype=np.float32)
    values = np.broadcast_to((i - 20.0)[:, None, None], (41, 41, 41))[None].copy()
    image_affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    image_affine[:3, 3] = [8.0, 8.0, -8.0]
    mask = np.zeros((9, 9, 9), bool)
    mask[2:7, 1:8, 3:9] = True
    out = grid_to_image(values, grid_affine, image_affine, mask.shape, mask, normalise=False)
    world_x = 8.0 - 2.0 * np.arange(9)
    expected = np.where(mask, world_x[:, None, None], 0.0)
    np.testing.assert_allclose(out[0], expected, atol=1e-4)


def test_grid_to_image_normalises_probabilities_inside_the_mask():
    values = np.zeros((4, 6, 6, 6), np.float32)
    values[0, :3], values[2, :3] = 0.25, 0.25  # the far half is uncovered (all zero)
    mask = np.zeros((6, 6, 6), bool)
    mask[1:5, 1:5, 1:5] = True
    out = grid_to_image(values, np.eye(4), np.eye(4), mask.shape, mask)
    np.testing.assert_allclose(out[:, mask][:, :16].sum(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1:3][mask[1:3]], 0.5, rtol=1e-6)
    assert np.all(out[:, ~mask] == 0)


@pytest.mark.parametrize(
    "decision, expected",
    [
        ("attenuation", [0, 1, 2, 1, 1]),  # emphysema only where HU < -950 and the subtype is probable enough
        ("argmax", [0, 1, 1, 4, 1]),
    ],
)
def test_subtype_labels(decision, expected):
    probs = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.9, 0.1, 0.0, 0.0],
            [0.6, 0.3, 0.0, 0.1],
            [0.1, 0.0, 0.0, 0.9],
            [0.99, 0.01, 0.0, 0.0],
        ],
        np.float32,
    ).T.reshape(4, 5, 1, 1)
    hu = np.array([-1000, -900, -990, -900, -990], np.float32).reshape(5, 1, 1)
    lung = np.array([0, 1, 1, 1, 1], np.uint8).reshape(5, 1, 1)
    labels = subtype_labels(probs, hu, lung, decision, min_probability=0.05)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels.ravel(), expected)


@pytest.mark.parametrize("sigma_scale", [0.25, 0.05])  # 0.05: MONAI clamps the weights, the loop blends
@pytest.mark.parametrize("layout", ["C", "F"])
def test_blend_equals_adding_the_weighted_windows_one_by_one(sigma_scale, layout):
    rng = np.random.default_rng(0)
    starts = np.stack(np.meshgrid(*[np.arange(n) * 4 for n in (4, 3, 5)], indexing="ij"), -1).reshape(-1, 3)
    origins = starts[rng.random(len(starts)) < 0.6]  # a lattice with holes, like windows without lung
    res = _windows((20, 16, 24), origins, window=8)
    if layout == "F":
        res.grid = np.asfortranarray(res.grid)
    probs = rng.dirichlet(np.ones(4), len(origins)).astype(np.float32)
    total, weight = _blend_loop(res, probs, gaussian_window_weights(8, sigma_scale))
    expected = np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)
    out = blend_window_probabilities(res, probs, sigma_scale)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out == 0, expected == 0)


def _grid_to_image_reference(values, grid_affine, image_affine, mask):
    """The scipy formulation grid_to_image had: affine_transform over the whole image, masked, normalised."""
    image_to_grid = np.linalg.inv(grid_affine) @ image_affine
    out = np.stack(
        [
            ndimage.affine_transform(v, image_to_grid[:3, :3], image_to_grid[:3, 3], output_shape=mask.shape, order=1)
            for v in values
        ]
    )
    out *= mask
    total = out.sum(0)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


@pytest.mark.parametrize("oblique", [False, True])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_grid_to_image_equals_scipy_trilinear(oblique, layout):
    rng = np.random.default_rng(1)
    values = rng.random((4, 30, 28, 26)).astype(np.float32)
    grid_affine = np.eye(4)
    grid_affine[:3, 3] = [-15.0, -14.0, -13.0]
    image_affine = np.diag([-0.75, -0.75, 1.25, 1.0])
    image_affine[:3, 3] = [14.0, 12.0, -10.0]
    if oblique:
        c, s = np.cos(0.2), np.sin(0.2)
        image_affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ image_affine[:3, :3]
    mask = np.zeros((36, 34, 20), np.uint8)
    mask[5:30, 4:28, 3:18] = rng.integers(0, 3, (25, 24, 15))
    mask = np.asfortranarray(mask) if layout == "F" else mask
    out = grid_to_image(values, grid_affine, image_affine, mask.shape, mask > 0)
    expected = _grid_to_image_reference(values, grid_affine, image_affine, mask > 0)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[0].flags.f_contiguous if layout == "F" else out.flags.c_contiguous


def _subtype_labels_reference(probabilities, hu, lung_mask, decision, min_probability):
    """The boolean-indexing formulation subtype_labels had."""
    lung = lung_mask > 0
    labels = np.zeros(lung.shape, dtype=np.uint8)
    if decision == "argmax":
        labels[lung] = 1 + np.argmax(probabilities[:, lung], axis=0)
        return labels
    labels[lung] = 1
    low = lung & (hu < -950.0)
    p = probabilities[1:, low]
    best = np.argmax(p, axis=0)
    emphysema = np.take_along_axis(p, best[None], axis=0)[0] >= min_probability
    labels[low] = np.where(emphysema, best + 2, 1)
    return labels


@pytest.mark.parametrize("decision", ["attenuation", "argmax"])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_subtype_labels_equal_the_per_voxel_definition(decision, layout):
    rng = np.random.default_rng(2)
    shape = (20, 18, 16)
    probs = rng.dirichlet([4, 1, 1, 1], shape).transpose(3, 0, 1, 2).astype(np.float32)
    probs[2:, :5] = probs[1, :5]  # ties between subtypes go to the first, as argmax
    hu = rng.uniform(-1000, -900, shape).astype(np.float32)
    lung = np.zeros(shape, np.uint8)
    lung[2:18, 3:15, 1:14] = rng.integers(0, 3, (16, 12, 13))
    order = np.asfortranarray if layout == "F" else np.ascontiguousarray
    labels = subtype_labels(order(probs), order(hu), order(lung), decision, min_probability=0.15)
    np.testing.assert_array_equal(labels, _subtype_labels_reference(probs, hu, lung, decision, 0.15))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}  # every label occurs


def test_resample_to_grid_equals_scipy():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 5, (30, 20, 25)).astype(np.uint8)
    affine = np.diag([-0.7, 0.8, 1.3, 1.0])
    grid_affine = np.eye(4)
    grid_affine[:3, 3] = [-18.0, 1.0, 2.0]
    to_voxel = np.linalg.inv(affine) @ grid_affine
    for order in (0, 1):
        out = resample_to_grid(label, affine, grid_affine, (22, 18, 30), order=order)
        expected = ndimage.affine_transform(
            label, to_voxel[:3, :3], to_voxel[:3, 3], output_shape=(22, 18, 30), order=order
        )
        assert out.dtype == np.uint8
        assert np.abs(out.astype(int) - expected).max() <= order  # order 1: a .5 may round either way


def test_probabilities_are_written_as_rounded_255ths(tmp_path):
    prob = np.random.default_rng(4).random((4, 9, 8, 7)).astype(np.float32) * 1.2 - 0.1
    for layout in ("C", "F"):
        array = prob if layout == "C" else np.asfortranarray(prob.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
        path = save_probabilities(torch.from_numpy(array), np.eye(4), tmp_path / f"p{layout}.nii.gz")
        stored = np.asarray(nib.load(path).dataobj.get_unscaled())
        np.testing.assert_array_equal(stored, np.moveaxis(np.round(np.clip(prob, 0, 1) * 255.0), 0, -1))


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
    """The inferer and writer on a small synthetic chest (2 mm, RAS affine with flipped x/y), random weights."""
    torch.manual_seed(0)
    chest = make_chest(spacing=(2.0, 2.0, 2.5), fov_mm=(160.0, 120.0, 100.0))
    hu = chest.hu.copy()
    hu[chest.lungs == 1] -= 130.0  # the right lung is low-attenuation
    meta = {"filename_or_obj": "chest.nii.gz", "acquisition": {"slice_thickness": 5.0, "convolution_kernel": "B30f"}}
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(chest.affine), meta=meta)
    lung = MetaTensor(torch.from_numpy(chest.lungs)[None], affine=torch.from_numpy(chest.affine))
    data = {"image": image, "lung_mask": lung, "registration": RegistrationResult(np.eye(4)), "subject": "chest"}
    inferer = DenseSubtypeInferer(DrasCLRSubtypeNet(num_experts=2), stride=32, min_probability=0.0)
    out = inferer(data)
    subject_dir = tmp_path_factory.mktemp("dense") / "chest"
    DenseSubtypeWriter({"bundle": "test"})(out, subject_dir)
    return chest, hu, out, subject_dir


def test_inferer_outputs_in_the_input_geometry(inferred):
    chest, _, out, _ = inferred
    for key in ("subtype_prob", "subtype_label"):
        assert out[key].shape[1:] == chest.hu.shape
        np.testing.assert_array_equal(np.asarray(out[key].affine), chest.affine)
    prob = out["subtype_prob"].numpy()
    np.testing.assert_allclose(prob[:, chest.lungs > 0].sum(0), 1.0, rtol=1e-5)
    assert np.all(prob[:, chest.lungs == 0] == 0)


def test_labels_follow_the_lung_and_the_attenuation(inferred):
    chest, hu, out, _ = inferred
    label = out["subtype_label"].numpy()[0]
    np.testing.assert_array_equal(label > 0, chest.lungs > 0)
    low = (hu < -950) & (chest.lungs > 0)
    assert low.any() and np.all(label[low] >= 2)  # min_probability 0: every low-attenuation voxel is emphysema
    assert np.all(label[(chest.lungs > 0) & ~low] == 1)


def test_writer_files_share_the_input_geometry(inferred):
    chest, _, out, subject_dir = inferred
    for name, dtype in (("subtype_label", np.uint8), ("lung_mask", np.uint8), ("subtype_prob", np.uint8)):
        img = nib.load(subject_dir / f"{name}.nii.gz")
        assert img.shape[:3] == chest.hu.shape and img.get_data_dtype() == dtype
        np.testing.assert_allclose(img.affine, chest.affine, atol=1e-6)
    label = np.asarray(nib.load(subject_dir / "subtype_label.nii.gz").dataobj)
    np.testing.assert_array_equal(label, out["subtype_label"].numpy()[0])
    prob = nib.load(subject_dir / "subtype_prob.nii.gz").get_fdata()
    assert prob.shape == (*chest.hu.shape, 4)
    np.testing.assert_allclose(prob, np.moveaxis(out["subtype_prob"].numpy(), 0, -1), atol=0.5 / 255 + 1e-6)
    assert (subject_dir / "overview.png").stat().st_size > 10_000


def test_report_matches_emphysema_report_of_the_input(inferred):
    chest, hu, out, subject_dir = inferred
    report = json.loads((subject_dir / "report.json").read_text())
    expected = emphysema_report(hu, chest.lungs, chest.affine, out["subtype_label"].numpy()[0])
    assert report["laa950_percent"] == pytest.approx(expected["laa950_percent"], abs=1e-9)
    assert report["laa950_percent"] > 10.0
    assert report["regions"]["right"]["laa950_percent"] > report["regions"]["left"]["laa950_percent"]
    for key in ("perc15_hu", "lung_volume_ml", "subtype_fractions", "cle_grade", "pse_grade"):
        assert report[key] == pytest.approx(expected[key])
    for region in ("left", "right", "left_upper", "right_lower", "upper", "middle", "lower"):
        assert set(report["regions"][region]["subtype_fractions"]) == {
            "normal",
            "centrilobular",
            "paraseptal",
            "panlobular",
        }
    assert report["acquisition"]["slice_thickness_mm"] == 5.0
    assert report["acquisition"]["convolution_kernel"] == "B30f"
    assert report["acquisition"]["spacing_mm"] == pytest.approx([2.0, 2.0, 2.5])
    assert report["model"] == {"bundle": "test"} and report["drasclr_ext_version"]
