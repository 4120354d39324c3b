"""Airway exclusion on hard cases made from the real CTs in ../shared and a phantom (``tests/airway_cases.py``).

For each scan (TCIA Lung-PET-CT-Dx A0001 averaged to 2.5 x 2.5 x 5 mm, the CIP test CT, a phantom), the lung mask of
each variant (flipped, permuted, padded off-centre, cropped, resampled, with a table, tubes or a neck) is brought
back onto the original grid and compared with the original's: Dice of the lungs, and the airway volume removed
inside the original's field of view. On the CIP scan the Dice against CIP's own whole-lung mask is given too.

``contrast`` prints what the ``contrast_enhanced`` quality flag reads on the shared CTs: the DICOM ContrastBolusAgent
tag and the blood pool HU that ``LungMaskd`` measures.

Usage: python scripts/benchmark_airways.py run [--scans a0001,cip,phantom] [--full]
       python scripts/benchmark_airways.py contrast
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drasclr_ext.geometry import voxel_spacing  # noqa: E402
from drasclr_ext.transforms.lung_mask import compute_lung_mask  # noqa: E402
from tests import airway_cases as ac  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_scans(names: list[str], full: bool = False) -> dict:
    from drasclr_ext.transforms.io import _read_itk, load_ct

    scans = {}
    if "a0001" in names:
        image = load_ct(SHARED / "lung_ct" / "Lung_Dx-A0001")
        hu, affine = image.numpy(), image.affine.numpy().astype(np.float64)
        if not full:
            hu, affine = ac.block_downsample(hu, affine, (3, 3, 1))
        scans["A0001"] = (hu, affine, None)
    if "cip" in names:
        image = load_ct(SHARED / "cip_chest_ct" / "ct-64.nrrd")
        reference = _read_itk(str(SHARED / "cip_chest_ct" / "wholeLung-64.nrrd"))[0] > 0
        scans["CIP"] = (np.ascontiguousarray(image.numpy()), image.affine.numpy().astype(np.float64), reference)
    if "phantom" in names:
        from drasclr_ext.data.phantom import generate_phantom

        ph = generate_phantom(7, resolution_scale=3.0)
        scans["phantom"] = (ph["image"], ph["affine"], None)
    return scans


def run(scans: str = "a0001,cip,phantom", full: bool = False) -> None:
    names = [s.strip().lower() for s in scans.split(",")] if isinstance(scans, str) else list(scans)
    print("| scan | case | airway found | removed ml | in view (canonical) | Dice vs canonical | Dice vs CIP | s |")
    print("|---|---|---|---|---|---|---|---|")
    for scan, (hu, affine, reference) in load_scans(names, full).items():
        labels0, airway0 = compute_lung_mask(hu, affine, return_airways=True)
        voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000.0
        for name, (_, build) in ac.hard_cases(hu, affine, airway0.astype(bool), labels0).items():
            vhu, vaff = build()
            info: dict = {}
            start = time.perf_counter()
            try:
                labels, airway = compute_lung_mask(vhu, vaff, return_airways=True, info=info)
            except Exception as err:  # noqa: BLE001 - a benchmark row per case
                print(f"| {scan} | {name} | error: {err} | | | | | |")
                continue
            seconds = time.perf_counter() - start
            d, covered = ac.agreement(labels, vaff, labels0, affine)
            aw_back = ac.to_grid(airway, vaff, hu.shape, affine) == 1
            aw_view = f"{(aw_back & covered).sum() * voxel_ml:.1f} ({(airway0 & covered).sum() * voxel_ml:.1f})"
            cip = ""
            if reference is not None:
                back = ac.to_grid(labels, vaff, hu.shape, affine)
                inside = back != ac.OUTSIDE
                cip = f"{ac.dice((back > 0) & inside, reference & inside):.3f}"
            print(
                f"| {scan} | {name} | {info.get('airway_found')} | {info.get('airway_removed_ml')} | {aw_view} | "
                f"{d:.4f} | {cip} | {seconds:.2f} |",
                flush=True,
            )


def contrast() -> None:
    from drasclr_ext.errors import InputImageError
    from drasclr_ext.quality import scan_quality
    from drasclr_ext.transforms.io import load_ct
    from drasclr_ext.transforms.lung_mask import LungMaskd

    print("| scan | ContrastBolusAgent | blood pool HU | quality flags |")
    print("|---|---|---|---|")
    for path in ("lung_ct/Lung_Dx-A0001", "cip_chest_ct/ct-64.nrrd", "abdomen_ct_dicom"):
        image = load_ct(SHARED / path)
        try:
            image = LungMaskd("image")({"image": image})["image"]
        except InputImageError as err:
            print(f"(lung mask of {path}: {err})")
        acq = image.meta["acquisition"]
        flags = ", ".join(f["flag"] for f in scan_quality(image))
        print(f"| {path} | {acq['contrast_bolus_agent']!r} | {acq.get('blood_pool_hu', 'not measured')} | {flags} |")


if __name__ == "__main__":
    fire.Fire({"run": run, "contrast": contrast})
