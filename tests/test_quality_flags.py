"""Quality flags that need a subject's results (``drasclr_ext.quality.subject_quality``) and their cohort counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drasclr_ext.inference.runner import CohortRunner
from drasclr_ext.quality import subject_quality

AXIAL = np.diag([0.7, 0.7, 1.25, 1.0])


def _lung(first: bool = False, last: bool = False) -> np.ndarray:
    lung = np.zeros((20, 20, 12), np.uint8)
    lung[5:15, 5:15, 2:10] = 1
    if first:
        lung[5:15, 5:15, 0] = 1
    if last:
        lung[5:15, 5:15, -1] = 2
    return lung


def _flags(report: dict, lung: np.ndarray | None = None, affine: np.ndarray = AXIAL) -> list[str]:
    return [f["flag"] for f in subject_quality(report, _lung() if lung is None else lung, affine)]


GOOD = {"harmonisation": {"noise_hu": 22.0}, "registration_dice": 0.93, "lung_volume_ml": 5200.0}


def test_a_good_subject_has_no_flags():
    assert _flags(GOOD) == []
    assert _flags({}) == []  # unknown facts raise no flag


@pytest.mark.parametrize(
    "change, flag",
    [
        ({"harmonisation": {"noise_hu": 56.6}}, "high_noise"),
        ({"registration_dice": 0.71}, "low_registration_dice"),
        ({"lung_volume_ml": 900.0}, "implausible_lung_volume"),
        ({"lung_volume_ml": 11000.0}, "implausible_lung_volume"),
    ],
)
def test_each_report_fact_raises_its_flag(change, flag):
    report = {**GOOD, **change}
    (entry,) = subject_quality(report, _lung(), AXIAL)
    assert entry["flag"] == flag and entry["severity"] == "warning" and len(entry["message"]) > 40


def test_lungs_reaching_the_first_or_last_axial_slice_are_flagged_whatever_the_array_order():
    (entry,) = subject_quality(GOOD, _lung(first=True, last=True), AXIAL)
    assert entry["flag"] == "lungs_cut_off" and "first and last" in entry["message"]
    # the same volume stored with the axial axis first: found from the affine, not the array order
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1.25, 0.7, 0.7, 1.0
    assert _flags(GOOD, np.moveaxis(_lung(last=True), 2, 0), affine) == ["lungs_cut_off"]
    assert _flags(GOOD, np.moveaxis(_lung(), 2, 0), affine) == []
    # touching the in-plane border is not a cut-off along the body axis
    sideways = _lung()
    sideways[0, 5:15, 2:10] = 1
    assert _flags(GOOD, sideways) == []


def test_the_cohort_summary_counts_the_flags(tmp_path):
    for name, flags in (("a", ["thick_slices", "high_noise"]), ("b", ["high_noise"]), ("c", [])):
        (tmp_path / name).mkdir()
        quality = [{"flag": f, "severity": "warning", "message": "m"} for f in flags]
        (tmp_path / name / "report.json").write_text(json.dumps({"quality": quality}))
    runner = CohortRunner([], tmp_path, lambda d: d, lambda d: d, lambda d, p: p, done_file="report.json")
    assert runner._count_flags(["a", "b", "c", "missing"]) == {"high_noise": 2, "thick_slices": 1}


def test_a_lung_mask_without_trachea_is_flagged():
    assert _flags({**GOOD, "airways": {"airway_found": True, "airway_removed_ml": 62.0}}) == []
    assert _flags({**GOOD, "airways": {"airway_found": False, "airway_removed_ml": 0.0}}) == ["airway_not_found"]


def test_the_lung_mask_reports_the_airways_it_removed():
    import torch
    from monai.data import MetaTensor

    from drasclr_ext.data.phantom import generate_phantom
    from drasclr_ext.transforms.lung_mask import AIRWAY_META_KEY, LungMask

    phantom = generate_phantom(7, resolution_scale=3.0)
    image = MetaTensor(torch.from_numpy(phantom["image"])[None], affine=torch.from_numpy(phantom["affine"]))
    airways = LungMask()(image).meta[AIRWAY_META_KEY]
    assert airways["airway_found"] and 5.0 < airways["airway_removed_ml"] < 250.0
    # the same chest with its top cut off below the trachea: no airway to find, and it says so
    z_lungs = np.flatnonzero((phantom["lung_mask"] > 0).any(axis=(0, 1)))
    low = image[..., : z_lungs[0] + (z_lungs[-1] - z_lungs[0]) // 3]
    assert LungMask()(low).meta[AIRWAY_META_KEY]["airway_found"] is False
