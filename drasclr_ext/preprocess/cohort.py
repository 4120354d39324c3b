"""Cohort preprocessing: scans -> lung mask -> atlas registration -> anatomical patches -> patch store.

For each scan, ``out/<subject>/`` receives (each file written atomically; ``meta.json`` last, it marks the subject
finished so a rerun skips it):

- ``lung_mask.nii.gz``: uint8 labels (1 right, 2 left) in the scan's own geometry;
- ``patches.npy``: (L, 32, 32, 32) float16 patches in [-1, 1] (float16 halves the disk; its step near +-1 is about
  0.3 HU);
- ``locations.npy`` (L, 3) float32, ``neighbours.npy`` (L, k) int64, ``centres_world.npy`` (L, 3) subject RAS mm;
- ``transform.json``: the :class:`~drasclr_ext.transforms.registration.RegistrationResult`;
- ``meta.json``: input, geometry, acquisition, lung volumes, registration quality and timings, versions.

``out/failures.csv`` lists the scans that failed with one reason each; ``out/store/`` is the location-grouped patch
store (:mod:`drasclr_ext.data.patch_store`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import atomic_save_npy, atomic_write_json
from drasclr_ext.geometry import voxel_spacing
from drasclr_ext.inference.runner import TIMINGS_KEY, CohortRunner, run_timed
from drasclr_ext.parallel import set_threads
from drasclr_ext.subjects import FAILURES_FILE, subject_name

__all__ = ["DONE_FILE", "preprocess_cohort", "preprocess_subject", "write_preprocessed"]

DONE_FILE = "meta.json"

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


_CHAINS: dict[tuple, Any] = {}  # per process: the preprocessing chain, built once (ITK starts once)
_STEP_TIMINGS = {
    "LoadCTd": "read_s",
    "LungMaskd": "lung_mask_s",
    "AtlasRegistrationd": "registration_s",
    "AnatomicalPatchesd": "patches_s",
}


def _chain(atlas: str, atlas_path: Optional[str], k: int) -> Any:
    """The bundles' preprocessing chain with the anatomical patches (``ct_preprocessing``), cached per process."""
    key = (atlas, atlas_path, k)
    if key not in _CHAINS:
        from drasclr_ext.atlas import load_atlas
        from drasclr_ext.transforms.chain import ct_preprocessing

        _CHAINS[key] = ct_preprocessing(load_atlas(atlas, atlas_path), patches_k=k)
    return _CHAINS[key]


def _versions() -> dict[str, str]:
    import itk
    import monai

    import drasclr_ext

    return {
        "drasclr_ext": drasclr_ext.__version__,
        "monai": monai.__version__,
        "itk": itk.Version.GetITKVersion(),
        "numpy": np.__version__,
    }


def preprocess_subject(
    path: PathLike,
    out: PathLike,
    atlas: str = "default",
    atlas_path: Optional[str] = None,
    k: int = 2,
    overwrite: bool = False,
    subject: Optional[str] = None,
) -> dict[str, Any]:
    """Preprocess one scan into ``out/<subject>/``; returns ``{"subject", "status": "done"|"skipped", ...}``.

    Raises whatever fails (``DrasCLRError`` subclasses for bad input or a failed registration).
    """
    path = Path(path)
    subject = subject or subject_name(path)
    subject_dir = Path(out) / subject
    if (subject_dir / DONE_FILE).is_file() and not overwrite:
        return {"subject": subject, "status": "skipped", "input": str(path)}
    data = run_timed(_chain(atlas, atlas_path, k), {"image": str(path), "subject": subject})
    write_preprocessed(data, subject_dir)
    return {"subject": subject, "status": "done", "input": str(path), "dice": data["registration"].dice}


