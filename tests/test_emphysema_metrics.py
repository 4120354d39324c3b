"""Clinical emphysema measures on tiny hand-made volumes with exact expected values."""

from __future__ import annotations

import numpy as np
import pytest

from drasclr_ext.errors import InputImageError
from drasclr_ext.metrics.emphysema import (
    cle_grade,
    emphysema_report,
    laa950_percent,
    lung_regions,
    perc15,
    pse_grade,
)


def _tiny():
    """4 x 1 x 3 volume: lung voxels are x = 0..3 at z = 0..2; the right lung (1) is x 0-1, the left (2) x 2-3."""
    hu = np.array([[-960.0, -951.0, -950.0], [-800.0, -1000.0, -949.0], [-990.0, -990.0, -990.0], [0.0, -900.0, 10.0]])
    hu = hu[:, None, :]
    lung = np.array([[1, 1, 1], [1, 1, 1], [2, 2, 2], [0, 2, 0]], dtype=np.uint8)[:, None, :]
    return hu, lung


def test_laa950_counts_strictly_below_minus_950():
    hu, lung = _tiny()
    # lung voxels: -960 -951 -950 -800 -1000 -949 -990 -990 -990 -900 -> 6 of 10 below -950
    assert laa950_percent(hu, lung) == pytest.approx(60.0)


def test_perc15_is_linear_percentile_of_lung_voxels():
    hu, lung = _tiny()
    # sorted lung values -1000 -990 -990 -990 -960 ...: rank 0.15 * 9 = 1.35 lies between two -990s
    assert perc15(hu, lung) == pytest.approx(-990.0)
    hu[1, 0, 1] = -1100.0  # now -1100 -990 ...: still -990; move rank 1 instead
    lung2 = lung.copy()
    lung2[2, 0, 1:] = 0  # drop two -990s: sorted -1100 -990 -960 -951 -950 -949 -900 -800, rank 1.05
    assert perc15(hu, lung2) == pytest.approx(-990.0 + 0.05 * 30.0)


def test_empty_lung_raises_input_error():
    with pytest.raises(InputImageError, match="empty"):
        laa950_percent(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), dtype=np.uint8))


def test_shape_mismatch_raises_input_error():
    with pytest.raises(InputImageError, match="differ in shape"):
        perc15(np.zeros((2, 2, 2)), np.ones((2, 2, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "fraction,grade",
    [(0.0, 0), (0.00499, 0), (0.005, 1), (0.0099, 1), (0.01, 2), (0.0499, 2), (0.05, 3), (0.0999, 3), (0.10, 4),
     (0.1999, 4), (0.20, 5), (1.0, 5)],
)  # fmt: skip
def test_cle_grade_boundaries(fraction, grade):
    assert cle_grade(fraction) == grade


@pytest.mark.parametrize("fraction,grade", [(0.0, 0), (0.0099, 0), (0.01, 1), (0.0499, 1), (0.05, 2), (0.9, 2)])
def test_pse_grade_boundaries(fraction, grade):
    assert pse_grade(fraction) == grade


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), 20.0])
def test_grades_reject_values_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="fraction"):
        cle_grade(bad)


