"""Dense emphysema subtype inference: resampling to the input grid, labels, and the inferer (sliding windows over
the atlas grid) + writer on a small synthetic chest."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from drasclr_ext.geometry import grid_to_image, resample_to_grid
from drasclr_ext.inference.dense import (
    DenseSubtypeInferer,
    DenseSubtypeWriter,
    save_probabilities,
    subtype_labels,
)
from drasclr_ext.networks.segmentation import DrasCLRSegNet
from drasclr_ext.transforms.atlas_grid import atlas_grid
from drasclr_ext.transforms.patches import hu_window
from drasclr_ext.transforms.registration import RegistrationResult
from tests.measures_by_hand import measures_by_hand
from tests.synthetic_chest import make_chest


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


def test_subtype_labels_are_the_most_probable_class_inside_the_lung():
    probs = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # outside the lung
            [0.9, 0.1, 0.0, 0.0],
            [0.2, 0.5, 0.0, 0.3],
            [0.1, 0.0, 0.3, 0.6],
            [0.3, 0.0, 0.7, 0.0],
            [0.25, 0.25, 0.25, 0.25],  # a tie goes to the first class
        ],
        np.float32,
    ).T.reshape(4, 6, 1, 1)
    lung = np.array([0, 1, 2, 1, 2, 1], np.uint8).reshape(6, 1, 1)
    labels = subtype_labels(probs, lung)
    assert labels.dtype == np.uint8 and labels.shape == (6, 1, 1)
    np.testing.assert_array_equal(labels.ravel(), [0, 1, 2, 4, 3, 1])


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


def _subtype_labels_reference(probabilities, lung_mask):
    """Per voxel: 0 outside the lung, else 1 + the index of the largest probability (the first of ties)."""
    labels = np.zeros(lung_mask.shape, dtype=np.uint8)
    for index in zip(*np.nonzero(lung_mask)):
        labels[index] = 1 + int(np.argmax(probabilities[(slice(None), *index)]))
    return labels


@pytest.mark.parametrize("layout", ["C", "F"])
def test_subtype_labels_equal_the_per_voxel_definition(layout):
    rng = np.random.default_rng(2)
    shape = (20, 18, 16)
    probs = rng.dirichlet([1, 1, 1, 1], shape).transpose(3, 0, 1, 2).astype(np.float32)
    probs[1:, :5] = probs[0, :5]  # ties go to the first class, as argmax
    lung = np.zeros(shape, np.uint8)
    lung[2:18, 3:15, 1:14] = rng.integers(0, 3, (16, 12, 13))
    order = np.asfortranarray if layout == "F" else np.ascontiguousarray
    labels = subtype_labels(order(probs), order(lung))
    np.testing.assert_array_equal(labels, _subtype_labels_reference(probs, lung))
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}  # every label occurs
    assert labels.flags.f_contiguous if layout == "F" else labels.flags.c_contiguous


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


EMPHYSEMA_HU = -950.0


class AttenuationNet(torch.nn.Module):
    """A stand-in segmentation network with a known answer: centrilobular where the windowed CT is below -950 HU,
    normal elsewhere (steep logits), from the image channel of (B, 4, W, W, W) windows."""

    num_classes = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 4:
            raise ValueError(f"expected image + 3 location channels, got {x.shape[1]}")
        margin = 200.0 * (x[:, 0] - float(hu_window(np.float32(EMPHYSEMA_HU))))
        return torch.stack([margin, -margin, torch.full_like(margin, -50.0), torch.full_like(margin, -50.0)], 1)


def _chest_data():
    chest = make_chest(spacing=(2.0, 2.0, 2.5), fov_mm=(160.0, 120.0, 100.0))
    hu = chest.hu.copy()
    hu[chest.lungs == 1] -= 130.0  # the right lung is low-attenuation
    meta = {"filename_or_obj": "chest.nii.gz", "acquisition": {"slice_thickness": 5.0, "convolution_kernel": "B30f"}}
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(chest.affine), meta=meta)
    lung = MetaTensor(torch.from_numpy(chest.lungs)[None], affine=torch.from_numpy(chest.affine))
    data = {"image": image, "lung_mask": lung, "registration": RegistrationResult(np.eye(4)), "subject": "chest"}
    return chest, hu, data


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
    """The inferer (a small DrasCLRSegNet, random weights) and writer on a small synthetic chest (2 mm, RAS affine
    with flipped x/y)."""
    torch.manual_seed(0)
    chest, hu, data = _chest_data()
    net = DrasCLRSegNet(rep_dim=16, moco_dim=8, num_experts=2, decoder_channels=(8, 8, 8, 8))
    out = DenseSubtypeInferer(net, window=64, overlap=0.25)(data)
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


def test_labels_are_the_most_probable_class_in_the_lung_and_zero_outside(inferred):
    chest, _, out, _ = inferred
    label = out["subtype_label"].numpy()[0]
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label > 0, chest.lungs > 0)
    prob = out["subtype_prob"].numpy()
    lung = chest.lungs > 0
    np.testing.assert_array_equal(label[lung], 1 + np.argmax(prob[:, lung], axis=0))


def _window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis: every ``window * (1 - overlap)`` voxels, the last flush with the end."""
    step = int(window * (1 - overlap))
    return sorted(set(range(0, size - window, step)) | {size - window})


