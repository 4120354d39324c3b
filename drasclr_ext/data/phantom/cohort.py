"""A phantom cohort on disk: NIfTI images, labels and lung masks, ground-truth JSON and a MONAI datalist."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from drasclr_ext.data.phantom.generator import generate_phantom
from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import atomic_write_bytes, json_safe, write_nifti


def _case_files(out: Path, case: str) -> dict[str, Path]:
    return {
        "image": out / f"{case}_image.nii.gz",
        "label": out / f"{case}_label.nii.gz",
        "lung": out / f"{case}_lung.nii.gz",
        "info": out / f"{case}.json",
    }


def _write_case(out: Path, case_seed: int, options: dict[str, Any]) -> str:
    case = f"phantom_{case_seed:05d}"
    files = _case_files(out, case)
    if all(f.exists() for f in files.values()):
        return case
    result = generate_phantom(case_seed, **options)
    write_nifti(files["image"], result["image"], result["affine"], np.int16)
    write_nifti(files["label"], result["label"], result["affine"], np.uint8)
    write_nifti(files["lung"], result["lung_mask"], result["affine"], np.uint8)
    text = json.dumps(json_safe(result["info"]), indent=1)  # written last: its presence marks a complete case
    atomic_write_bytes(files["info"], text.encode())
    return case


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_val = int(round(n * val_fraction)) if n >= 3 else 0
    n_test = int(round(n * test_fraction)) if n >= 3 else 0
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    return n - n_val - n_test, n_val, n_test


def write_phantom_cohort(
    out: str | os.PathLike,
    n: int = 4,
    seed: int = 0,
    workers: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    datalist_name: str = "datalist.json",
    **options: Any,
) -> str:
    """Write ``n`` phantoms (seeds ``seed`` .. ``seed + n - 1``) and a MONAI datalist; resumable.

    Per case: ``<case>_image.nii.gz`` (int16 HU), ``<case>_label.nii.gz`` (emphysema labels), ``<case>_lung.nii.gz``
    (lungs 1 right/2 left) and ``<case>.json`` (ground truth). Cases already written are skipped. The datalist
    ``{"training", "validation", "test"}`` holds ``image``/``label``/``lung``/``info`` paths relative to ``out``.
    ``options`` go to :func:`generate_phantom` (shape, spacing, severity, subtypes, kernel, resolution_scale, ...).
    Returns the datalist path.
    """
    from tqdm.auto import tqdm

    if int(n) < 1:
        raise DrasCLRError(f"n must be at least 1, got {n}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(seed) + i for i in range(int(n))]
    if int(workers) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(int(workers)) as pool:
            futures = [pool.submit(_write_case, out_dir, s, options) for s in seeds]
            cases = [f.result() for f in tqdm(futures, desc="phantoms", unit="case")]
    else:
        cases = [_write_case(out_dir, s, options) for s in tqdm(seeds, desc="phantoms", unit="case")]
    n_train, n_val, _ = _split_counts(len(cases), val_fraction, test_fraction)
    entries = [{k: v.name for k, v in _case_files(out_dir, c).items()} for c in cases]
    datalist = {
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    path = out_dir / datalist_name
    atomic_write_bytes(path, json.dumps(datalist, indent=1).encode())
    return str(path)
