"""Lesion insertion into a host CT (drasclr_ext.data.lesions): determinism, zones, HU, untouched voxels, real CT."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from drasclr_ext.data.lesions import insert_lesions, lung_noise
from drasclr_ext.data.phantom import generate_phantom

SMALL = (112, 112, 72)


@pytest.fixture(scope="module")
def host():
    p = generate_phantom(3, shape=SMALL, severity="healthy")
    return p["image"], p["affine"], p["lung_mask"]


@pytest.fixture(scope="module")
def inserted(host):
    return insert_lesions(*host, seed=0)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _depth(lung: np.ndarray, affine: np.ndarray) -> np.ndarray:
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return ndi.distance_transform_edt(np.pad(lung > 0, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]


def _at(volume: np.ndarray, affine: np.ndarray, point) -> float:
    idx = np.round(np.linalg.solve(affine[:3, :3], np.asarray(point[:3]) - affine[:3, 3])).astype(int)
    return float(volume[tuple(idx)])


def _distance_to(shape, affine, point) -> np.ndarray:
    """World distance (mm) of every voxel centre to ``point`` (the phantom's affine is diagonal)."""
    axes = [affine[d, d] * np.arange(shape[d]) + affine[d, 3] - point[d] for d in range(3)]
    return np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)


def _near_regions(shape, affine, regions, margin_mm: float) -> np.ndarray:
    """Voxels within a region's radius + margin of its centre."""
    near = np.zeros(shape, bool)
    for reg in regions:
        near |= _distance_to(shape, affine, reg["centre_mm"]) <= reg["radius_mm"] + margin_mm
    return near


def test_deterministic_per_seed(host, inserted):
    again = insert_lesions(*host, seed=0)
    assert np.array_equal(again["image"], inserted["image"]) and np.array_equal(again["truth"], inserted["truth"])
    assert again["regions"] == inserted["regions"]
    other = insert_lesions(*host, seed=1)
    assert not np.array_equal(other["truth"], inserted["truth"])


def test_outputs_and_truth_inside_lung(host, inserted):
    hu, _, lung = host
    assert inserted["image"].dtype == np.float32 and inserted["image"].shape == hu.shape
    truth = inserted["truth"]
    assert truth.dtype == np.uint8 and set(np.unique(truth)) == {0, 2, 3, 4}
    assert not np.any((truth > 0) & (lung == 0))
    assert np.array_equal(inserted["region_map"] > 0, truth > 0)
    for i, reg in enumerate(inserted["regions"]):
        sel = inserted["region_map"] == i + 1
        assert reg["voxels"] == np.count_nonzero(sel) and np.all(truth[sel] == reg["label"])
    counts = {lab: sum(r["label"] == lab for r in inserted["regions"]) for lab in (2, 3, 4)}
    assert counts[2] >= 2 and counts[3] >= 2 and counts[4] == 1


def _reoriented(hu: np.ndarray, affine: np.ndarray, lung: np.ndarray):
    """The same scan stored with its first two axes swapped and the slices in reverse (feet-first) order."""
    new = affine.copy()
    new[:3, 0], new[:3, 1], new[:3, 2] = affine[:3, 1], affine[:3, 0], -affine[:3, 2]
    new[:3, 3] = affine[:3, 3] + affine[:3, 2] * (hu.shape[2] - 1)
    flip = lambda a: np.ascontiguousarray(np.transpose(a, (1, 0, 2))[:, :, ::-1])  # noqa: E731
    return flip(hu), new, flip(lung)


@pytest.mark.parametrize("reorient", [False, True])
def test_zones_cle_deep_upper_pse_at_pleura_ple_lower(host, inserted, reorient):
    _, affine, lung = host
    if reorient:  # world geometry, not voxel order, decides where lesions go
        hu, affine, lung = _reoriented(*host)
        inserted = insert_lesions(hu, affine, lung, seed=0)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    depth = _depth(lung, affine)
    truth = inserted["truth"]
    for i, reg in enumerate(inserted["regions"]):
        own = lung == {"right": 1, "left": 2}[reg["lung"]]
        z = _world(affine, np.argwhere(own))[:, 2]
        z_lo, z_hi = z.min() + (z.max() - z.min()) / 3, z.min() + 2 * (z.max() - z.min()) / 3
        sel = inserted["region_map"] == i + 1
        zt = _world(affine, np.argwhere(sel))[:, 2]
        if reg["label"] == 4:
            assert zt.max() <= z_lo + spacing[2] / 2
            assert 0.03 <= reg["lung_fraction"] <= 0.10
            continue
        assert zt.min() >= z_hi - spacing[2] / 2
        balls = reg["balls_mm"][::3] if reg["label"] == 2 else reg["balls_mm"]  # CLE: blobs, not satellites
        for x, y, zc, r in balls:
            d = _at(depth, affine, (x, y, zc))
            if reg["label"] == 2:  # every blob deep: at least 10 mm plus its reach (satellites) from the surface
                assert d >= 10.0 + 1.4 * r - 1e-3
            else:  # the cyst reaches the pleura: centre within its radius (plus a voxel) of the surface
                assert d <= r + spacing.max()
    cle_depth = depth[truth == 2]
    assert cle_depth.min() >= 10.0 - np.linalg.norm(spacing)