def write_preprocessed(data: dict[str, Any], subject_dir: Path) -> None:
    """The files of one preprocessed subject (see the module docstring) from the chain's output ``data``;
    ``meta.json`` last."""
    from drasclr_ext.quality import scan_quality
    from drasclr_ext.transforms.io import save_like
    from drasclr_ext.transforms.lung_mask import lung_volumes_ml

    image, result = data["image"], data["registration"]
    affine = np.asarray(image.affine, dtype=np.float64)
    lung = np.asarray(data["lung_mask"])[0]
    source = Path(image.meta["filename_or_obj"]).resolve()
    if not np.all(np.isfinite(data["patches"])):
        raise DrasCLRError(f"{source}: non-finite patch values; check the scan's intensities")
    subject_dir.mkdir(parents=True, exist_ok=True)
    (subject_dir / DONE_FILE).unlink(missing_ok=True)  # overwrite: unfinished until meta.json is written again
    save_like(lung, image, subject_dir / "lung_mask.nii.gz", dtype=np.uint8)
    atomic_save_npy(subject_dir / "patches.npy", np.asarray(data["patches"]).astype(np.float16))
    for name in ("locations", "neighbours", "centres_world"):
        atomic_save_npy(subject_dir / f"{name}.npy", np.asarray(data[name]))
    result.save(subject_dir / "transform.json")
    timings = data.get(TIMINGS_KEY, {})
    meta = {
        "subject": subject_dir.name,
        "input": str(source),
        "shape": list(lung.shape),
        "spacing_mm": np.asarray(image.meta.get("spacing", voxel_spacing(affine))).tolist(),
        "affine": affine.tolist(),
        "acquisition": image.meta.get("acquisition"),
        "quality": scan_quality(image),
        "lung_volume_ml": lung_volumes_ml(lung, affine),
        "atlas": result.atlas_name,
        "num_landmarks": int(len(data["locations"])),
        "neighbours_k": int(data["neighbours"].shape[1]),
        "registration": {
            "dice": result.dice,
            "metric": result.metric,
            "iterations": result.iterations,
            "seconds": result.seconds,
            "stop_condition": result.stop_condition,
        },
        "patches": {"file": "patches.npy", "dtype": "float16", "range": [-1.0, 1.0], "hu_window": [-1024, 240]},
        "timings_s": {_STEP_TIMINGS.get(step, step): seconds for step, seconds in timings.items()},
        "versions": _versions(),
    }
    atomic_write_json(subject_dir / DONE_FILE, meta)


def _identity(data: dict) -> dict:
    return data


def preprocess_cohort(
    datalist: PathLike,
    out: PathLike,
    atlas: str = "default",
    workers: int = 1,
    atlas_path: Optional[str] = None,
    k: int = 2,
    overwrite: bool = False,
    build_store: bool = True,
    progress: bool = True,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Preprocess every scan of ``datalist`` into ``out`` (see the module docstring) on the cohort loop of the
    bundles (:class:`~drasclr_ext.inference.runner.CohortRunner`); resumable.

    Args:
        datalist: a MONAI datalist JSON or a folder of scans (see :func:`read_datalist`).
        out: output folder.
        atlas: ``"default"`` or ``"drasclr"`` (needs ``atlas_path``), see :func:`drasclr_ext.atlas.load_atlas`.
        workers: parallel processes (1: in this process).
        atlas_path: folder of the atlas files.
        k: neighbours per landmark.
        overwrite: redo finished subjects.
        build_store: build/refresh ``out/store`` at the end.
        progress: show a tqdm progress bar.
        threads: torch threads per process; default ``$DRASCLR_THREADS``, ``$OMP_NUM_THREADS``, else the usable
            cores divided by the processes, no more than other processes leave idle
            (:func:`drasclr_ext.parallel.threads_per_process`).

    Returns:
        summary: counts (``total``, ``done``, ``skipped``, ``failed``), ``failures_csv``, ``store``.
    """
    chain = _chain(atlas, atlas_path, k)  # loads the atlas: a bad one fails here, before any scan
    threads = set_threads(int(workers), threads)
    runner = CohortRunner(
        datalist,
        out,
        chain,
        _identity,
        write_preprocessed,
        done_file=DONE_FILE,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        threads=threads,
        step_timings=True,
        description="preprocess",
    )
    summary = runner.run()
    counts = {"done": len(summary["processed"]), "skipped": len(summary["skipped"]), "failed": len(summary["failed"])}
    total = sum(counts.values())
    if "rank" in summary:  # a torchrun rank other than 0: rank 0 writes the cohort's files
        return {"rank": summary["rank"], "total": total, **counts}
    store = None
    if build_store:
        from drasclr_ext.data.patch_store import build_patch_store

        store = build_patch_store(Path(out))
    return {**{"total": total}, **counts, "failures_csv": str(Path(out) / FAILURES_FILE), "store": store and str(store)}
