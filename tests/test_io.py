"""Reading CT in every format into RAS MetaTensors, and writing results back with the input's geometry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from drasclr_ext.subjects import subject_name
from drasclr_ext.transforms.io import LoadCTd, load_ct, save_like
from tests.dicom_utils import write_dicom_series as _write_dicom_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _volume(shape=(20, 16, 12), seed=0) -> np.ndarray:
    """Integer HU values with air, tissue and bone, so every reader keeps them exactly."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 1500, size=shape).astype(np.int16)


def _oblique_affine() -> np.ndarray:
    """A RAS affine with anisotropic spacing, a rotation about z and a flip of the first axis."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, 0.7, 2.5])
    affine[:3, 3] = [120.0, -95.5, -300.25]
    return affine


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def _write_itk(path: Path, data: np.ndarray, affine_ras: np.ndarray) -> Path:
    """Write (X, Y, Z) data with a RAS affine through ITK (which stores LPS direction and origin)."""
    import itk

    lps = LPS_TO_RAS @ affine_ras
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3] / spacing)))
    itk.imwrite(image, str(path))
    return path


def _corners_world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates of the 8 outer voxel corners."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)]
    )
    return (affine @ corners.T).T[:, :3]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_load_ct_reads_values_and_ras_affine(tmp_path, suffix):
    data, affine = _volume(), _oblique_affine()
    path = tmp_path / f"scan{suffix}"
    if suffix.startswith(".nii"):
        _write_nifti(path, data, affine)
    else:
        _write_itk(path, data, affine)
    image = load_ct(path)
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert tuple(image.shape) == data.shape
    np.testing.assert_array_equal(image.numpy(), data.astype(np.float32))
    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-4)
    np.testing.assert_allclose(image.meta["spacing"], [0.8, 0.7, 2.5], atol=1e-5)
    assert image.meta["subject"] == "scan"
    assert image.meta["filename_or_obj"] == str(path)
    assert np.isnan(image.meta["acquisition"]["slice_thickness"])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_save_like_keeps_input_geometry(tmp_path, suffix):
    data, affine = _volume(), _oblique_affine()
    path = tmp_path / f"scan{suffix}"
    _write_nifti(path, data, affine) if suffix.startswith(".nii") else _write_itk(path, data, affine)
    image = load_ct(path)
    mask = (image.numpy() > 0).astype(np.uint8)
    out = save_like(mask, image, tmp_path / "out" / "mask.nii.gz", dtype=np.uint8)
    saved = nib.load(str(out))
    assert saved.shape == data.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(saved.dataobj), mask)
    reread = load_ct(path)  # the input read again: same grid as the saved mask
    np.testing.assert_allclose(saved.affine, reread.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        _corners_world(saved.affine, saved.shape), _corners_world(reread.affine.numpy(), data.shape), atol=1e-3
    )
    assert not [p for p in out.parent.iterdir() if p.name != "mask.nii.gz"]  # no temporary file left behind


def test_save_like_accepts_channel_first_and_rejects_wrong_shape(tmp_path):
    data, affine = _volume(), _oblique_affine()
    image = load_ct(_write_nifti(tmp_path / "a.nii.gz", data, affine)).unsqueeze(0)
    out = save_like(torch.zeros((1, *data.shape)), image, tmp_path / "b.nii.gz")
    assert nib.load(str(out)).shape == data.shape
    with pytest.raises(ValueError, match="shape"):
        save_like(np.zeros((3, 3, 3)), image, tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="NIfTI"):
        save_like(np.zeros(data.shape), image, tmp_path / "c.nrrd")


def test_lps_flipped_nifti_gives_same_world_values(tmp_path):
    """The same scan stored with flipped x and y axes maps every value to the same world point."""
    data, affine = _volume(), _oblique_affine()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    a = load_ct(_write_nifti(tmp_path / "a.nii.gz", data, affine))
    b = load_ct(_write_nifti(tmp_path / "b.nii.gz", data[::-1, ::-1].copy(), affine @ flip))
    np.testing.assert_allclose(a.affine.numpy() @ [0, 0, 0, 1], b.affine.numpy() @ [19, 15, 0, 1], atol=1e-4)
    np.testing.assert_array_equal(a.numpy()[0, 0], b.numpy()[19, 15])


def test_loadctd_gives_channel_first_metatensor(tmp_path):
    data, affine = _volume(), _oblique_affine()
    out = LoadCTd(keys="image")({"image": str(_write_nifti(tmp_path / "s1.nii.gz", data, affine)), "other": 3})
    assert tuple(out["image"].shape) == (1, *data.shape) and out["other"] == 3
    np.testing.assert_allclose(out["image"].affine.numpy(), affine, atol=1e-4)
    assert out["image"].meta["subject"] == "s1"


def test_loaded_scans_collate_into_a_batch(tmp_path):
    """Meta values must be batchable by MONAI's collation (no None in meta)."""
    from monai.data import list_data_collate

    data, affine = _volume(), _oblique_affine()
    items = [LoadCTd("image")({"image": str(_write_nifti(tmp_path / f"s{i}.nii.gz", data, affine))}) for i in (1, 2)]
    batch = list_data_collate(items)
    assert tuple(batch["image"].shape) == (2, 1, *data.shape)


