"""The pieces of fine-tuning and evaluation: labelled datalists, label maps, training grids and their crops, scores,
optimiser groups, the subject inferer, exports."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import DataLoader, MetaTensor

from drasclr_ext.bundle_files import large_file_hash, record_large_file
from drasclr_ext.checkpoint import sha256sum
from drasclr_ext.data.labelled import LabelledGridDataset, labelled_subjects
from drasclr_ext.engines.finetune import (
    SubjectDenseInferer,
    first_item,
    lung_voxels,
    param_groups,
    prepare_subject_batch,
)
from drasclr_ext.errors import CheckpointError, DrasCLRError, InputImageError
from drasclr_ext.handlers import WeightsExporter
from drasclr_ext.metrics.emphysema import laa950_percent
from drasclr_ext.metrics.subtype import SubtypeMetric, SubtypeScores, roc_auc
from drasclr_ext.networks.segmentation import DrasCLRSegNet
from drasclr_ext.transforms.atlas_grid import location_channels
from drasclr_ext.transforms.io import load_ct
from drasclr_ext.transforms.labels import LoadLabelMapd
from drasclr_ext.transforms.registration import RegistrationResult
from tests.bundle_utils import config
from tests.synthetic_chest import make_chest

SMALL_NET = {"rep_dim": 16, "moco_dim": 8, "num_experts": 2, "decoder_channels": (8, 8, 8, 8)}


def _datalist(tmp_path, n: int = 20):
    entries = [{"image": f"s{i:02d}.nii.gz", "label": f"s{i:02d}_label.nii.gz"} for i in range(n)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": entries[:2]}))
    return path


def test_label_fractions_are_nested_seeded_subsets_with_absolute_paths(tmp_path):
    path = _datalist(tmp_path)
    subsets = {f: labelled_subjects(path, "training", f, seed=3) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(s) for s in subsets.values()] == [2, 5, 10, 20]
    names = {f: {s["subject"] for s in subset} for f, subset in subsets.items()}
    assert names[0.1] <= names[0.25] <= names[0.5] <= names[1.0]
    assert names[0.25] != {s["subject"] for s in labelled_subjects(path, "training", 0.25, seed=4)}
    assert subsets[1.0][0]["image"] == str(tmp_path / "s00.nii.gz")
    assert labelled_subjects(path, "test") == []
    with pytest.raises(DrasCLRError, match="label_fraction"):
        labelled_subjects(path, "training", 0.0)


def test_a_datalist_entry_without_a_label_is_refused(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(DrasCLRError, match="'image' and 'label'"):
        labelled_subjects(path)


def _scan_and_label(tmp_path, label_affine=None, label_values=(0, 1, 2), label_shape=None, label_dtype=np.uint8):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    hu = np.full((12, 10, 8), -1000, dtype=np.int16)
    hu[:, 5:] = 40  # air and soft tissue: a plausible CT
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    label = np.zeros(label_shape or hu.shape, dtype=label_dtype)
    label[2:6, 2:6, 2:6] = label_values[1]
    label[6:9, 2:6, 2:6] = label_values[2]
    nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), tmp_path / "label.nii.gz")
    return {"image": load_ct(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")}, label


def test_label_maps_load_on_the_image_grid(tmp_path):
    data, label = _scan_and_label(tmp_path, label_values=(0, 3, 4))
    out = LoadLabelMapd("label")(data)
    assert out["label"].dtype == torch.uint8
    np.testing.assert_array_equal(out["label"].numpy(), label)
    np.testing.assert_allclose(out["label"].affine.numpy(), np.diag([1.5, 1.5, 2.0, 1.0]))


@pytest.mark.parametrize(
    "case, kwargs, message",
    [
        ("other affine", {"label_affine": np.diag([1.0, 1.0, 1.0, 1.0])}, "does not lie on the grid"),
        (
            "shifted by 2 mm",
            {"label_affine": np.array([[1.5, 0, 0, 2.0], [0, 1.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])},
            "does not lie on the grid",
        ),
        ("other shape", {"label_shape": (12, 10, 9)}, "does not lie on the grid"),
        ("value 7", {"label_values": (0, 1, 7)}, "emphysema labels"),
        ("value 5", {"label_values": (0, 5, 2)}, "emphysema labels"),
        ("value -1", {"label_values": (0, 1, -1), "label_dtype": np.int16}, "emphysema labels"),
    ],
)
def test_label_maps_off_the_grid_or_with_unknown_labels_are_refused(tmp_path, case, kwargs, message):
    data, _ = _scan_and_label(tmp_path, **kwargs)
    with pytest.raises(InputImageError, match=message):
        LoadLabelMapd("label")(data)


def _two_lungs():
    """Right lung (label 1) at x < 10, left (2) at x >= 10; 30 slices high so each third has 10."""
    lung = np.zeros((20, 6, 30), dtype=np.uint8)
    lung[1:9, 1:5] = 1
    lung[11:19, 1:5] = 2
    return lung, np.eye(4)


def test_perfect_maps_score_one_and_errors_zero():
    lung, affine = _two_lungs()
    truth = np.where(lung > 0, 1, 0).astype(np.uint8)
    truth[1:5, 1:5, 20:] = 2  # CLE in half of the right upper zone
    hu = np.where(truth == 2, -980.0, -850.0)
    prob = np.stack([(truth == v).astype(np.float32) for v in (1, 2, 3, 4)])
    scores = SubtypeScores(presence_fraction=0.01)
    scores.add("a", truth, prob, truth, hu, lung, affine)
    out = scores.compute()
    assert out["dice_normal"] == out["dice_centrilobular"] == 1.0
    assert out["dice_paraseptal"] is None and out["mean_dice"] == 1.0
    assert out["f1_centrilobular"] == 1.0 and out["auc_centrilobular"] == 1.0
    assert out["auc_normal"] is None  # normal lung is in every zone
    assert out["zones_scored"] == 6
    assert out["laa950_mae_pp"] == 0.0 and out["fraction_mae_centrilobular"] == 0.0
    assert scores.subjects[0]["laa950_percent"] == pytest.approx(laa950_percent(hu, lung))


def test_dice_counts_are_pooled_over_subjects():
    lung, affine = _two_lungs()
    truth = np.where(lung > 0, 1, 0).astype(np.uint8)
    truth[1:9, 1:5, 25:] = 2  # 8 * 4 * 5 = 160 CLE voxels
    pred = truth.copy()
    pred[1:9, 1:5, 20:25] = 2  # 160 false CLE voxels
    prob = np.stack([(pred == v).astype(np.float32) for v in (1, 2, 3, 4)])
    hu = np.full(lung.shape, -850.0)
    scores = SubtypeScores()
    scores.add("a", pred, prob, truth, hu, lung, affine)
    scores.add("b", truth, np.stack([(truth == v).astype(np.float32) for v in (1, 2, 3, 4)]), truth, hu, lung, affine)
    out = scores.compute()
    # CLE: TP 320, FP 160, FN 0 -> 640 / 800
    assert out["dice_centrilobular"] == pytest.approx(640 / 800)
    assert out["fraction_mae_centrilobular"] == pytest.approx((160 / np.count_nonzero(lung)) / 2)
    assert [row["dice"]["centrilobular"] for row in scores.subjects] == pytest.approx([2 / 3, 1.0])


def test_one_key_metric_scores_each_subject_once_and_reports_every_score():
    from ignite.engine import Engine
    from monai.data import MetaTensor

    lung, affine = _two_lungs()
    truth = np.where(lung > 0, 1, 0).astype(np.uint8)
    truth[1:9, 1:5, 25:] = 2
    pred = truth.copy()
    pred[1:9, 1:5, 20:25] = 2  # as above: CLE Dice 2/3 on this subject
    prob = np.stack([(pred == v).astype(np.float32) for v in (1, 2, 3, 4)])
    hu = MetaTensor(np.full(lung.shape, -850.0, dtype=np.float32)[None], affine=affine)
    output = {"pred": {"subtype_label": pred, "subtype_prob": prob, "image": hu, "lung_mask": lung, "subject": "a"}}
    output["label"] = truth
    metric = SubtypeMetric(key="mean_dice", prefix="val_", all_scores=True)
    engine = Engine(lambda engine, batch: output)
    metric.attach(engine, "val_mean_dice")
    engine.run([0], max_epochs=1)
    metrics = engine.state.metrics
    assert len(metric.scores.subjects) == 1  # scored once
    assert metrics["val_dice_centrilobular"] == pytest.approx(2 / 3)
    assert metrics["val_mean_dice"] == pytest.approx(np.mean([metrics["val_dice_normal"], 2 / 3]))
    assert np.isnan(metrics["val_dice_paraseptal"]) and "val_f1_centrilobular" in metrics


def test_roc_auc_counts_ties_as_half():
    assert roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.3, 0.2]), np.array([1, 1])) is None


def test_param_groups_follow_freezing_and_the_encoder_scale():
    net = DrasCLRSegNet(**SMALL_NET)
    groups = param_groups(net, 1e-3, 0.1)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    encoder = {id(p) for n, p in net.named_parameters() if n.startswith("encoder.") and p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == encoder
    assert not any(id(p) in trainable for p in net.encoder.fc.parameters())  # the projection is never trained
    assert len(param_groups(net, 1e-3, 0.0)) == 1
    frozen = DrasCLRSegNet(**SMALL_NET, freeze_encoder=True)
    (decoder,) = param_groups(frozen, 1e-3, 0.1)
    expected = sum(p.numel() for n, p in frozen.named_parameters() if not n.startswith("encoder."))
    assert sum(p.numel() for p in decoder["params"]) == expected > 0


def test_subject_batches_pass_the_whole_dict_and_its_label():
    batch = {"image": torch.zeros(3, 3, 3), "label": torch.ones(3, 3, 3), "subject": "a"}
    data, label = prepare_subject_batch(batch, "cpu")
    assert data is batch and label is batch["label"]
    assert first_item([batch]) is batch
    with pytest.raises(ValueError, match="batch_size 1"):
        first_item([batch, batch])


def test_train_accuracy_counts_the_lung_voxels_only():
    """``train#key_metric`` of train.json: ignite's Accuracy over the lung voxels (label 0 outside is ignored)."""
    from ignite.metrics import Accuracy

    label = torch.tensor([[0, 1, 2, 4], [0, 0, 3, 3]]).reshape(2, 1, 4)  # 5 lung voxels, classes 1..4
    pred = torch.full((2, 4, 4), -5.0)
    for b, v, c in [(0, 0, 3), (0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 0, 1), (1, 1, 1), (1, 2, 2), (1, 3, 0)]:
        pred[b, c, v] = 5.0  # right: (0, 1), (0, 2), (1, 2); wrong: (0, 3), (1, 3); the rest is outside the lung
    logits, target = lung_voxels({"pred": pred, "label": label})
    assert logits.shape == (5, 4) and target.tolist() == [0, 1, 3, 2, 2]
    accuracy = Accuracy()
    accuracy.update((logits, target))
    assert accuracy.compute() == pytest.approx(3 / 5)


