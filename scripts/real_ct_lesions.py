"""Lesion-insertion evaluation of the dense emphysema bundle on a real chest CT.

Inserts centrilobular, paraseptal and panlobular lesions into a real CT
(:func:`drasclr_ext.data.lesions.insert_lesions`), runs the bundle ``drasclr_emphysema_subtype`` on the modified and
on the original scan, and reports per inserted region (and per subtype pooled) the share of its truth voxels the map
flags as emphysema (label 2-4), the subtype holding the majority among them and its share; and the share of the
untouched lung (lung voxels farther than ``--margin_mm`` from every changed voxel) flagged as emphysema, on both
scans. Project targets (reported, not asserted): at least 80 % of each region flagged with the right subtype in the
majority; at most 2 % of the untouched lung flagged.

Data: TCIA Lung-PET-CT-Dx, case Lung_Dx-A0001 (Li P. et al., "A Large-Scale CT and PET/CT Dataset for Lung Cancer
Diagnosis", The Cancer Imaging Archive 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461), CC BY 4.0.

Usage: python scripts/real_ct_lesions.py [--ct ../shared/data/lung_ct/Lung_Dx-A0001] [--out /tmp/real_ct_lesions]
[--seed 0] [--bundle_root bundles/drasclr_emphysema_subtype] [--ckpt_path model.pt] [--margin_mm 3]

Writes to ``--out``: ``<subject>_lesions.nii.gz`` (modified CT, int16, the CT's affine),
``<subject>_lesion_truth.nii.gz`` (uint8: 2 CLE, 3 PSE, 4 PLE), ``<subject>_lesion_regions.nii.gz`` (uint16 region
ids), ``bundle/<subject>[_lesions]/`` (the bundle's outputs), ``real_ct_lesions.json``, ``real_ct_lesions.png``.
Exit status 0 when it ran, whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCE = {
    "dataset": "Lung-PET-CT-Dx, The Cancer Imaging Archive (TCIA)",
    "case": "Lung_Dx-A0001",
    "citation": "Li P, Wang S, Li T, Lu J, HuangFu Y, Wang D. A Large-Scale CT and PET/CT Dataset for Lung Cancer "
    "Diagnosis [Data set]. The Cancer Imaging Archive, 2020. https://doi.org/10.7937/TCIA.2020.NNC2-0461",
    "license": "CC BY 4.0",
}
CREDIT = "TCIA Lung-PET-CT-Dx A0001, CC BY 4.0"
NAMES = {0: "outside", 1: "normal", 2: "centrilobular", 3: "paraseptal", 4: "panlobular"}
TARGET_FLAGGED, TARGET_UNTOUCHED = 0.80, 0.02
WINDOW = (-1000.0, -400.0)  # HU shown: a lung window narrow enough to see lucencies
ZOOM_MM = 120.0  # side of the axial close-ups around CLE and PSE regions


def read_ct(path: Path) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, str]:
    """The CT as read by the bundle (LoadCTd, LungMaskd): MetaTensor, HU, affine, lung labels, subject name."""
    from drasclr_ext.transforms.io import LoadCTd
    from drasclr_ext.transforms.lung_mask import LungMaskd

    d = LungMaskd(keys="image", mask_key="lung_mask")(LoadCTd(keys="image")({"image": str(path)}))
    image = d["image"]
    return image, image[0].numpy(), image.affine.numpy(), d["lung_mask"][0].numpy(), str(image.meta["subject"])


def run_bundle(
    bundle_root: Path, datalist: Path, output_dir: Path, ckpt_path: Optional[str], harmonise: bool = True
) -> dict[str, Any]:
    """The bundle's inference.json over the datalist (overwriting earlier results); its summary."""
    from monai.bundle import ConfigWorkflow

    overrides: dict[str, Any] = {"dataset_dir": str(datalist), "output_dir": str(output_dir), "overwrite": True}
    overrides["harmonise"] = bool(harmonise)
    if ckpt_path:
        overrides["ckpt_path"] = str(Path(ckpt_path).resolve())
    wf = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "inference.json"),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(bundle_root),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    summary = json.loads((output_dir / "summary.json").read_text())
    if summary["failed"]:
        reasons = (output_dir / "failures.csv").read_text()
        raise RuntimeError(f"the bundle failed on {summary['failed']}:\n{reasons}")
    return summary


