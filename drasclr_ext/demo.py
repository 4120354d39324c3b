"""The main job on an embedded default input: a generated phantom chest CT through the pretraining bundle's
inference (lung mask, atlas registration, anatomical patches, DrasCLR patch and patient embeddings)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from drasclr_ext.errors import DrasCLRError

DEFAULT_BUNDLE = Path("bundles") / "drasclr_lung_ct_ssl"


def run_demo(out: str = "drasclr_demo", bundle: str | None = None, seed: int = 0) -> dict:
    """Generate one phantom, embed it with the bundle's weights, print and return what was written."""
    from monai.bundle import ConfigWorkflow

    from drasclr_ext.data.phantom import generate_phantom

    bundle_root = Path(bundle) if bundle else DEFAULT_BUNDLE
    if not (bundle_root / "configs" / "inference.json").is_file():
        raise DrasCLRError(
            f"no bundle at {bundle_root.resolve()}: run the demo from the repository root or pass "
            "--bundle path/to/drasclr_lung_ct_ssl"
        )
    out_dir = Path(out)
    scans = out_dir / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phantom = generate_phantom(seed)
    scan = scans / f"phantom_{seed:05d}.nii.gz"
    nib.save(nib.Nifti1Image(phantom["image"].astype(np.int16), phantom["affine"]), scan)
    print(f"phantom chest CT {phantom['image'].shape} written to {scan}")
    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "inference.json"),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=str(bundle_root / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(bundle_root),
        dataset_dir=str(scans),
        output_dir=str(out_dir / "embeddings"),
        overwrite=True,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    subject_dir = out_dir / "embeddings" / scan.name[: -len(".nii.gz")]
    manifest = json.loads((subject_dir / "manifest.json").read_text())
    files = manifest["files"]
    print(f"registration Dice to the atlas: {manifest['registration_dice']:.3f}")
    print(
        f"patch embeddings {tuple(files['patch_embeddings']['shape'])}, patient embedding "
        f"{tuple(files['patient_embedding']['shape'])} in {subject_dir} ({time.perf_counter() - start:.1f} s)"
    )
    return manifest