def test_the_subject_inferer_maps_a_subject_in_eval_mode_and_restores_training():
    chest = make_chest(spacing=(3.0, 3.0, 3.0), fov_mm=(120.0, 90.0, 60.0))
    affine = torch.from_numpy(chest.affine)
    data = {
        "image": MetaTensor(torch.from_numpy(chest.hu)[None], affine=affine),
        "lung_mask": MetaTensor(torch.from_numpy(chest.lungs)[None], affine=affine),
        "registration": RegistrationResult(np.eye(4)),
    }
    torch.manual_seed(0)
    net = DrasCLRSegNet(**SMALL_NET).train()
    statistics = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    out = SubjectDenseInferer(window=64, overlap=0.0)(data, net)
    assert net.training  # the engine's mode is restored
    for key, value in net.state_dict().items():  # and inference ran in eval mode: no BatchNorm update
        if "running" in key:
            assert torch.equal(value, statistics[key]), key
    label = out["subtype_label"].numpy()[0]
    assert label.shape == chest.hu.shape
    np.testing.assert_array_equal(label > 0, chest.lungs > 0)
    assert out["dense_info"]["windows"] >= 1


# ---------------------------------------------------------------------------------------- training grids


def _labelled_chest(folder, seed=0):
    """A coarse synthetic chest (4 mm, the lungs inside the field of view) with emphysema labels: CLE in the right
    upper lung, PLE in the left lower lung, a tiny PSE spot; the lung mask is the labelled voxels."""
    chest = make_chest(spacing=(4.0, 4.0, 4.0), fov_mm=(296.0, 200.0, 256.0), seed=seed)
    assert not chest.lungs[[0, -1]].any() and not chest.lungs[:, [0, -1]].any() and not chest.lungs[..., [0, -1]].any()
    z = np.arange(chest.hu.shape[2])[None, None, :]
    label = np.where(chest.lungs > 0, 1, 0).astype(np.uint8)
    label[(chest.lungs == 1) & (z >= 36)] = 2
    label[(chest.lungs == 2) & (z < 22)] = 4
    spot = np.argwhere(chest.lungs == 2)[len(np.argwhere(chest.lungs == 2)) // 2]
    label[spot[0] : spot[0] + 2, spot[1] : spot[1] + 2, spot[2] : spot[2] + 2] = 3
    label[chest.lungs == 0] = 0
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(chest.hu.astype(np.int16), chest.affine), folder / f"chest{seed}.nii.gz")
    nib.save(nib.Nifti1Image(label, chest.affine), folder / f"chest{seed}_label.nii.gz")
    entry = {"image": str(folder / f"chest{seed}.nii.gz"), "label": str(folder / f"chest{seed}_label.nii.gz")}
    return {**entry, "subject": f"chest{seed}"}, label, chest.affine


