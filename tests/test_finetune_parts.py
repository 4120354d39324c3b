"""The pieces of fine-tuning and evaluation: labelled datalists, label maps, scores, optimiser groups, exports."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from ignite.engine import Engine

from drasclr_ext.checkpoint import large_file_hash, record_large_file, sha256sum
from drasclr_ext.data.labelled import LoadLabelMapd, labelled_subjects
from drasclr_ext.engines.finetune import param_groups, prepare_window_batch
from drasclr_ext.errors import CheckpointError, DrasCLRError, InputImageError
from drasclr_ext.handlers import WeightsExporter
from drasclr_ext.metrics.emphysema import laa950_percent
from drasclr_ext.metrics.subtype import SubtypeScores, roc_auc
from drasclr_ext.networks.heads import DrasCLRSubtypeNet
from drasclr_ext.transforms.io import load_ct


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


def _scan_and_label(tmp_path, label_affine=None, label_values=(0, 1, 2)):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    hu = np.full((12, 10, 8), -1000, dtype=np.int16)
    hu[:, 5:] = 40  # air and soft tissue: a plausible CT
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[2:6, 2:6, 2:6] = label_values[1]
    label[6:9, 2:6, 2:6] = label_values[2]
    nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), tmp_path / "label.nii.gz")
    return {"image": load_ct(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "label.nii.gz")}, label


def test_label_maps_load_on_the_image_grid(tmp_path):
    data, label = _scan_and_label(tmp_path)
    out = LoadLabelMapd("label")(data)
    assert out["label"].dtype == torch.uint8
    np.testing.assert_array_equal(out["label"].numpy(), label)
    np.testing.assert_allclose(out["label"].affine.numpy(), np.diag([1.5, 1.5, 2.0, 1.0]))


def test_label_maps_off_the_grid_or_with_unknown_labels_are_refused(tmp_path):
    data, _ = _scan_and_label(tmp_path, label_affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputImageError, match="does not lie on the grid"):
        LoadLabelMapd("label")(data)
    data, _ = _scan_and_label(tmp_path, label_values=(0, 1, 7))
    with pytest.raises(InputImageError, match="emphysema labels"):
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


def test_roc_auc_counts_ties_as_half():
    assert roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.3, 0.2]), np.array([1, 1])) is None


def test_param_groups_follow_freezing_and_the_encoder_scale():
    net = DrasCLRSubtypeNet(rep_dim=16, moco_dim=8, num_experts=2, hidden=8)
    groups = param_groups(net, 1e-3, 0.1)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in net.parameters())
    frozen = DrasCLRSubtypeNet(rep_dim=16, moco_dim=8, num_experts=2, hidden=8, freeze_encoder=True)
    (head,) = param_groups(frozen, 1e-3, 0.1)
    assert sum(p.numel() for p in head["params"]) == sum(p.numel() for p in frozen.head.parameters())


def test_window_batches_call_the_network_with_their_locations():
    net = DrasCLRSubtypeNet(rep_dim=16, moco_dim=8, num_experts=2, hidden=8).eval()
    batch = {"image": torch.rand(2, 1, 32, 32, 32), "location": torch.rand(2, 3), "label": torch.rand(2, 4)}
    x, y, args, kwargs = prepare_window_batch(batch, "cpu")
    assert y is batch["label"] and kwargs == {}
    torch.testing.assert_close(net(x, *args), net(batch["image"], batch["location"]))


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
