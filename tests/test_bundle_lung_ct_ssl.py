"""The pretraining bundle, as the model zoo tests bundles: metadata, network checks, train, resume, multi-process
training, and embeddings of a phantom and of the real chest CT (TCIA Lung-PET-CT-Dx A0001, CC BY 4.0)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from drasclr_ext.atlas import load_atlas
from drasclr_ext.checkpoint import load_bundle_weights
from drasclr_ext.errors import CheckpointError
from drasclr_ext.networks import DrasCLRFeatures
from drasclr_ext.preprocess.cohort import preprocess_cohort
from tests.bundle_utils import (
    PYTHON,
    bundle_dir,
    check_metadata,
    check_network_export,
    config,
    run_bundle_cli,
    write_small_phantom,
)

NAME = "drasclr_lung_ct_ssl"
BUNDLE = bundle_dir(NAME)
META = str(BUNDLE / "configs" / "metadata.json")
TINY = {"batch_size": 2, "queue_size": 8, "num_workers": 0, "train#trainer#epoch_length": 2}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """One small phantom, preprocessed into a patch store (the pretraining input)."""
    scans = tmp_path_factory.mktemp("scans")
    write_small_phantom(scans)
    out = tmp_path_factory.mktemp("preprocessed")
    summary = preprocess_cohort(scans, out, progress=False)
    assert summary["failed"] == 0
    return out


def test_metadata_follows_the_schema():
    check_metadata(NAME)


def test_network_in_out_and_torchscript_export(tmp_path):
    check_network_export(NAME, DrasCLRFeatures(), tmp_path)


def test_shipped_weights_match_large_files_hash(tmp_path):
    tampered = tmp_path / "bundle"
    (tampered / "models").mkdir(parents=True)
    (tampered / "large_files.yml").write_text((BUNDLE / "large_files.yml").read_text())
    data = bytearray((BUNDLE / "models" / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (tampered / "models" / "model.pt").write_bytes(bytes(data))
    load_bundle_weights(DrasCLRFeatures(), BUNDLE / "models" / "model.pt", BUNDLE)  # the shipped file passes
    with pytest.raises(CheckpointError, match="sha256"):
        load_bundle_weights(DrasCLRFeatures(), tampered / "models" / "model.pt", tampered)


def train_workflow(preprocessed, ckpt_dir, **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=config(NAME, "train.json"),
        meta_file=META,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(preprocessed),
        ckpt_dir=str(ckpt_dir),
        output_dir=str(ckpt_dir.parent / "eval"),
        **{**TINY, **overrides},
    )


def test_train_then_resume(preprocessed, tmp_path):
    ckpt_dir = tmp_path / "models"
    workflow = train_workflow(preprocessed, ckpt_dir, epochs=1)
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    assert (ckpt_dir / "checkpoint_epoch=1.pt").is_file() and (ckpt_dir / "model.pt").is_file()
    first = torch.load(ckpt_dir / "model.pt", weights_only=True)

    resumed = train_workflow(preprocessed, ckpt_dir, epochs=2, resume=True)
    resumed.initialize()
    resumed.run()
    trainer = resumed.trainer
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4  # continued, not restarted
    assert 0.0 <= trainer.state.metrics["train_acc_local"] <= 1.0  # train#key_metric: the epoch's top-1 accuracy
    resumed.finalize()
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint_*")) == ["checkpoint_epoch=2.pt"]
    second = torch.load(ckpt_dir / "model.pt", weights_only=True)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "eval").is_dir() and any((tmp_path / "eval").iterdir())  # TensorBoard events


def test_multi_gpu_config_on_two_cpu_processes(preprocessed, tmp_path):
    args = [
        PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run",
        "--config_file", str(config(NAME, "train.json", "multi_gpu_train.json")),
        "--meta_file", META,
        "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(preprocessed),
        "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "eval"),
        "--epochs", "1",
    ]  # fmt: skip
    for key, value in TINY.items():
        args += [f"--{key}", str(value)]
    proc = run_bundle_cli(args, cwd=tmp_path)
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "Epoch[1] Complete" in proc.stdout + proc.stderr


def test_embeddings_of_a_phantom_and_the_real_ct(tmp_path, lung_ct_dir):
    scans = tmp_path / "scans"
    phantom = write_small_phantom(scans, seed=12, name="phantom")
    broken = scans / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b truncated")
    datalist = tmp_path / "datalist.json"
    entries = [{"image": str(phantom)}, {"image": str(lung_ct_dir)}, {"image": str(broken)}]
    datalist.write_text(json.dumps({"test": entries}))
    out = tmp_path / "embeddings"
    workflow = ConfigWorkflow(
        config_file=config(NAME, "inference.json"),
        meta_file=META,
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        dataset_dir=str(datalist),
        output_dir=str(out),
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    n = load_atlas("default").num_landmarks
    for subject in ("phantom", lung_ct_dir.name):
        manifest = json.loads((out / subject / "manifest.json").read_text())
        patches = np.load(out / subject / "patch_embeddings.npy")
        assert patches.shape == (n, 128) and np.isfinite(patches).all()
        np.testing.assert_allclose(np.load(out / subject / "patient_embedding.npy"), patches.mean(0), rtol=1e-5)
        assert manifest["files"]["patch_embeddings"]["shape"] == [n, 128]
        assert manifest["registration_dice"] > 0.5
    real = json.loads((out / lung_ct_dir.name / "manifest.json").read_text())
    assert [flag["flag"] for flag in real["quality"]] == ["thick_slices"]  # 5 mm slices
    with open(out / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["subject"] for row in rows] == ["broken"]
    assert rows[0]["error"] == "InputImageError" and "could not read" in rows[0]["reason"]  # our message, unwrapped
