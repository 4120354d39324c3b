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
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import atomic_save_npy, atomic_write_json
from drasclr_ext.geometry import voxel_spacing
from drasclr_ext.parallel import distributed_rank, run_shares, set_threads
from drasclr_ext.subjects import FAILURES_FILE, failure_row, read_datalist, subject_name, subject_names, write_failures

__all__ = ["preprocess_cohort", "preprocess_subject"]

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
    from drasclr_ext.quality import scan_quality
    from drasclr_ext.transforms.io import save_like
    from drasclr_ext.transforms.lung_mask import lung_volumes_ml

    path = Path(path)
    subject = subject or subject_name(path)
    subject_dir = Path(out) / subject
    if (subject_dir / "meta.json").is_file() and not overwrite:
        return {"subject": subject, "status": "skipped", "input": str(path)}
    chain = _chain(atlas, atlas_path, k)
    timings: dict[str, float] = {}
    data: dict[str, Any] = {"image": str(path)}
    for step in chain.transforms:  # the chain's steps one by one: each is timed
        t = time.perf_counter()
        data = step(data)
        timings[_STEP_TIMINGS.get(type(step).__name__, type(step).__name__)] = time.perf_counter() - t
    image, result = data["image"], data["registration"]
    affine = np.asarray(image.affine, dtype=np.float64)
    lung = np.asarray(data["lung_mask"])[0]
    if not np.all(np.isfinite(data["patches"])):
        raise DrasCLRError(f"{path}: non-finite patch values; check the scan's intensities")

    subject_dir.mkdir(parents=True, exist_ok=True)
    (subject_dir / "meta.json").unlink(missing_ok=True)  # overwrite: unfinished until meta.json is written again
    save_like(lung, image, subject_dir / "lung_mask.nii.gz", dtype=np.uint8)
    atomic_save_npy(subject_dir / "patches.npy", np.asarray(data["patches"]).astype(np.float16))
    for name in ("locations", "neighbours", "centres_world"):
        atomic_save_npy(subject_dir / f"{name}.npy", np.asarray(data[name]))
    result.save(subject_dir / "transform.json")
    meta = {
        "subject": subject,
        "input": str(path.resolve()),
        "shape": list(lung.shape),
        "spacing_mm": np.asarray(image.meta.get("spacing", voxel_spacing(affine))).tolist(),
        "affine": affine.tolist(),
        "acquisition": image.meta.get("acquisition"),
        "quality": scan_quality(image),
        "lung_volume_ml": lung_volumes_ml(lung, affine),
        "atlas": result.atlas_name,
        "num_landmarks": int(len(data["locations"])),
        "neighbours_k": k,
        "registration": {
            "dice": result.dice,
            "metric": result.metric,
            "iterations": result.iterations,
            "seconds": result.seconds,
            "stop_condition": result.stop_condition,
        },
        "patches": {"file": "patches.npy", "dtype": "float16", "range": [-1.0, 1.0], "hu_window": [-1024, 240]},
        "timings_s": timings,
        "versions": _versions(),
    }
    atomic_write_json(subject_dir / "meta.json", meta)
    return {"subject": subject, "status": "done", "input": str(path), "dice": result.dice}


def _run_one(path: str, out: str, atlas: str, atlas_path: Optional[str], k: int, overwrite: bool, subject: str):
    """Worker entry: never raises; returns the status dict or a failure dict with the reason."""
    try:
        return preprocess_subject(path, out, atlas, atlas_path, k, overwrite, subject)
    except Exception as exc:  # one bad scan never stops the cohort
        return {**failure_row(subject, path, exc), "status": "failed"}


def _write_failures(out: Path, failures: list[dict]) -> Path:
    """``out/failures.csv`` (the schema of every cohort command), sorted by subject."""
    return write_failures(out / FAILURES_FILE, sorted(failures, key=lambda f: f["subject"]))


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
    """Preprocess every scan of ``datalist`` into ``out`` (see the module docstring); resumable.

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
            cores divided by the processes (:func:`drasclr_ext.parallel.threads_per_process`).

    Returns:
        summary: counts (``total``, ``done``, ``skipped``, ``failed``), ``failures_csv``, ``store``.
    """
    from drasclr_ext.atlas import load_atlas

    load_atlas(atlas, atlas_path)  # fail fast on a bad atlas, before touching any scan
    scans = read_datalist(datalist)
    if not scans:
        raise DrasCLRError(f"no scans found in {datalist}: give a folder of CT files or DICOM folders, or a datalist")
    names = subject_names(scans)
    jobs = [(str(p), str(out), str(atlas), atlas_path, int(k), bool(overwrite), n) for p, n in zip(scans, names)]
    out = Path(out)
    threads = set_threads(int(workers), threads)
    mine, parts = run_shares(
        out, jobs, lambda share, alone: _run_jobs(share, workers, progress, out if alone else None, threads)
    )
    if parts is None:  # a torchrun rank other than 0: rank 0 writes the cohort's files
        return {"rank": distributed_rank()[0], "total": len(mine), **_counts(mine)}
    return _finish_cohort([r for part in parts for r in part], len(jobs), out, build_store)


def _counts(results: Sequence[dict]) -> dict[str, int]:
    return {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}


def _run_jobs(
    jobs: list[tuple], workers: int, progress: bool, failures_to: Optional[Path] = None, threads: int = 1
) -> list[dict]:
    """Run the ``_run_one`` jobs (in ``workers`` processes of ``threads`` torch threads); their results. With
    ``failures_to``, ``failures.csv`` there is rewritten after each failure (a long run shows its failures as they
    come)."""
    from tqdm.auto import tqdm

    results: list[dict] = []
    bar = tqdm(total=len(jobs), desc="preprocess", unit="scan", disable=not progress)

    def record(res: dict) -> None:
        results.append(res)
        if res["status"] == "failed" and failures_to is not None:
            _write_failures(failures_to, [r for r in results if r["status"] == "failed"])
        bar.set_postfix_str(f"{res['subject']}: {res['status']}")
        bar.update(1)

    if int(workers) <= 1:
        for job in jobs:
            record(_run_one(*job))
    else:
        import multiprocessing

        import torch

        context = multiprocessing.get_context("spawn")  # ITK and torch threads do not survive fork
        with ProcessPoolExecutor(
            max_workers=int(workers), mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(_run_one, *job) for job in jobs]
            for future in as_completed(futures):
                record(future.result())
    bar.close()
    return results


def _finish_cohort(results: Sequence[dict], total: int, out: Path, build_store: bool) -> dict[str, Any]:
    """Write ``failures.csv`` and the patch store of a whole cohort; its summary."""
    from drasclr_ext.data.patch_store import build_patch_store

    failures = [r for r in results if r["status"] == "failed"]
    failures_csv = _write_failures(out, failures)
    store = build_patch_store(out) if build_store else None
    counts = _counts(results)
    return {
        "total": total,
        "done": counts["done"],
        "skipped": counts["skipped"],
        "failed": len(failures),
        "failures_csv": str(failures_csv),
        "store": None if store is None else str(store),
    }