def test_lung_regions_thirds_by_world_height_of_each_lung():
    lung = np.zeros((2, 1, 7), dtype=np.uint8)
    lung[0, 0, 0:7] = 1  # right lung: z 0..6 (relative heights 0, 1/6, ... 1)
    lung[1, 0, 4:7] = 2  # left lung: z 4..6 (relative heights 0, 0.5, 1)
    regions = lung_regions(lung, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert np.flatnonzero(regions["right_lower"][0, 0]).tolist() == [0, 1]
    assert np.flatnonzero(regions["right_middle"][0, 0]).tolist() == [2, 3]
    assert np.flatnonzero(regions["right_upper"][0, 0]).tolist() == [4, 5, 6]
    assert np.flatnonzero(regions["left_lower"][1, 0]).tolist() == [4]
    assert np.flatnonzero(regions["left_middle"][1, 0]).tolist() == [5]
    assert np.flatnonzero(regions["left_upper"][1, 0]).tolist() == [6]
    assert regions["upper"].sum() == 4 and regions["whole"].sum() == 10


def test_lung_regions_follow_a_flipped_z_axis():
    lung = np.ones((1, 1, 3), dtype=np.uint8)
    regions = lung_regions(lung, np.diag([1.0, 1.0, -1.0, 1.0]))  # index 0 is the most superior
    assert regions["right_upper"][0, 0].tolist() == [True, False, False]
    assert regions["right_lower"][0, 0].tolist() == [False, False, True]


def test_emphysema_report_values():
    hu, lung = _tiny()
    label = np.where(lung > 0, 1, 0).astype(np.uint8)
    label[0, 0, :] = 2  # 3 CLE voxels
    label[2, 0, 0] = 3  # 1 PSE voxel
    report = emphysema_report(hu[None], lung, np.diag([2.0, 5.0, 10.0, 1.0]), label)  # channel-first image
    assert report["lung_volume_ml"] == pytest.approx(10 * 0.1)
    assert report["laa950_percent"] == pytest.approx(60.0)
    assert report["subtype_fractions"] == pytest.approx(
        {"normal": 0.6, "centrilobular": 0.3, "paraseptal": 0.1, "panlobular": 0.0}
    )
    assert report["cle_grade"] == 5 and report["pse_grade"] == 2
    assert report["regions"]["left"]["laa950_percent"] == pytest.approx(75.0)
    assert report["regions"]["right"]["volume_ml"] == pytest.approx(0.6)


def _regions_reference(lung, affine):
    """Boolean region masks from a full-size height array (the definition of lung_regions)."""
    regions = {"whole": lung > 0, "right": lung == 1, "left": lung == 2}
    i, j, k = (np.arange(n, dtype=np.float64) for n in lung.shape)
    height = affine[2, 0] * i[:, None, None] + affine[2, 1] * j[None, :, None] + affine[2, 2] * k[None, None, :]
    for zone in ("upper", "middle", "lower"):
        regions[zone] = np.zeros(lung.shape, bool)
    for side in ("right", "left"):
        h = height[regions[side]]
        rel = (h - h.min()) / (h.max() - h.min()) if h.size and h.max() > h.min() else np.zeros_like(h)
        for zone, z in (("upper", rel >= 2 / 3), ("middle", (rel >= 1 / 3) & (rel < 2 / 3)), ("lower", rel < 1 / 3)):
            region = np.zeros(lung.shape, bool)
            region[regions[side]] = z
            regions[f"{side}_{zone}"] = region
            regions[zone] |= region
    return regions


@pytest.mark.parametrize("seed", range(6))
def test_report_regions_equal_the_region_by_region_definition(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(4, 14, 3))
    lung = rng.choice([0, 1, 2, 3] if seed % 3 == 0 else [0, 1, 2], size=shape).astype(np.uint8)
    if seed == 1:
        lung[lung == 2] = 0  # one lung only
    hu = rng.choice([-1000.0, -960.0, -950.0, -900.0, 30.0], size=shape)
    label = rng.integers(0, 6, size=shape).astype(np.uint8)
    affine = np.eye(4)
    affine[:3, :3] = rng.normal(size=(3, 3)) if seed % 2 else np.diag(rng.choice([-1.5, 0.7, 2.0], 3))
    order = np.asfortranarray if seed % 2 else np.ascontiguousarray
    report = emphysema_report(order(hu), order(lung), affine, order(label))
    regions = lung_regions(order(lung), affine)
    expected = _regions_reference(lung, affine)
    assert (
        list(report["regions"])
        == list(regions)
        == ["whole", "right", "left", "upper", "middle", "lower"]
        + [f"{side}_{zone}" for side in ("right", "left") for zone in ("upper", "middle", "lower")]
    )
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    for name, region in expected.items():
        np.testing.assert_array_equal(regions[name], region)
        n, got = int(region.sum()), report["regions"][name]
        assert got["volume_ml"] == pytest.approx(n * voxel_ml)
        assert got["laa950_percent"] == (pytest.approx(100.0 * np.mean(hu[region] < -950)) if n else None)
        for value, subtype in ((1, "normal"), (2, "centrilobular"), (3, "paraseptal"), (4, "panlobular")):
            assert got["subtype_fractions"][subtype] == (pytest.approx(np.mean(label[region] == value)) if n else None)
    assert report["perc15_hu"] == pytest.approx(np.percentile(hu[lung > 0], 15))
