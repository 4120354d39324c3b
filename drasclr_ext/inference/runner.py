"""Run a bundle's inference over a cohort: preprocessing -> inferer -> writer, one subject at a time."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from tqdm.auto import tqdm

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.parallel import distributed_rank, run_shares
from drasclr_ext.subjects import FAILURES_FILE, failure_row, read_datalist, subject_names, write_failures

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

__all__ = ["CohortRunner"]


class CohortRunner:
    """Process every scan of a cohort into ``output_dir/<subject>/`` with one loaded model.

    For each scan: ``data = preprocessing({"image": path, "subject": name})``, ``data = inferer(data)``,
    ``writer(data, output_dir / name)``. The writer writes ``done_file`` last; subjects that have it are skipped
    (resumable). A scan that fails (our ``DrasCLRError`` or anything unexpected) is listed with its reason in
    ``output_dir/failures.csv`` and the cohort goes on; ``output_dir/summary.json`` sums up the run.

    Before any scan is computed the run checks the dataset (not empty, no two inputs with one subject name) and the
    output directory (writable), and locks it (:class:`~drasclr_ext.fileio.OutputLock`); a problem stops it with a
    ``DrasCLRError``.

    Launched by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set, on one or several nodes sharing ``output_dir``), each
    process takes every ``WORLD_SIZE``-th scan from its ``RANK`` on, under its own lock; rank 0 then writes the one
    ``failures.csv`` and ``summary.json`` of the whole cohort (gathered over a gloo process group).

    Args:
        dataset: a folder of scans (image files or DICOM series folders), a MONAI datalist JSON, or a list of paths.
        output_dir: where the per-subject folders go.
        preprocessing: dict -> dict callable (a MONAI ``Compose`` of our dictionary transforms).
        inferer: dict -> dict callable that adds the model's outputs.
        writer: callable ``(data, subject_dir) -> None``.
        done_file: name of the file the writer writes last.
        overwrite: process finished subjects again.
        progress: show a progress bar.
    """

    def __init__(
        self,
        dataset: PathLike | Sequence[PathLike],
        output_dir: PathLike,
        preprocessing: Callable[[dict], dict],
        inferer: Callable[[dict], dict],
        writer: Callable[[dict, Path], Any],
        done_file: str = "manifest.json",
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.writer = writer
        self.done_file = done_file
        self.overwrite = overwrite
        self.progress = progress

    def scans(self) -> list[Path]:
        if isinstance(self.dataset, (list, tuple)):
            return [Path(p) for p in self.dataset]
        return read_datalist(self.dataset)

    def run(self) -> dict[str, Any]:
        scans = self.scans()
        if not scans:
            raise DrasCLRError(
                f"no scans found in {self.dataset}: give a folder of CT files or DICOM folders, or a datalist JSON"
            )
        names = subject_names(scans)
        mine, parts = run_shares(self.output_dir, list(zip(scans, names)), lambda work, _: self._process(work))
        if parts is None:  # a torchrun rank other than 0: rank 0 writes the cohort's files
            return {
                "rank": distributed_rank()[0],
                "processed": mine[0],
                "skipped": mine[1],
                "failed": [f["subject"] for f in mine[2]],
            }
        merged = [sum((part[i] for part in parts), []) for i in range(3)]
        return self._finish(*merged, max(part[3] for part in parts))

    def _process(self, work: Sequence[tuple[Path, str]]) -> tuple[list[str], list[str], list[dict[str, str]], float]:
        """Run the subjects of ``work``; their names done and skipped, failure rows, seconds."""
        done, skipped, failures = [], [], []
        start = time.perf_counter()
        for path, name in tqdm(work, desc="subjects", unit="scan", disable=not self.progress):
            subject_dir = self.output_dir / name
            if not self.overwrite and (subject_dir / self.done_file).is_file():
                skipped.append(name)
                continue
            try:
                data = self.inferer(self.preprocessing({"image": str(path), "subject": name}))
                self.writer(data, subject_dir)
                done.append(name)
            except Exception as exc:  # one bad scan never stops the cohort
                failures.append(failure_row(name, path, exc))
        return done, skipped, failures, time.perf_counter() - start

    def _finish(
        self, done: list[str], skipped: list[str], failures: list[dict[str, str]], seconds: float
    ) -> dict[str, Any]:
        """Write ``failures.csv`` and ``summary.json`` of the run; the summary."""
        write_failures(self.output_dir / FAILURES_FILE, failures)
        summary = {
            "processed": done,
            "skipped": skipped,
            "failed": [f["subject"] for f in failures],
            "quality_flags": self._count_flags([*done, *skipped]),
            "seconds": round(seconds, 2),
        }
        atomic_write_json(self.output_dir / "summary.json", summary)
        logger.info(
            f"{len(done)} processed, {len(skipped)} already done, {len(failures)} failed"
            + (f" (see {self.output_dir / FAILURES_FILE})" if failures else "")
        )
        return summary

    def _count_flags(self, names: Sequence[str]) -> dict[str, int]:
        """How many of the subjects' done files (``report.json``...) carry each quality flag."""
        counts: dict[str, int] = {}
        for name in names:
            try:
                flags = json.loads((self.output_dir / name / self.done_file).read_text()).get("quality") or []
            except (OSError, ValueError, AttributeError):
                continue
            for flag in {f.get("flag") for f in flags if isinstance(f, dict)}:
                counts[flag] = counts.get(flag, 0) + 1
        return dict(sorted(counts.items()))
