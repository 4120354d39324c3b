"""The dense emphysema subtype bundle, as the model zoo tests bundles: metadata, network checks, shipped weights,
the embedded-phantom inference run and a broken input."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from drasclr_ext.bundle_files import large_file_hash
from drasclr_ext.checkpoint import load_bundle_weights, sha256sum
from drasclr_ext.errors import CheckpointError
from drasclr_ext.metrics.emphysema import laa950_percent
from drasclr_ext.networks.segmentation import DrasCLRSegNet
from drasclr_ext.transforms.io import load_ct
from tests.bundle_utils import bundle_dir, check_metadata, check_network_export, config
from tests.measures_by_hand import measures_by_hand

NAME = "drasclr_emphysema_subtype"
BUNDLE = bundle_dir(NAME)
META = str(BUNDLE / "configs" / "metadata.json")
MODEL = BUNDLE / "models" / "model.pt"
# a coarse phantom; 64^3 windows without overlap, one at a time (the fewest network seconds on a CPU)
FAST = {"phantom_resolution_scale": 4.0, "overlap": 0.0, "sw_batch_size": 1}


def inference_workflow(output_dir, **overrides) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=config(NAME, "inference.json"),
        meta_file=META,
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        **{**FAST, **overrides},
    )


def test_metadata_follows_the_schema():
    check_metadata(NAME)


def test_network_in_out_and_torchscript_export(tmp_path):
    check_network_export(NAME, DrasCLRSegNet(), tmp_path)


def test_shipped_weights_match_their_hash_and_the_pretrained_encoder_is_the_ssl_bundles(tmp_path):
    load_bundle_weights(DrasCLRSegNet(), MODEL, BUNDLE)
    pretrained = BUNDLE / "models" / "pretrained_encoder.pt"
    assert sha256sum(pretrained) == sha256sum(bundle_dir("drasclr_lung_ct_ssl") / "models" / "model.pt")
    assert large_file_hash(BUNDLE, pretrained) == sha256sum(pretrained)
    tampered = tmp_path / "bundle"
    (tampered / "models").mkdir(parents=True)
    (tampered / "large_files.yml").write_text((BUNDLE / "large_files.yml").read_text())
    data = bytearray(MODEL.read_bytes())
    data[-100] ^= 0xFF
    (tampered / "models" / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_bundle_weights(DrasCLRSegNet(), tampered / "models" / "model.pt", tampered)


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """The bundle with no dataset_dir: it generates one phantom and maps it."""
    out = tmp_path_factory.mktemp("emphysema")
    workflow = inference_workflow(out)
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    return out


def test_embedded_phantom_maps_are_in_the_input_geometry(embedded_run):
    scan = load_ct(embedded_run / "embedded_phantom" / "phantom_00000.nii.gz")
    subject = embedded_run / "phantom_00000"
    lung = np.asarray(nib.load(subject / "lung_mask.nii.gz").dataobj)
    for name in ("subtype_label", "subtype_prob", "lung_mask"):
        img = nib.load(subject / f"{name}.nii.gz")
        assert img.shape[:3] == tuple(scan.shape)
        np.testing.assert_allclose(img.affine, np.asarray(scan.affine), atol=1e-5)
    label = np.asarray(nib.load(subject / "subtype_label.nii.gz").dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(label > 0, lung > 0)
    assert (subject / "overview.png").is_file()


def test_embedded_phantom_report_measures_the_input(embedded_run):
    scan = load_ct(embedded_run / "embedded_phantom" / "phantom_00000.nii.gz")
    subject = embedded_run / "phantom_00000"
    lung = np.asarray(nib.load(subject / "lung_mask.nii.gz").dataobj)
    label = np.asarray(nib.load(subject / "subtype_label.nii.gz").dataobj)
    report = json.loads((subject / "report.json").read_text())
    by_hand = measures_by_hand(scan.numpy(), lung, np.asarray(scan.affine), label)
    for key in ("laa950_percent", "perc15_hu", "lung_volume_ml"):
        assert report[key] == pytest.approx(by_hand[key], rel=1e-9)
    assert report["subtype_fractions"] == pytest.approx(by_hand["subtype_fractions"], abs=1e-12)
    assert report["regions"]["right"]["laa950_percent"] == pytest.approx(by_hand["right_laa950_percent"])
    assert report["regions"]["left"]["laa950_percent"] == pytest.approx(by_hand["left_laa950_percent"])
    assert report["model"]["bundle_version"] == json.loads(open(META).read())["version"]
    assert report["registration_dice"] > 0.7
    dense = report["dense"]
    assert (dense["window"], dense["overlap"]) == (64, 0.0)
    # the 1 mm grid along the atlas axes (RAS up to flips) covers the lungs' voxel boxes plus the 4 mm margin
    affine = np.asarray(scan.affine)
    corners = np.argwhere(lung > 0)[:, None, :] + np.array(np.meshgrid(*[[-0.5, 0.5]] * 3)).reshape(3, -1).T
    world = corners.reshape(-1, 3) @ affine[:3, :3].T + affine[:3, 3]
    extent = world.max(0) - world.min(0)
    assert np.all(np.array(dense["grid_shape"]) >= np.maximum(extent + 8, 64))
    assert np.all(np.array(dense["grid_shape"]) <= np.maximum(extent + 11, 64))
    starts = [len(set(range(0, n - 64, 64)) | {n - 64}) for n in dense["grid_shape"]]
    assert 0 < dense["windows"] <= np.prod(starts)


def test_a_broken_file_is_listed_in_failures(tmp_path):
    broken = tmp_path / "scans" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b truncated")
    workflow = inference_workflow(tmp_path / "out", dataset_dir=str(broken.parent))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(tmp_path / "out" / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["broken"]
    assert not (tmp_path / "out" / "broken" / "report.json").exists()


def test_real_ct_maps_align_and_laa950_matches_the_input(lung_ct_dir, tmp_path):
    """Lung-PET-CT-Dx A0001 (TCIA, CC BY 4.0), a DICOM series: maps in its geometry, LAA-950 of the report within
    0.5 percentage points of LAA-950 computed from the input HU inside the bundle's own lung mask."""
    workflow = inference_workflow(tmp_path / "out", dataset_dir=str(lung_ct_dir.parent))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    subject = tmp_path / "out" / lung_ct_dir.name
    scan = load_ct(lung_ct_dir)
    lung = np.asarray(nib.load(subject / "lung_mask.nii.gz").dataobj)
    for name in ("subtype_label", "lung_mask"):
        img = nib.load(subject / f"{name}.nii.gz")
        assert img.shape[:3] == tuple(scan.shape)
        np.testing.assert_allclose(img.affine, np.asarray(scan.affine), atol=1e-4)
    label = np.asarray(nib.load(subject / "subtype_label.nii.gz").dataobj)
    np.testing.assert_array_equal(label > 0, lung > 0)
    report = json.loads((subject / "report.json").read_text())
    assert report["laa950_percent"] == pytest.approx(laa950_percent(scan.numpy(), lung), abs=0.5)
    assert report["acquisition"]["slice_thickness_mm"] == pytest.approx(5.0, abs=0.01)
    # 5 mm, 57 HU noise, Philips lung kernel "L"
    assert [flag["flag"] for flag in report["quality"]] == ["thick_slices", "high_noise", "sharp_kernel"]
    harmonised = report["harmonisation"]  # the model saw the scan smoothed to 30 HU; the densitometry above is raw
    assert harmonised["applied"] and harmonised["noise_hu"] > 50
    assert harmonised["noise_hu_after"] == pytest.approx(30.0, abs=1.5)
    assert harmonised["model_input"]["laa950_percent"] < report["laa950_percent"]
    # kernel-harmonised densitometry: a sharp kernel measured on the pleura, converted to the soft reference
    assert harmonised["dicom_kernel"] == {"name": "L", "class": "sharp"}
    assert harmonised["densitometry"]["kernel_class"] == "sharp" and harmonised["densitometry"]["applied"]
    assert harmonised["laa950_percent"] < harmonised["model_input"]["laa950_percent"] < report["laa950_percent"]
    assert harmonised["perc15_hu"] > report["perc15_hu"]
    assert report["airways"]["airway_found"] and 10.0 < report["airways"]["airway_removed_ml"] < 250.0
    assert (subject / "overview.png").stat().st_size > 10_000
