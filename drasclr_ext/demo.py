"""The main job on an embedded default input: a generated phantom chest CT through the dense emphysema bundle
(lung mask, atlas registration, dense DrasCLR windows, subtype maps and the clinical report), or through the
pretraining bundle's inference (patch and patient embeddings) when ``bundle`` points at it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from drasclr_ext.errors import DrasCLRError

DEFAULT_BUNDLE = Path("bundles") / "drasclr_emphysema_subtype"
EMBEDDING_BUNDLE = "drasclr_lung_ct_ssl"


def _workflow(bundle_root: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "inference.json"),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=str(bundle_root / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(bundle_root),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def run_demo(out: str = "drasclr_demo", bundle: str | None = None, seed: int = 0) -> dict:
    """Map one generated phantom with the emphysema bundle (or embed it with the pretraining bundle), print and
    return what was written."""
    bundle_root = Path(bundle) if bundle else DEFAULT_BUNDLE
    if not (bundle_root / "configs" / "inference.json").is_file():
        raise DrasCLRError(
            f"no bundle at {bundle_root.resolve()}: run the demo from the repository root or pass "
            "--bundle path/to/drasclr_emphysema_subtype"
        )
    if bundle_root.resolve().name != EMBEDDING_BUNDLE:
        return _emphysema_demo(bundle_root, Path(out), seed)
    return _embedding_demo(bundle_root, Path(out), seed)


def _emphysema_demo(bundle_root: Path, out_dir: Path, seed: int) -> dict:
    """The bundle's embedded default: it generates phantom ``seed`` and writes maps, report and overview."""
    start = time.perf_counter()
    _workflow(bundle_root, output_dir=str(out_dir), phantom_seed=seed, overwrite=True)
    subject_dir = out_dir / f"phantom_{seed:05d}"
    report = json.loads((subject_dir / "report.json").read_text())
    fractions = ", ".join(f"{k} {100 * v:.1f} %" for k, v in report["subtype_fractions"].items())
    print(
        f"lung volume {report['lung_volume_ml']:.0f} ml, LAA-950 {report['laa950_percent']:.2f} %, "
        f"Perc15 {report['perc15_hu']:.0f} HU"
    )
    print(f"subtypes: {fractions}; CLE grade {report['cle_grade']}, PSE grade {report['pse_grade']}")
    print(f"maps, report.json and overview.png in {subject_dir} ({time.perf_counter() - start:.1f} s)")
    return report


def _embedding_demo(bundle_root: Path, out_dir: Path, seed: int) -> dict:
    from drasclr_ext.data.phantom import generate_phantom

    scans = out_dir / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phantom = generate_phantom(seed)
    scan = scans / f"phantom_{seed:05d}.nii.gz"
    nib.save(nib.Nifti1Image(phantom["image"].astype(np.int16), phantom["affine"]), scan)
    print(f"phantom chest CT {phantom['image'].shape} written to {scan}")
    _workflow(bundle_root, dataset_dir=str(scans), output_dir=str(out_dir / "embeddings"), overwrite=True)
    subject_dir = out_dir / "embeddings" / scan.name[: -len(".nii.gz")]
    manifest = json.loads((subject_dir / "manifest.json").read_text())
    files = manifest["files"]
    print(f"registration Dice to the atlas: {manifest['registration_dice']:.3f}")
    print(
        f"patch embeddings {tuple(files['patch_embeddings']['shape'])}, patient embedding "
        f"{tuple(files['patient_embedding']['shape'])} in {subject_dir} ({time.perf_counter() - start:.1f} s)"
    )
    return manifest