class Preprocessing:
    """The bundle's preprocessing without the lung mask model and the registration: labels read and checked, the
    lung mask is the labelled voxels, the atlas map the identity. Counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, d):
        self.calls.append(d["subject"])
        d = LoadLabelMapd("label")({**d, "image": load_ct(d["image"])})
        d["lung_mask"] = MetaTensor((d["label"].as_tensor() > 0).to(torch.uint8)[None], affine=d["label"].affine)
        d["registration"] = RegistrationResult(np.eye(4))
        return d


@pytest.fixture(scope="module")
def training_grids(tmp_path_factory):
    root = tmp_path_factory.mktemp("grids")
    subject, label, affine = _labelled_chest(root / "data")
    broken = {"image": str(root / "data" / "broken.nii.gz"), "label": subject["label"], "subject": "broken"}
    (root / "data" / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    preprocessing = Preprocessing()
    dataset = LabelledGridDataset(
        [subject, broken], preprocessing, root / "cache", window=32, repeats=3, progress=False
    )
    return {"root": root, "dataset": dataset, "label": label, "affine": affine, "subject": subject, "broken": broken}


def test_training_grids_hold_the_labels_on_the_1mm_atlas_grid(training_grids):
    dataset, label = training_grids["dataset"], training_grids["label"]
    assert len(dataset) == 3 and dataset.subjects == ["chest0"]  # one subject, three times per epoch
    item = dataset[0]
    image, grid_label = item["image"], item["label"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32 and image.shape[0] == 1
    assert grid_label.dtype == torch.uint8 and grid_label.shape == image.shape and min(image.shape[1:]) >= 32
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0), 1.0)  # 1 mm voxels
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0  # windowed CT
    # each class keeps its volume: 64 mm^3 per input voxel, 1 mm^3 per grid voxel
    grid_counts = np.bincount(grid_label.numpy().ravel(), minlength=5)[1:]
    input_counts = np.bincount(label.ravel(), minlength=5)[1:] * 64.0
    np.testing.assert_allclose(grid_counts, input_counts, rtol=0.02)
    # grid voxels take the label of the input voxel they fall in
    world = np.argwhere(grid_label.numpy()[0] == 2)[::97]
    world = world @ image.affine.numpy()[:3, :3].T + image.affine.numpy()[:3, 3]
    voxel = np.rint((world - training_grids["affine"][:3, 3]) @ np.linalg.inv(training_grids["affine"][:3, :3]).T)
    assert np.mean(label[tuple(voxel.astype(int).T)] == 2) > 0.95
    for c in range(5):  # the class-balanced sampler's indices point at voxels of their class
        indices = np.asarray(item["label_cls_indices"][c])
        assert len(indices) == min((grid_label.numpy() == c).sum(), 100_000)  # max_samples_per_class
        assert np.all(grid_label.numpy().ravel()[indices] == c)
    balance = dataset.class_balance()
    assert list(balance) == ["normal", "centrilobular", "paraseptal", "panlobular"]
    np.testing.assert_allclose(list(balance.values()), grid_counts / grid_counts.sum())


def test_training_grids_are_cached_and_a_broken_scan_is_listed(training_grids):
    root = training_grids["root"]
    with open(root / "cache" / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["broken"] and rows[0]["error"] == "InputImageError"
    assert len(list((root / "cache").glob("chest0_*/done.json"))) == 1
    again = Preprocessing()
    cached = LabelledGridDataset([training_grids["subject"]], again, root / "cache", window=32, progress=False)
    assert again.calls == []  # read back from the cache
    first, second = training_grids["dataset"][0], cached[0]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["label"], second["label"])
    np.testing.assert_array_equal(first["world_to_atlas"], second["world_to_atlas"])
    with pytest.raises(DrasCLRError, match="none of the 1 training subjects"):
        LabelledGridDataset([training_grids["broken"]], again, root / "cache2", window=32, progress=False)


def test_train_json_crops_are_windows_with_location_channels_centred_in_the_lung(training_grids):
    parser = ConfigParser()
    parser.read_config(config("drasclr_emphysema_subtype", "train.json")[0])
    parser["window"], parser["crops_per_subject"] = 32, 8
    transform = parser.get_parsed_content("train#dataset#transform")
    transform.set_random_state(1)
    dataset = training_grids["dataset"]
    dataset.transform = transform
    try:
        crops = dataset[0]
        batch = next(iter(DataLoader(dataset, batch_size=2, shuffle=False)))
    finally:
        dataset.transform = None
    assert len(crops) == 8 and all(set(c) == {"image", "label"} for c in crops)
    centres = set()
    for crop in crops:
        assert crop["image"].shape == (4, 32, 32, 32) and crop["label"].shape == (1, 32, 32, 32)
        centres.add(int(crop["label"][0, 16, 16, 16]))
    assert 0 not in centres and len(centres) >= 3  # class-balanced: centred on lung voxels of several classes
    assert batch["image"].shape == (16, 4, 32, 32, 32) and batch["label"].shape == (16, 1, 32, 32, 32)
    item = dataset[0]
    world_to_atlas, scale = item["world_to_atlas"], item["location_scale"]
    for crop in crops:  # the location channels are those of the crop's place (after the random affine)
        expected = location_channels(crop["image"].affine.numpy(), (32, 32, 32), world_to_atlas, scale)
        np.testing.assert_allclose(crop["image"][1:].numpy(), expected, atol=1e-4)


def test_exported_weights_update_the_bundle_listing(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    listing = {
        "large_files": [
            {"path": "models/model.pt", "url": "https://x/model.pt", "hash_val": "0" * 64, "hash_type": "sha256"}
        ]
    }
    (bundle / "large_files.yml").write_text(yaml.safe_dump(listing))
    net = torch.nn.Linear(3, 2)
    WeightsExporter(net, str(bundle / "models" / "model.pt"), bundle_root=str(bundle))()
    model = bundle / "models" / "model.pt"
    assert large_file_hash(bundle, model) == sha256sum(model)
    entry = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"][0]
    assert entry["url"] == "https://x/model.pt"  # the rest of the entry stays
    with pytest.raises(CheckpointError, match="not inside the bundle"):
        record_large_file(bundle, tmp_path / "elsewhere.pt")


def test_best_weights_are_exported_only_when_the_key_metric_improves(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = tmp_path / "model.pt"
    exporter = WeightsExporter(net, str(path), on_best=True)
    engine = Engine(lambda e, b: None)
    exporter.attach(engine)
    for epoch, best, best_epoch in ((1, 0.5, 1), (2, 0.5, 1), (3, 0.7, 3)):
        engine.state.epoch, engine.state.best_metric, engine.state.best_metric_epoch = epoch, best, best_epoch
        with torch.no_grad():
            net.weight.fill_(epoch)
        exporter._export_if_best(engine)
        assert torch.load(path, weights_only=True)["weight"][0, 0] == {1: 1, 2: 1, 3: 3}[epoch]