def test_lumens_dark_and_ple_pulled_without_noise(host):
    hu, affine, lung = host
    res = insert_lesions(hu, affine, lung, seed=0, noise=(0.0, 0.0))
    img = res["image"]
    half_diag = np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)) / 2
    checked = 0
    for reg in res["regions"]:
        wall = 0.5 if reg["label"] == 3 else 0.0
        for x, y, z, r in reg.get("balls_mm", []):
            inside = _distance_to(hu.shape, affine, (x, y, z)) + half_diag <= r - wall  # whole voxel in the lumen
            inside &= (hu <= -700) & (lung > 0)
            assert np.all(img[inside] <= -989.0)
            checked += np.count_nonzero(inside)
    assert checked > 0
    ple = res["truth"] == 4
    assert -975.0 <= np.median(img[ple]) <= -940.0
    assert np.median(hu[ple]) > -900  # the host parenchyma was brighter: the region was pulled down


def test_untouched_voxels_and_vessels_outside_ple_identical(host, inserted):
    hu, affine, lung = host
    near = _near_regions(hu.shape, affine, inserted["regions"], 10.0)
    assert not np.any(inserted["changed"] & ~near)
    assert np.array_equal(inserted["image"][~near], hu[~near])
    ple = [r for r in inserted["regions"] if r["label"] == 4]
    vessels = (lung > 0) & (hu >= -600) & ~_near_regions(hu.shape, affine, ple, 10.0)
    assert vessels.sum() > 100 and np.array_equal(inserted["image"][vessels], hu[vessels])
    assert np.all(inserted["image"] == np.round(inserted["image"]))


def test_noise_added_with_the_given_level(host):
    hu, affine, lung = host
    res = insert_lesions(hu, affine, lung, seed=0, noise=(15.0, 0.0))
    full = (res["truth"] == 4) & (np.abs(res["image"] + 970.0) < 90)
    # PLE voxels fully replaced: -970 plus noise of 15 HU (a vessel core or the edge would widen it)
    assert 11.0 <= np.std(res["image"][ndi.binary_erosion(full, iterations=2)]) <= 19.0


@pytest.mark.parametrize("sigma,width", [(30.0, 0.0), (40.0, 0.8)])
def test_lung_noise_recovers_known_noise(sigma, width):
    rng = np.random.default_rng(0)
    n = rng.standard_normal((96, 96, 12)).astype(np.float32)
    if width:
        n = ndi.gaussian_filter(n, (width, width, 0))
    hu = -860.0 + sigma * n / n.std()
    lung = np.zeros(hu.shape, np.uint8)
    lung[8:-8, 8:-8, 1:-1] = 1
    est_sigma, est_width = lung_noise(hu, lung, np.diag([0.8, 0.8, 5.0, 1.0]))
    assert abs(est_sigma - sigma) <= 0.15 * sigma
    assert abs(est_width - width) <= 0.25


def test_real_ct_insertion_keeps_geometry(lung_ct_dir, tmp_path):
    """TCIA Lung-PET-CT-Dx A0001 (CC BY 4.0): every subtype inserted; written back with the same shape and affine."""
    from drasclr_ext.transforms.io import load_ct, save_like
    from drasclr_ext.transforms.lung_mask import lung_mask_array

    image = load_ct(lung_ct_dir)
    hu, affine = image.numpy(), image.affine.numpy()
    lung = lung_mask_array(hu, affine)
    res = insert_lesions(hu, affine, lung, seed=0)
    counts = np.bincount(res["truth"].ravel(), minlength=5)
    assert counts[2] > 0 and counts[3] > 0 and counts[4] > 0 and counts[1] == 0
    path = save_like(res["image"], image, tmp_path / "lesions.nii", np.int16)  # uncompressed: faster
    back = load_ct(path)
    assert tuple(back.shape) == tuple(hu.shape)
    assert np.allclose(back.affine.numpy(), affine, atol=1e-4)
    assert np.array_equal(back.numpy(), res["image"])