@pytest.mark.parametrize(
    "name, expected",
    [("a/b/case_01.nii.gz", "case_01"), ("x.nii", "x"), ("s.1.nrrd", "s.1"), ("p.mha", "p"), ("q.mhd", "q")],
)
def test_subject_name(name, expected):
    assert subject_name(name) == expected


def test_dicom_series_real_ct(lung_ct_dir, tmp_path):
    """TCIA Lung-PET-CT-Dx (CC BY 4.0) case A0001: rescale applied (air near -1000 HU), header facts read."""
    image = load_ct(lung_ct_dir)
    assert tuple(image.shape) == (512, 512, 64)
    hu = image.numpy()
    assert np.median(hu[:20, :20, 32]) < -950  # air outside the body
    assert -50 < np.median(hu[200:300, 200:300, 5]) < 100  # liver, soft tissue
    np.testing.assert_allclose(image.meta["spacing"], [0.841796875, 0.841796875, 5.0], atol=1e-6)
    acq = image.meta["acquisition"]
    assert acq["modality"] == "CT" and acq["slice_thickness"] == 5.0 and acq["manufacturer"] == "Philips"
    assert acq["convolution_kernel"] == "L" and acq["kvp"] == 120.0
    assert image.meta["subject"] == "Lung_Dx-A0001"
    out = save_like(np.zeros(hu.shape, np.uint8), image, tmp_path / "m.nii.gz", dtype=np.uint8)
    np.testing.assert_allclose(nib.load(str(out)).affine, image.affine.numpy(), atol=1e-4)


def test_dicom_folder_picks_largest_series_and_applies_rescale(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 3000, size=(24, 20, 10)).astype(np.uint16)
    _write_dicom_series(tmp_path / "study", 10, "1.2.3.4.1", 2.0, -1024.0, stored)
    _write_dicom_series(tmp_path / "study", 9, "1.2.3.4.2", 1.0, 0.0, stored[:, :, :9])  # a smaller series
    image = load_ct(tmp_path / "study")
    assert tuple(image.shape) == (24, 20, 10)
    np.testing.assert_allclose(image.numpy(), stored.astype(np.float32) * 2.0 - 1024.0)
    # LPS position (-10, -20, 100) of voxel 0 -> RAS (10, 20, 100); x, y spacing 0.6, 0.5 mm, slices 2 mm
    expected = np.array([[-0.6, 0, 0, 10.0], [0, -0.5, 0, 20.0], [0, 0, 2.0, 100.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine.numpy(), expected, atol=1e-5)
    acq = image.meta["acquisition"]
    assert acq["convolution_kernel"] == "B30f" and acq["manufacturer"] == "Acme" and acq["kvp"] == 100.0
    assert acq["series_instance_uid"] == "1.2.3.4.1" and acq["dicom_series_in_folder"] == 2
    assert image.meta["subject"] == "study"


def test_save_like_files_get_the_usual_permissions(tmp_path):
    reference = MetaTensor(torch.zeros(4, 3, 2), affine=torch.eye(4))
    old = os.umask(0o022)
    try:
        path = save_like(np.ones((4, 3, 2)), reference, tmp_path / "mask.nii.gz", dtype=np.uint8)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dicom_contrast_agent_is_recorded(tmp_path):
    """ContrastBolusAgent (0018,0010) reaches meta["acquisition"]; "" when the tag is absent (and for NIfTI)."""
    pydicom = pytest.importorskip("pydicom")
    stored = np.random.default_rng(0).integers(0, 1500, size=(10, 10, 8)).astype(np.uint16)  # air to bone
    _write_dicom_series(tmp_path / "plain", 8, "1.2.3.4.1", 1.0, -1024.0, stored)
    _write_dicom_series(tmp_path / "enhanced", 8, "1.2.3.4.1", 1.0, -1024.0, stored)
    for path in (tmp_path / "enhanced").iterdir():
        ds = pydicom.dcmread(path)
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.save_as(path)
    assert load_ct(tmp_path / "enhanced").meta["acquisition"]["contrast_bolus_agent"] == "IOHEXOL 350"
    assert load_ct(tmp_path / "plain").meta["acquisition"]["contrast_bolus_agent"] == ""


def test_real_dicom_contrast_agent(lung_ct_dir, abdomen_ct_dir):
    """The TotalSegmentator abdomen CT says contrast was given; TCIA A0001 (protocol "Chest C-") has no such tag."""
    assert load_ct(abdomen_ct_dir).meta["acquisition"]["contrast_bolus_agent"] == "APPLIED"
    assert load_ct(lung_ct_dir).meta["acquisition"]["contrast_bolus_agent"] == ""
