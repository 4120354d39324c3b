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


def _chest_with_heart(blood_hu: float):
    """The synthetic chest with a heart between the lungs: blood ``blood_hu`` inside a 110 HU myocardium (enhanced)
    or plain soft tissue at 40 HU (``blood_hu`` 40)."""
    from tests.synthetic_chest import make_chest

    chest = make_chest(spacing=(3.0, 3.0, 3.0), noise_hu=15.0)
    hu = chest.hu
    x, y, z = (np.arange(n) * 3.0 - (n - 1) * 1.5 for n in hu.shape)  # body frame mm, y posterior, z up
    x, y, z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    shell = (x / 45.0) ** 2 + ((y + 25.0) / 45.0) ** 2 + ((z + 40.0) / 50.0) ** 2
    outside_lungs = chest.lungs == 0
    rng = np.random.default_rng(1)
    hu[(shell <= 1.0) & outside_lungs] = 110.0 if blood_hu > 100 else 40.0
    hu[(shell <= 0.6) & outside_lungs] = blood_hu
    hu[(shell <= 1.0) & outside_lungs] += rng.normal(0.0, 15.0, size=int(((shell <= 1.0) & outside_lungs).sum()))
    return chest, hu


@pytest.mark.parametrize("blood_hu, flagged", [(40.0, False), (250.0, True), (160.0, True)])
def test_contrast_in_the_blood_pool_is_flagged(blood_hu, flagged):
    """Unenhanced blood (~40 HU) is not flagged; arterial (250 HU) and portal venous (160 HU) blood are, end to end:
    LungMaskd records the blood pool in the scan's acquisition facts, which the scan's quality flags read."""
    import torch
    from monai.data import MetaTensor

    from drasclr_ext.quality import scan_quality
    from drasclr_ext.transforms.io import empty_acquisition
    from drasclr_ext.transforms.lung_mask import LungMaskd

    chest, hu = _chest_with_heart(blood_hu)
    meta = {"acquisition": empty_acquisition(), "filename_or_obj": "chest.nii.gz"}
    image = MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(chest.affine), meta=meta)
    d = LungMaskd("image")({"image": image})
    blood = d["image"].meta["acquisition"]["blood_pool_hu"]
    assert d["lung_mask"].meta["blood_pool_hu"] == blood and "blood_pool_hu" not in meta["acquisition"]
    assert (blood > 100.0) == flagged and (blood < 70.0) == (not flagged), blood
    assert d["image"] is image
    flags = [f["flag"] for f in scan_quality(d["image"])]
    assert ("contrast_enhanced" in flags) == flagged


@pytest.mark.parametrize(
    "acquisition, flagged",
    [
        ({"contrast_bolus_agent": "OMNIPAQUE 350"}, True),
        ({"contrast_bolus_agent": "APPLIED", "blood_pool_hu": 48.0}, True),
        ({"contrast_bolus_agent": "NONE"}, False),
        ({"contrast_bolus_agent": "", "blood_pool_hu": 52.0}, False),
        ({"contrast_bolus_agent": "", "blood_pool_hu": float("nan")}, False),
        ({"blood_pool_hu": 180.0}, True),
        ({}, False),
    ],
)
def test_contrast_flag_from_the_dicom_tag_or_the_image(acquisition, flagged):
    from drasclr_ext.quality import contrast_enhanced

    flag = contrast_enhanced(np.ones(3), acquisition)
    assert (flag is not None) == flagged
    if flagged:
        assert flag["flag"] == "contrast_enhanced" and flag["severity"] == "warning" and "LAA-950" in flag["message"]


def test_the_contrast_flag_reaches_the_report():
    """The dense writer's report.json ``quality`` (and so overview.png's title and summary.json's counts)."""
    import torch
    from monai.data import MetaTensor

    from drasclr_ext.inference.dense import DenseSubtypeWriter
    from drasclr_ext.transforms.registration import RegistrationResult
    from tests.synthetic_chest import make_chest

    chest = make_chest()
    acquisition = {"slice_thickness": 1.0, "contrast_bolus_agent": "", "blood_pool_hu": 212.0}
    image = MetaTensor(torch.from_numpy(chest.hu)[None], affine=torch.from_numpy(chest.affine))
    image.meta["acquisition"] = acquisition
    lung = MetaTensor(torch.from_numpy(chest.lungs)[None], affine=torch.from_numpy(chest.affine))
    affine = torch.from_numpy(chest.affine)
    label = MetaTensor(torch.from_numpy((chest.lungs > 0).astype(np.uint8))[None], affine=affine)
    data = {"image": image, "lung_mask": lung, "subtype_label": label, "registration": RegistrationResult(np.eye(4))}
    report = DenseSubtypeWriter().report(data, "chest")
    (flag,) = [f for f in report["quality"] if f["flag"] == "contrast_enhanced"]
    assert "212 HU" in flag["message"] and report["acquisition"]["blood_pool_hu"] == 212.0


def test_real_ct_blood_pool(lung_ct_dir):
    """TCIA A0001, protocol "2 Chest C-" (no contrast): its blood pool measures as unenhanced blood, no flag."""
    from drasclr_ext.quality import scan_quality
    from drasclr_ext.transforms.io import load_ct
    from drasclr_ext.transforms.lung_mask import LungMaskd

    d = LungMaskd("image")({"image": load_ct(lung_ct_dir)})
    assert 30.0 < d["image"].meta["acquisition"]["blood_pool_hu"] < 70.0
    assert "contrast_enhanced" not in [f["flag"] for f in scan_quality(d["image"])]


def test_real_abdomen_ct_contrast_tag_is_flagged(abdomen_ct_dir):
    from drasclr_ext.quality import scan_quality
    from drasclr_ext.transforms.io import load_ct

    (flag,) = [f for f in scan_quality(load_ct(abdomen_ct_dir)) if f["flag"] == "contrast_enhanced"]
    assert "'APPLIED'" in flag["message"]