def _windows_with_lung(data, window: int, overlap: float) -> tuple[int, int, list[int]]:
    """(windows holding lung, all windows, grid shape) of the sliding windows over the subject's atlas grid."""
    grid = atlas_grid(data["image"], data["lung_mask"], data["registration"], "default", margin=4, min_size=window)
    starts = [_window_starts(n, window, overlap) for n in grid.shape]
    with_lung = sum(
        bool(grid.lung[x : x + window, y : y + window, z : z + window].any())
        for x in starts[0]
        for y in starts[1]
        for z in starts[2]
    )
    return with_lung, int(np.prod([len(s) for s in starts])), list(grid.shape)


def test_dense_info_counts_the_windows_with_lung(inferred):
    _, _, out, _ = inferred
    with_lung, total, shape = _windows_with_lung(_chest_data()[2], 64, 0.25)
    info = out["dense_info"]
    assert info["grid_shape"] == shape and min(shape) >= 64
    assert info["windows"] == with_lung > 1
    assert (info["window"], info["overlap"], info["sigma_scale"], info["autocast"]) == (64, 0.25, 0.125, False)
    assert set(info["timings"]) == {"atlas_grid_s", "network_s", "to_input_grid_s"}


@pytest.mark.parametrize("window, overlap", [(32, 0.0), (64, 0.25)])
def test_maps_follow_the_anatomy_through_the_grid_and_back(window, overlap):
    """With a network whose answer is known (CLE below -950 HU), the labels in the input geometry are CLE in the
    low-attenuation right lung and normal in the left: the atlas grid, the windows and the way back line up. Only
    the windows that hold lung are computed."""
    chest, hu, data = _chest_data()
    out = DenseSubtypeInferer(AttenuationNet(), window=window, overlap=overlap)(data)
    label = out["subtype_label"].numpy()[0]
    # the lungs reach the edge of this small scan, where the grid reads -1024 HU beyond the last voxel centres:
    # the outermost voxel layer is left out
    inner = np.zeros(hu.shape, bool)
    inner[1:-1, 1:-1, 1:-1] = True
    right, left = (chest.lungs == 1) & inner, (chest.lungs == 2) & inner
    assert np.mean(label[right & ~chest.vessels] == 2) > 0.95
    assert np.all(label[left] == 1)
    lung = (chest.lungs > 0) & inner
    low = hu < EMPHYSEMA_HU
    assert np.mean((label == 2)[lung] == low[lung]) > 0.97
    assert set(np.unique(label)) == {0, 1, 2}
    with_lung, total, _ = _windows_with_lung(data, window, overlap)
    assert out["dense_info"]["windows"] == with_lung
    if window == 32:
        assert with_lung < total  # some windows hold no lung, and are skipped


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


def test_report_measures_the_input(inferred):
    chest, hu, out, subject_dir = inferred
    report = json.loads((subject_dir / "report.json").read_text())
    by_hand = measures_by_hand(hu, chest.lungs, chest.affine, out["subtype_label"].numpy()[0])
    for key in ("laa950_percent", "perc15_hu", "lung_volume_ml"):
        assert report[key] == pytest.approx(by_hand[key], rel=1e-9)
    assert report["subtype_fractions"] == pytest.approx(by_hand["subtype_fractions"], abs=1e-12)
    assert report["regions"]["right"]["laa950_percent"] == pytest.approx(by_hand["right_laa950_percent"])
    assert report["regions"]["left"]["laa950_percent"] == pytest.approx(by_hand["left_laa950_percent"])
    assert report["laa950_percent"] > 10.0
    assert report["regions"]["right"]["laa950_percent"] > report["regions"]["left"]["laa950_percent"]
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


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)]
)
def test_autocast_auto_uses_bfloat16_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    from drasclr_ext.inference.dense import native_bfloat16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert native_bfloat16("cpu") is expected
    assert DenseSubtypeInferer(torch.nn.Identity(), autocast="auto").autocast is expected
    assert DenseSubtypeInferer(torch.nn.Identity(), autocast=True).autocast is True
