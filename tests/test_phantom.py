"""Synthetic lung CT phantoms: anatomy, determinism, exact ground truth, emphysema zones, cohort writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from drasclr_ext.data.phantom import canonical_lung_mask, generate_phantom, write_phantom_cohort
from drasclr_ext.data.phantom import cohort as phantom_cohort_module
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.metrics.emphysema import laa950_percent
from tests.measures_by_hand import measures_by_hand

SMALL = (112, 112, 72)  # ~3 mm voxels: fast, still shows every subtype


@pytest.fixture(scope="module")
def severe_mixed():
    return generate_phantom(4, shape=SMALL, severity="severe", subtypes="centrilobular+paraseptal")


@pytest.fixture(scope="module")
def severe_panlobular():
    return generate_phantom(5, shape=SMALL, severity="severe", subtypes="panlobular")


def _world(affine, mask):
    ijk = np.argwhere(mask)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_canonical_lung_mask_has_two_adult_lungs_right_on_ras_plus_x():
    mask, affine = canonical_lung_mask(spacing_mm=2.0)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}
    vol = {k: np.count_nonzero(mask == k) * 8e-6 for k in (1, 2)}  # litres at 2 mm
    assert 2.5 < vol[2] < vol[1] < 3.8  # the heart makes the left lung smaller
    assert _world(affine, mask == 1)[:, 0].mean() > 0 > _world(affine, mask == 2)[:, 0].mean()


def test_canonical_lung_mask_apex_is_narrower_than_the_base():
    mask, _ = canonical_lung_mask(spacing_mm=2.0)
    area = np.count_nonzero(mask, axis=(0, 1))
    z = np.flatnonzero(area)
    top, widest = area[z[-1] - 10], area.max()  # 2 cm below the apex
    assert top < 0.35 * widest and np.argmax(area) < z[0] + 0.6 * (z[-1] - z[0])


def test_generate_is_deterministic_per_seed():
    a = generate_phantom(7, shape=(64, 64, 40))
    b = generate_phantom(7, shape=(64, 64, 40))
    c = generate_phantom(8, shape=(64, 64, 40))
    for key in ("image", "label", "lung_mask", "affine"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["info"] == b["info"]
    assert not np.array_equal(a["image"], c["image"])


def test_label_is_exactly_the_lung_mask_with_subtypes(severe_mixed):
    out = severe_mixed
    assert out["image"].dtype == np.float32 and out["label"].dtype == np.uint8 and out["lung_mask"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"] > 0, out["lung_mask"] > 0)
    assert set(np.unique(out["label"])) <= {0, 1, 2, 3, 4}
    assert {2, 3} <= set(np.unique(out["label"]))


def test_info_equals_recomputation_on_the_image(severe_mixed):
    out = severe_mixed
    by_hand = measures_by_hand(out["image"], out["lung_mask"], out["affine"], out["label"])
    for key in ("laa950_percent", "perc15_hu", "lung_volume_ml"):
        assert out["info"][key] == pytest.approx(by_hand[key], rel=1e-9)
    assert out["info"]["subtype_fractions"] == pytest.approx(by_hand["subtype_fractions"], abs=1e-12)
    lung = out["lung_mask"] > 0
    assert out["info"]["subtype_fractions"]["paraseptal"] == np.count_nonzero(out["label"] == 3) / lung.sum()


def test_default_sized_sharp_kernel_healthy_phantom_stays_under_5_percent():
    # seed 5031 draws a healthy, sharp-kernel, thin-slice subject: it gave 5.6 % before the kernel was tamed
    out = generate_phantom(5031)
    assert out["info"]["subject"]["severity"] == "healthy" and out["info"]["subject"]["kernel"] == "sharp"
    assert out["info"]["laa950_percent"] < 5.0


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_phantoms_have_low_laa950(seed):
    out = generate_phantom(seed, shape=SMALL, severity="healthy", kernel="sharp")
    assert laa950_percent(out["image"], out["lung_mask"]) < 5.0
    assert set(np.unique(out["label"])) == {0, 1}
    assert -880 < np.median(out["image"][out["label"] == 1]) < -820


def test_severe_phantoms_have_high_laa950(severe_mixed, severe_panlobular):
    assert severe_mixed["info"]["laa950_percent"] > 15.0
    assert severe_panlobular["info"]["laa950_percent"] > 15.0


def _relative_centroid_height(out, value):
    z = _world(out["affine"], out["label"] == value)[:, 2]
    lung_z = _world(out["affine"], out["lung_mask"] > 0)[:, 2]
    return (z.mean() - lung_z.min()) / (lung_z.max() - lung_z.min())


def test_centrilobular_and_paraseptal_are_upper_zone_panlobular_lower(severe_mixed, severe_panlobular):
    lung_centre = _relative_centroid_height(severe_mixed, 1)
    assert _relative_centroid_height(severe_mixed, 2) > lung_centre + 0.05
    assert _relative_centroid_height(severe_mixed, 3) > lung_centre + 0.05
    assert _relative_centroid_height(severe_panlobular, 4) < _relative_centroid_height(severe_panlobular, 1) - 0.05


def test_paraseptal_cysts_are_subpleural(severe_mixed):
    from scipy import ndimage

    out = severe_mixed
    spacing = np.abs(np.diag(out["affine"])[:3])
    depth = ndimage.distance_transform_edt(out["lung_mask"] > 0, sampling=spacing)
    assert np.median(depth[out["label"] == 3]) < np.median(depth[out["label"] == 2])


def test_panlobular_prunes_vessels(severe_panlobular):
    out = severe_panlobular
    dense = out["image"] > -500  # vessels and walls inside the lung
    ple, normal = out["label"] == 4, out["label"] == 1
    assert dense[ple].mean() < 0.5 * dense[normal].mean()


def test_lung_template_gives_the_template_shape():
    mask, affine = canonical_lung_mask(spacing_mm=3.0)
    out = generate_phantom(3, shape=(80, 80, 56), severity="healthy", lung_template=(mask, affine))
    assert set(np.unique(out["lung_mask"])) == {0, 1, 2}
    assert _world(out["affine"], out["lung_mask"] == 1)[:, 0].mean() > 0  # right lung on RAS +x


def test_atlas_lung_mask_as_template(drasclr_atlas_dir):
    out = generate_phantom(
        2, shape=(80, 80, 56), severity="healthy", lung_template=drasclr_atlas_dir / "atlas_lung_mask.nii.gz"
    )
    vol = {k: np.count_nonzero(out["lung_mask"] == k) for k in (1, 2)}
    assert vol[1] > 0 and vol[2] > 0
    assert (
        _world(out["affine"], out["lung_mask"] == 1)[:, 0].mean()
        > _world(out["affine"], out["lung_mask"] == 2)[:, 0].mean()
    )


@pytest.mark.parametrize("kwargs", [{"severity": "extreme"}, {"kernel": "soft"}, {"subtypes": "bullous"}])
def test_bad_options_raise_our_error(kwargs):
    with pytest.raises(DrasCLRError, match="use one of|use 'smooth'"):
        generate_phantom(0, shape=(32, 32, 16), **kwargs)


def test_too_small_field_of_view_raises():
    with pytest.raises(DrasCLRError, match="field of view"):
        generate_phantom(0, shape=(32, 32, 16), spacing=(1.0, 1.0, 1.0))


def test_cohort_writes_cases_and_datalist_and_resumes(tmp_path, monkeypatch):
    from monai.data import load_decathlon_datalist

    path = write_phantom_cohort(tmp_path, n=3, seed=20, shape=(48, 48, 32))
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert path == str(tmp_path / "datalist.json")
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    entry = datalist["test"][0]
    assert entry == {
        "image": "phantom_00022_image.nii.gz",
        "label": "phantom_00022_label.nii.gz",
        "lung": "phantom_00022_lung.nii.gz",
        "info": "phantom_00022.json",
    }
    img = nib.load(tmp_path / entry["image"])
    lab = np.asarray(nib.load(tmp_path / entry["label"]).dataobj)
    lung = np.asarray(nib.load(tmp_path / entry["lung"]).dataobj)
    info = json.loads((tmp_path / entry["info"]).read_text())
    assert img.shape == (48, 48, 32) and lab.dtype == np.uint8
    np.testing.assert_array_equal(lab > 0, lung > 0)
    assert info["laa950_percent"] == pytest.approx(laa950_percent(np.asarray(img.dataobj), lung))
    loaded = load_decathlon_datalist(path, data_list_key="training", base_dir=tmp_path)
    assert loaded[0]["image"] == str(tmp_path / "phantom_00020_image.nii.gz")

    def fail(*args, **kwargs):
        raise AssertionError("a written case was generated again")

    monkeypatch.setattr(phantom_cohort_module, "generate_phantom", fail)
    write_phantom_cohort(tmp_path, n=3, seed=20, shape=(48, 48, 32))  # resumes: nothing regenerated
    (tmp_path / "phantom_00021.json").unlink()  # an incomplete case is regenerated
    with pytest.raises(AssertionError, match="generated again"):
        write_phantom_cohort(tmp_path, n=3, seed=20, shape=(48, 48, 32))


def test_cli_phantom_command(tmp_path):
    from drasclr_ext.cli import phantom

    path = phantom(str(tmp_path), n=1, seed=3, shape=(40, 40, 24))
    assert json.loads(open(path).read())["training"][0]["image"] == "phantom_00003_image.nii.gz"


def _capsule_grid(spacing):
    from drasclr_ext.data.phantom.grid import Grid

    shape = tuple(int(round(40.0 / s)) for s in spacing)
    return Grid(shape, spacing, np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2]), -20.0), shape


@pytest.mark.parametrize("spacing, centre_fraction", [((1.0, 1.0, 1.0), 1.0), ((1.0, 1.0, 5.0), 0.3)])
def test_capsules_fill_thick_slices_by_their_share_of_the_slab(spacing, centre_fraction):
    """A 1.5 mm lucency centred in a 5 mm slice fills about a third of its voxel (not all of it); the painted volume
    (fraction x voxel volume) of a capsule is its volume whatever the slice thickness."""
    from drasclr_ext.data.phantom.grid import paint_capsules

    grid, shape = _capsule_grid(spacing)
    centre = grid.to_mm(np.array(shape, float) // 2)
    small = np.zeros(shape, np.float32)
    paint_capsules(small, grid, centre[None], centre[None], np.array([0.75]))
    assert small.max() == pytest.approx(centre_fraction, abs=0.02)
    assert small[tuple(np.array(shape) // 2)] == small.max()
    capsule = np.zeros(shape, np.float32)
    paint_capsules(capsule, grid, centre[None] - [8.0, 0, 0], centre[None] + [8.0, 0, 0], np.array([2.0]))
    volume = np.pi * 2.0**2 * 16.0 + 4.0 / 3.0 * np.pi * 2.0**3  # cylinder + two half balls, mm^3
    assert capsule.sum() * np.prod(spacing) == pytest.approx(volume, rel=0.06)
    # its 4 mm wide core fills whole 1 mm voxels, and 4/5 of a 5 mm slab
    assert capsule.max() == pytest.approx(min(1.0, 4.0 / spacing[2]), abs=0.02)


def test_thick_slice_centrilobular_labels_mark_mostly_lucent_voxels():
    """Lesion labels follow what the scanner sees: in 6 mm slices, voxels labelled centrilobular are mostly
    destroyed (below the midpoint between normal lung and the -992 HU lucencies)."""
    out = generate_phantom(
        4, shape=(168, 168, 50), spacing=(2.0, 2.0, 6.0), severity="severe", subtypes="centrilobular"
    )
    image, label = out["image"], out["label"]
    normal = np.median(image[label == 1])
    assert np.median(image[label == 2]) < (normal - 992.0) / 2.0
    assert np.count_nonzero(label == 2) > 0.1 * np.count_nonzero(label > 0)


def _lag1(image: np.ndarray, axis: int) -> float:
    a, b = np.moveaxis(image, axis, 0)[:-1].ravel(), np.moveaxis(image, axis, 0)[1:].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _expected_lag1(sigma_voxels: float) -> float:
    """Lag-1 correlation of white noise through scipy's discrete Gaussian of ``sigma_voxels``."""
    from scipy import ndimage

    delta = np.zeros(65)
    delta[32] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma_voxels)
    return float((k[:-1] * k[1:]).sum() / (k * k).sum())


@pytest.mark.parametrize("pixel_mm", [0.5, 1.0])
def test_the_scanner_correlates_noise_over_voxels_or_over_mm(pixel_mm):
    """On a flat object the image is the noise: Gaussian-correlated over 0.6 voxels by default (the same lag-1
    correlation at any pixel size), or over ``noise_correlation_mm`` (the same texture in mm)."""
    from drasclr_ext.data.phantom.scanner import scan

    flat = np.zeros((160, 160, 4), np.float32)
    spacing = (pixel_mm, pixel_mm, 2.0)
    by_voxel, _ = scan(flat, spacing, "smooth", 100.0, np.random.default_rng(0))
    by_mm, _ = scan(flat, spacing, "smooth", 100.0, np.random.default_rng(0), noise_correlation_mm=1.0)
    assert _lag1(by_voxel, 0) == pytest.approx(_expected_lag1(0.6), abs=0.02)
    assert _lag1(by_mm, 0) == pytest.approx(_expected_lag1(1.0 / pixel_mm), abs=0.02)
    assert by_mm.std() == pytest.approx(100.0, rel=0.02)
