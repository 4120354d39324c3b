"""Fine-tuning and evaluating the dense emphysema bundle, as the model zoo tests bundles: ``train.json`` from the
command line in another working directory (one short epoch on coarse phantoms, one broken subject), then the
``evaluate.json`` overlay (in this process, from that directory: the command line's parsing is the training's), on a
copy of the bundle so the repository's weights stay as they are."""

from __future__ import annotations

import csv
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from drasclr_ext.bundle_files import large_file_hash
from drasclr_ext.checkpoint import load_bundle_weights, sha256sum
from drasclr_ext.data.phantom import write_phantom_cohort
from drasclr_ext.metrics.emphysema import laa950_percent
from drasclr_ext.networks.segmentation import DrasCLRSegNet
from tests.bundle_utils import PYTHON, bundle_dir, run_bundle_cli, run_workflow

NAME = "drasclr_emphysema_subtype"
# 2 iterations of 1 subject x 2 crops of 32^3; validation and evaluation on 64^3 windows without overlap, one at a
# time (the fewest network seconds on a CPU)
INFER = ["--overlap", "0.0", "--sw_batch_size", "1"]
FAST = ["--window", "32", "--validate#inferer#window", "64", *INFER, "--max_epochs", "1", "--epoch_length", "2"]
FAST += ["--batch_size", "1", "--crops_per_subject", "2", "--subject_repeats", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A copy of the bundle fine-tuned for 2 iterations on a coarse phantom plus one broken training scan. This run
    has no validation subjects (the weights are exported at the end); the two-process run below validates."""
    root = tmp_path_factory.mktemp("finetune")
    bundle = root / NAME
    shutil.copytree(bundle_dir(NAME), bundle, ignore=shutil.ignore_patterns("eval"))
    # seeds 7922-7924 (training, validation, test): small lungs and few voxels, about 60 windows of 64^3 each to
    # validate and evaluate (the validation and test subjects of seeds 7100-7102 needed about 100)
    datalist = write_phantom_cohort(root / "cohort", n=3, seed=7922, resolution_scale=4.0, severity="severe")
    content = json.loads(open(datalist).read())
    (root / "cohort" / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    content["training"].append({"image": "broken.nii.gz", "label": content["training"][0]["label"]})
    (root / "cohort" / "datalist.json").write_text(json.dumps(content))
    (root / "cohort" / "training_only.json").write_text(json.dumps({**content, "validation": []}))
    before = sha256sum(bundle / "models" / "model.pt")
    workdir = root / "elsewhere"
    workdir.mkdir()
    args = [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json")]
    args += ["--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle)]
    args += ["--dataset_dir", str(root / "cohort" / "training_only.json"), "--output_dir", str(root / "out"), *FAST]
    proc = run_bundle_cli(args, cwd=workdir)
    log = proc.stdout + proc.stderr
    return {"root": root, "bundle": bundle, "before": before, "datalist": root / "cohort" / "datalist.json", "log": log}


def test_training_rewrites_the_weights_and_their_listed_hash(trained):
    model = trained["bundle"] / "models" / "model.pt"
    assert sha256sum(model) != trained["before"]
    assert large_file_hash(trained["bundle"], model) == sha256sum(model)
    net = load_bundle_weights(DrasCLRSegNet(), model, trained["bundle"])
    pretrained = torch.load(trained["bundle"] / "models" / "pretrained_encoder.pt", weights_only=True)
    encoder = net.encoder.state_dict()
    floats = {k: v.to(encoder[k].dtype) for k, v in pretrained.items() if v.is_floating_point()}
    changed = [k for k, v in floats.items() if not torch.equal(encoder[k], v)]
    assert changed, "the encoder is trainable by default: fine-tuning must move its weights"
    assert list((trained["root"] / "out" / "checkpoints").glob("checkpoint_epoch=1.pt"))


def test_training_reports_its_key_metric(trained):
    """``train#key_metric``: the lung-voxel accuracy of the training windows, logged at the end of the epoch."""
    match = re.search(r"Epoch\[1\] Metrics -- train_accuracy: ([0-9.]+)", trained["log"])
    assert match, trained["log"][-3000:]
    assert 0.0 <= float(match.group(1)) <= 1.0


def test_a_broken_training_scan_is_listed_and_the_others_train(trained):
    with open(trained["root"] / "out" / "grid_cache" / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["broken"]
    assert rows[0]["error"] == "InputImageError"
    assert len(list((trained["root"] / "out" / "grid_cache").glob("*/done.json"))) == 1


def test_evaluate_writes_per_class_scores_and_laa950_errors(trained, monkeypatch):
    bundle, root = trained["bundle"], trained["root"]
    monkeypatch.chdir(root / "elsewhere")
    run_workflow(
        [str(bundle / "configs" / f) for f in ("train.json", "evaluate.json")],
        bundle,
        workflow_type=None,
        meta_file=str(bundle / "configs" / "metadata.json"),
        dataset_dir=str(trained["datalist"]),
        output_dir=str(root / "eval"),
        window=64,
        overlap=0.0,
        sw_batch_size=1,
    )
    assert not any((root / "elsewhere").iterdir())  # nothing written to the working directory
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["section"] == "test" and metrics["subjects_scored"] == 1
    for name in ("normal", "centrilobular", "paraseptal", "panlobular"):
        assert {f"dice_{name}", f"f1_{name}", f"auc_{name}", f"fraction_mae_{name}"} <= set(metrics)
    assert metrics["weights_sha256"] == sha256sum(bundle / "models" / "model.pt")
    assert (metrics["window"], metrics["overlap"]) == (64, 0.0)
    (row,) = metrics["subjects"]
    test_entry = json.loads(trained["datalist"].read_text())["test"][0]
    hu = np.asarray(nib.load(trained["datalist"].parent / test_entry["image"]).dataobj, dtype=np.float32)
    truth = np.asarray(nib.load(trained["datalist"].parent / test_entry["label"]).dataobj)
    assert row["laa950_percent_truth"] == pytest.approx(laa950_percent(hu, truth > 0))
    assert metrics["laa950_mae_pp"] == pytest.approx(abs(row["laa950_percent"] - row["laa950_percent_truth"]))
    assert sum(row["subtype_fractions_truth"].values()) == pytest.approx(1.0)
    assert sum(v for v in row["subtype_fractions"].values()) == pytest.approx(1.0)
    for name in ("normal", "centrilobular", "paraseptal", "panlobular"):
        # one subject: the pooled scores are its own
        assert metrics[f"dice_{name}"] == row["dice"][name]
        truth_share = np.count_nonzero(
            truth == {"normal": 1, "centrilobular": 2, "paraseptal": 3, "panlobular": 4}[name]
        )
        assert row["subtype_fractions_truth"][name] == pytest.approx(truth_share / np.count_nonzero(truth))
        error = abs(row["subtype_fractions"][name] - row["subtype_fractions_truth"][name])
        assert metrics[f"fraction_mae_{name}"] == pytest.approx(error)
    dice = [metrics[f"dice_{n}"] for n in ("normal", "centrilobular", "paraseptal", "panlobular")]
    assert dice[0] is not None  # normal lung is in both maps
    assert metrics["mean_dice"] == pytest.approx(np.mean([d for d in dice if d is not None]))


def test_two_process_training_with_the_multi_gpu_overlay(trained):
    """``torchrun`` with 2 CPU processes (gloo): DDP over the cached training grids, validation and export on rank 0."""
    bundle, root = trained["bundle"], trained["root"]
    model = bundle / "models" / "model.pt"
    before = sha256sum(model)
    files = [str(bundle / "configs" / f) for f in ("train.json", "multi_gpu_train.json")]
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run"]
    args += ["--config_file", json.dumps(files).replace('"', "'"), "--bundle_root", str(bundle)]
    args += ["--meta_file", str(bundle / "configs" / "metadata.json"), "--dataset_dir", str(trained["datalist"])]
    args += ["--output_dir", str(root / "ddp"), "--cache_dir", str(root / "out" / "grid_cache"), *FAST]
    args[args.index("--epoch_length") + 1] = "1"
    proc = run_bundle_cli(args, cwd=root / "elsewhere")
    log = proc.stdout + proc.stderr
    assert "Key metric: val_mean_dice" in log  # rank 0 validated (single-module inference)
    assert "train_accuracy" in log  # the overlay keeps train#key_metric
    assert sha256sum(model) != before  # and exported its best weights
    assert large_file_hash(bundle, model) == sha256sum(model)
    load_bundle_weights(DrasCLRSegNet(), model, bundle)