def load_label(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    if tuple(img.shape) != tuple(shape) or not np.allclose(img.affine, affine, atol=1e-3):
        raise RuntimeError(f"{path} is not on the CT's grid: {img.shape} vs {shape}")
    return np.asarray(img.dataobj, dtype=np.uint8)


def flag_stats(pred: np.ndarray, label: Optional[int] = None) -> dict[str, Any]:
    """Share of voxels flagged as emphysema (2-4), the majority subtype among the flagged and its share."""
    n = int(pred.size)
    counts = np.bincount(pred.ravel(), minlength=5)[:5]
    flagged = int(counts[2:].sum())
    out: dict[str, Any] = {
        "voxels": n,
        "flagged_share": round(flagged / n, 4) if n else None,
        "labels": {NAMES[k]: int(counts[k]) for k in range(5)},
    }
    if flagged:
        major = int(np.argmax(counts[2:])) + 2
        out.update(majority=NAMES[major], majority_share=round(float(counts[major]) / flagged, 4))
    else:
        out.update(majority=None, majority_share=None)
    if label is not None:
        out["right_subtype_share"] = round(float(counts[label]) / n, 4) if n else None
        out["meets_target"] = bool(n and flagged / n >= TARGET_FLAGGED and out["majority"] == NAMES[label])
    return out


def evaluate(
    lesions: dict[str, Any],
    lung: np.ndarray,
    pred_mod: np.ndarray,
    pred_orig: np.ndarray,
    spacing: np.ndarray,
    margin_mm: float,
) -> dict[str, Any]:
    from scipy import ndimage as ndi

    truth, region_map, changed = lesions["truth"], lesions["region_map"], lesions["changed"]
    regions = []
    for i, reg in enumerate(lesions["regions"]):
        sel = region_map == i + 1
        stats = {"modified": flag_stats(pred_mod[sel], reg["label"]), "original": flag_stats(pred_orig[sel])}
        regions.append({**reg, **stats})
    pooled = {}
    for label in (2, 3, 4):
        sel = truth == label
        if sel.any():
            pooled[NAMES[label]] = {
                "regions": sum(r["label"] == label for r in lesions["regions"]),
                "modified": flag_stats(pred_mod[sel], label),
                "original": flag_stats(pred_orig[sel]),
            }
    far = ndi.distance_transform_edt(~changed, sampling=spacing) > margin_mm
    untouched = (lung > 0) & far
    out_mod, out_orig = flag_stats(pred_mod[untouched]), flag_stats(pred_orig[untouched])
    for s in (out_mod, out_orig):
        s["meets_target"] = s["flagged_share"] is not None and s["flagged_share"] <= TARGET_UNTOUCHED
    return {
        "regions": regions,
        "per_subtype": pooled,
        "untouched_lung": {"margin_mm": margin_mm, "modified": out_mod, "original": out_orig},
    }


def _pct(v: Optional[float]) -> str:
    return "   -" if v is None else f"{100 * v:5.1f}%"


def print_table(result: dict[str, Any]) -> None:
    print(f"{'region':<28}{'voxels':>8}{'flagged':>9}{'majority':>15}{'share':>8}{'target':>8}{'before':>9}")
    rows = [(f"{i + 1:2d} {r['subtype']} ({r['lung']})", r) for i, r in enumerate(result["regions"])]
    rows += [(f"all {k}", v) for k, v in result["per_subtype"].items()]
    for name, r in rows:
        m, o = r["modified"], r["original"]
        print(
            f"{name:<28}{m['voxels']:>8}{_pct(m['flagged_share']):>9}{str(m['majority']):>15}"
            f"{_pct(m['majority_share']):>8}{'met' if m['meets_target'] else 'missed':>8}{_pct(o['flagged_share']):>9}"
        )
    u = result["untouched_lung"]
    for key in ("modified", "original"):
        s = u[key]
        print(
            f"untouched lung, {key} scan: {s['voxels']} voxels, {_pct(s['flagged_share']).strip()} flagged "
            f"(target <= {100 * TARGET_UNTOUCHED:.0f} %: {'met' if s['meets_target'] else 'missed'})"
        )


def render(
    path: Path,
    hu_mod: np.ndarray,
    hu_orig: np.ndarray,
    affine: np.ndarray,
    lesions: dict[str, Any],
    pred_mod: np.ndarray,
    pred_orig: np.ndarray,
    title: str,
) -> Path:
    """Rows: axial slices through inserted regions (the first of each subtype and lung; CLE and PSE as close-ups) and
    a coronal slice through the PLE region; columns: modified CT with the truth outlined in the subtype's colour, the
    modified CT with its predicted map (truth outlined in white), the original CT with its map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Patch

    from drasclr_ext.fileio import atomic_write
    from drasclr_ext.inference.dense import LABEL_COLOURS

    ornt = nib.orientations.io_orientation(affine)
    ras = [nib.orientations.apply_orientation(np.asarray(a), ornt) for a in (hu_mod, hu_orig, lesions["truth"])]
    ras += [nib.orientations.apply_orientation(np.asarray(a), ornt) for a in (pred_mod, pred_orig)]
    hu_m, hu_o, truth, p_mod, p_orig = ras
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, hu_mod.shape)
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    inv = np.linalg.inv(ras_affine)

    def index_of(centre: list[float]) -> np.ndarray:
        idx = np.round(inv[:3, :3] @ np.asarray(centre) + inv[:3, 3]).astype(int)
        return np.clip(idx, 0, np.array(hu_m.shape) - 1)

    views, seen = [], set()
    for reg in lesions["regions"]:  # first region of each subtype and lung: axial, zoomed on the region
        key = (reg["subtype"], reg["lung"])
        if key in seen or reg["voxels"] == 0:
            continue
        seen.add(key)
        centre = index_of(reg["centre_mm"])
        zoom = reg["label"] != 4
        views.append(("axial", int(centre[2]), f"{reg['subtype']} ({reg['lung']})", centre if zoom else None))
    views = views[:5]
    ple = [r for r in lesions["regions"] if r["label"] == 4]
    anchor = ple[0] if ple else lesions["regions"][0]
    views.append(("coronal", int(index_of(anchor["centre_mm"])[1]), f"through the {anchor['subtype']} region", None))

    nz = np.argwhere((p_orig > 0) | (truth > 0))
    lo, hi = np.maximum(nz.min(0) - 10, 0), np.minimum(nz.max(0) + 11, np.array(hu_m.shape))
    half = np.round(ZOOM_MM / 2 / spacing).astype(int)
    colours = np.zeros((5, 4))
    for value, rgb in LABEL_COLOURS.items():
        colours[value] = (*rgb, 0.15 if value == 1 else 0.6)
    columns = [
        "modified CT, inserted truth outlined",
        "modified CT + predicted map (truth in white)",
        "original CT + its map",
    ]
    fig, axes = plt.subplots(len(views), 3, figsize=(15, 4.6 * len(views)), squeeze=False)
    for row, (kind, k, what, centre) in zip(axes, views):
        if kind == "axial":
            a0, a1 = (lo[:2], hi[:2]) if centre is None else (centre[:2] - half[:2], centre[:2] + half[:2] + 1)
            a0, a1 = np.maximum(a0, 0), np.minimum(a1, np.array(hu_m.shape[:2]))
            cut: tuple = (slice(a0[0], a1[0]), slice(a0[1], a1[1]), k)
            aspect = spacing[1] / spacing[0]
            where = f"axial {k}" + (f", {ZOOM_MM:.0f} mm around the region" if centre is not None else "")
        else:
            cut = (slice(lo[0], hi[0]), k, slice(lo[2], hi[2]))
            aspect = spacing[2] / spacing[0]
            where = f"coronal {k}"
        truth_2d = truth[cut].T[:, ::-1]  # rows = second axis (A or S); patient right on the image's left
        for col, (ax, name) in enumerate(zip(row, columns)):
            img, lab = [(hu_m, None), (hu_m, p_mod), (hu_o, p_orig)][col]
            ax.imshow(img[cut].T[:, ::-1], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="lower", aspect=aspect)
            if lab is not None:
                overlay = colours[lab[cut].T[:, ::-1].astype(int)]
                ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
            for value in (2, 3, 4):
                if col < 2 and np.any(truth_2d == value):
                    colour = LABEL_COLOURS[value] if col == 0 else "white"
                    mask = (truth_2d == value).astype(float)
                    ax.contour(mask, levels=[0.5], colors=[colour], linewidths=0.8, origin="lower")
            ax.set_title(f"{name}\n{where}: {what}", fontsize=9)
            ax.axis("off")
    handles = [Patch(color=LABEL_COLOURS[v], label=NAMES[v]) for v in (1, 2, 3, 4)]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=REPO.parent / "shared/data/lung_ct/Lung_Dx-A0001")
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_ct_lesions"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle_root", type=Path, default=REPO / "bundles/drasclr_emphysema_subtype")
    parser.add_argument("--ckpt_path", default=None, help="weights (default: the bundle's models/model.pt)")
    parser.add_argument("--margin_mm", type=float, default=3.0, help="untouched lung: farther than this from lesions")
    parser.add_argument("--no_harmonise", action="store_true", help="run the bundle with harmonise False")
    args = parser.parse_args(argv)

    from drasclr_ext.data.lesions import insert_lesions
    from drasclr_ext.fileio import atomic_write_json
    from drasclr_ext.transforms.io import save_like

    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    image, hu, affine, lung, subject = read_ct(args.ct)
    timings["read_and_lung_mask_s"] = time.perf_counter() - start

    t = time.perf_counter()
    lesions = insert_lesions(hu, affine, lung, seed=args.seed)
    timings["insert_s"] = time.perf_counter() - t
    files = {
        "modified_ct": out / f"{subject}_lesions.nii.gz",
        "truth": out / f"{subject}_lesion_truth.nii.gz",
        "region_map": out / f"{subject}_lesion_regions.nii.gz",
    }
    save_like(lesions["image"], image, files["modified_ct"], np.int16)
    save_like(lesions["truth"], image, files["truth"], np.uint8)
    save_like(lesions["region_map"], image, files["region_map"], np.uint16)
    datalist = out / "datalist.json"
    atomic_write_json(datalist, [str(files["modified_ct"]), str(args.ct.resolve())])

    t = time.perf_counter()
    bundle_out = out / "bundle"
    run_bundle(args.bundle_root.resolve(), datalist, bundle_out, args.ckpt_path, not args.no_harmonise)
    timings["bundle_s"] = time.perf_counter() - t
    mod_dir, orig_dir = bundle_out / f"{subject}_lesions", bundle_out / subject
    pred_mod = load_label(mod_dir / "subtype_label.nii.gz", hu.shape, affine)
    pred_orig = load_label(orig_dir / "subtype_label.nii.gz", hu.shape, affine)
    model = json.loads((orig_dir / "report.json").read_text()).get("model", {})

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    result = evaluate(lesions, lung, pred_mod, pred_orig, spacing, args.margin_mm)
    files["png"] = out / "real_ct_lesions.png"
    title = (
        f"{subject} with inserted lesions (seed {args.seed}); data: {CREDIT}; "
        f"weights sha256 {str(model.get('weights_sha256', ''))[:12]}"
    )
    render(files["png"], lesions["image"], hu, affine, lesions, pred_mod, pred_orig, title)
    timings["total_s"] = time.perf_counter() - start
    report = {
        "source": SOURCE,
        "input": str(args.ct.resolve()),
        "seed": args.seed,
        "model": model,
        "noise": lesions["noise"],
        "targets": {
            "region_flagged_share_min": TARGET_FLAGGED,
            "region_majority": "the inserted subtype",
            "untouched_flagged_share_max": TARGET_UNTOUCHED,
        },
        **result,
        "definitions": {
            "truth": "lung voxels at least half replaced by the inserted lesion (lesion volume fraction >= 0.5)",
            "flagged_share": "share of the voxels the map labels 2-4 (any emphysema subtype)",
            "majority": "most frequent subtype among the flagged voxels; majority_share its share of them",
            "untouched_lung": "lung voxels (LungMaskd of the original) farther than margin_mm from every changed voxel",
            "modified/original": "the map of the scan with lesions / of the original scan, on the same voxels",
        },
        "files": {k: str(v) for k, v in files.items()} | {"bundle_output": str(bundle_out)},
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "real_ct_lesions.json", report)
    print(f"{subject} ({CREDIT}), seed {args.seed}, lung noise {lesions['noise']['sigma_hu']} HU")
    print_table(result)
    print(f"wrote {out / 'real_ct_lesions.json'} and {files['png']} in {timings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
