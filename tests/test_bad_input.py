"""Every kind of unusable input raises InputImageError with a message saying what is wrong and what to do."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from drasclr_ext.errors import DrasCLRError, InputImageError
from drasclr_ext.transforms.io import load_ct
from drasclr_ext.transforms.lung_mask import compute_lung_mask
from tests.synthetic_chest import make_chest


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _ct_like(shape=(24, 24, 16)) -> np.ndarray:
    hu = np.full(shape, 40, dtype=np.int16)
    hu[:4] = -1000  # some air
    return hu


def test_error_type_is_ours():
    assert issubclass(InputImageError, DrasCLRError) and issubclass(InputImageError, ValueError)


def test_missing_path(tmp_path):
    with pytest.raises(InputImageError, match="does not exist"):
        load_ct(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(InputImageError, match=r"empty \(0 bytes\).*complete NIfTI/NRRD/MHA or a DICOM series"):
        load_ct(path)


def test_truncated_gz(tmp_path):
    full = _nifti(tmp_path / "full.nii.gz", _ct_like((40, 40, 30)))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputImageError, match=r"could not read .*cut\.nii\.gz.*Check that the file is a complete"):
        load_ct(cut)


def test_truncated_uncompressed_nifti(tmp_path):
    full = _nifti(tmp_path / "full.nii", _ct_like((40, 40, 30)))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(InputImageError, match="could not read"):
        load_ct(cut)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "scan.nrrd"
    path.write_bytes(b"this is not an image\n" * 50)
    with pytest.raises(InputImageError, match="could not read"):
        load_ct(path)


def test_gz_of_garbage(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(InputImageError, match="could not read"):
        load_ct(path)


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1), (1, 64, 64)])
def test_2d_image(tmp_path, shape):
    data = np.full(shape, 40, np.int16)
    data.reshape(-1)[:100] = -1000
    with pytest.raises(InputImageError, match=r"is 2D .*whole series"):
        load_ct(_nifti(tmp_path / "slice.nii.gz", data))


def test_too_few_slices(tmp_path):
    with pytest.raises(InputImageError, match=r"only 4 slices.*complete CT series"):
        load_ct(_nifti(tmp_path / "thin.nii.gz", _ct_like((32, 32, 4))))


def test_multichannel_nifti(tmp_path):
    data = np.stack([_ct_like()] * 3, axis=-1)  # (X, Y, Z, 3)
    with pytest.raises(InputImageError, match=r"multi-channel \(RGB\).*single 3D CT"):
        load_ct(_nifti(tmp_path / "rgb.nii.gz", data))


def test_rgb_nifti(tmp_path):
    rgb = np.zeros((16, 16, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(InputImageError, match=r"colour \(RGB\)"):
        load_ct(_nifti(tmp_path / "rgb24.nii.gz", rgb))


def test_rgb_png(tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "screenshot.png"
    plt.imsave(str(path), np.random.default_rng(0).random((32, 32, 3)))
    with pytest.raises(InputImageError, match=r"components per voxel \(RGB"):
        load_ct(path)


def test_mr_like_values(tmp_path):
    """An MR-like volume: positive intensities, no air near -1000."""
    mr = np.random.default_rng(0).gamma(2.0, 300.0, size=(32, 32, 20)).astype(np.float32)
    with pytest.raises(InputImageError, match=r"does not look like a CT in Hounsfield units.*rescale"):
        load_ct(_nifti(tmp_path / "t1.nii.gz", mr))


def test_normalised_image(tmp_path):
    with pytest.raises(InputImageError, match="Hounsfield"):
        load_ct(_nifti(tmp_path / "norm.nii.gz", np.random.default_rng(0).random((32, 32, 20)).astype(np.float32)))


def test_constant_image(tmp_path):
    with pytest.raises(InputImageError, match="Hounsfield"):
        load_ct(_nifti(tmp_path / "const.nii.gz", np.full((32, 32, 20), -1000, np.int16)))


def test_nan_values(tmp_path):
    data = _ct_like().astype(np.float32)
    data[5, 5, 5] = np.nan
    data[12, 12, 8] = np.nan
    with pytest.raises(InputImageError, match="NaN"):
        load_ct(_nifti(tmp_path / "nan.nii.gz", data))


def test_degenerate_affine():
    from drasclr_ext.transforms.validate import check_ct_array

    with pytest.raises(InputImageError, match="geometry"):
        check_ct_array(_ct_like(), np.diag([1.0, 1.0, 0.0, 1.0]), name="flat.nii.gz")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputImageError, match="no DICOM series"):
        load_ct(tmp_path)


def test_body_without_lungs():
    chest = make_chest(lungs=False)
    with pytest.raises(InputImageError, match=r"no lungs were found.*covers the chest"):
        compute_lung_mask(chest.hu, chest.affine)


def test_real_abdominal_ct_has_no_lungs(abdomen_ct_dir):
    """A real abdominal CT (bowel gas, no lungs): readable, but the lung mask refuses it."""
    image = load_ct(abdomen_ct_dir)
    with pytest.raises(InputImageError, match=r"no lungs were found.*covers the chest"):
        compute_lung_mask(image.numpy(), image.affine.numpy())


def _dense_inputs(lung: np.ndarray, affine=None):
    """A scan and its lung mask as the dense inferer reads them (MetaTensors), identity registration."""
    import torch
    from monai.data import MetaTensor

    from drasclr_ext.transforms.registration import RegistrationResult

    chest = make_chest(spacing=(4.0, 4.0, 4.0), fov_mm=(120.0, 96.0, 96.0))
    affine = torch.from_numpy(chest.affine if affine is None else affine)
    image = MetaTensor(torch.from_numpy(chest.hu)[None], affine=torch.from_numpy(chest.affine))
    return {
        "image": image,
        "lung_mask": MetaTensor(torch.from_numpy(lung)[None], affine=affine),
        "registration": RegistrationResult(np.eye(4)),
    }


@pytest.mark.parametrize("case", ["empty", "other shape"])
def test_dense_inference_refuses_a_missing_or_mismatched_lung_mask(case):
    from drasclr_ext.inference.dense import DenseSubtypeInferer
    from drasclr_ext.networks.segmentation import DrasCLRSegNet

    shape = (30, 24, 24)
    lung = np.zeros(shape if case == "empty" else (30, 24, 20), np.uint8)
    if case == "other shape":
        lung[10:20, 8:16, 5:15] = 1
    inferer = DenseSubtypeInferer(DrasCLRSegNet(num_experts=2), window=32)
    message = "lung mask is empty" if case == "empty" else "differ in shape"
    with pytest.raises(InputImageError, match=message):
        inferer(_dense_inputs(lung))


def test_dense_inference_needs_windows_of_a_multiple_of_32_mm():
    from drasclr_ext.inference.dense import DenseSubtypeInferer
    from drasclr_ext.networks.segmentation import DrasCLRSegNet

    with pytest.raises(ValueError, match="multiple of 32"):
        DenseSubtypeInferer(DrasCLRSegNet(num_experts=2), window=48)
