"""Run a pipeline over a cohort: preprocessing -> inferer -> writer, one subject at a time, in this process or in a
pool of worker processes; resumable, with one ``failures.csv`` and one ``summary.json``."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from tqdm.auto import tqdm

from drasclr_ext.errors import DrasCLRError
from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.parallel import distributed_rank, run_shares
from drasclr_ext.subjects import FAILURES_FILE, failure_row, read_datalist, subject_names, write_failures

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
Outcome = Union[str, dict]  # "done", "skipped", or a failures.csv row

__all__ = ["TIMINGS_KEY", "CohortRunner", "run_timed"]

TIMINGS_KEY = "timings_s"


def run_timed(chain: Any, data: dict) -> dict:
    """``chain(data)`` step by step for a MONAI ``Compose`` (its ``transforms``), with each step's seconds under
    ``data["timings_s"]`` keyed by the step's class name (summed over steps of one class); any other callable is
    timed as one step."""
    timings: dict[str, float] = {}
    for step in getattr(chain, "transforms", [chain]):
        start = time.perf_counter()
        data = step(data)
        name = type(step).__name__  # steps of one class add up
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return {**data, TIMINGS_KEY: timings}


class _Pipeline:
    """One subject through preprocessing, inferer and writer; what became of it (never raises)."""

    def __init__(self, preprocessing, inferer, writer, done_file: str, overwrite: bool, step_timings: bool) -> None:
        self.preprocessing, self.inferer, self.writer = preprocessing, inferer, writer
        self.done_file, self.overwrite, self.step_timings = done_file, overwrite, step_timings

    def finished(self, name: str, output_dir: Path) -> bool:
        """Whether the subject is done already and is to be skipped (its done file is there, no ``overwrite``)."""
        return not self.overwrite and (output_dir / name / self.done_file).is_file()

    def __call__(self, path: Path, name: str, output_dir: Path) -> Outcome:
        """Process one subject that is not :meth:`finished`: "done", or its failures.csv row."""
        subject_dir = output_dir / name
        try:
            data = {"image": str(path), "subject": name}
            data = run_timed(self.preprocessing, data) if self.step_timings else self.preprocessing(data)
            self.writer(self.inferer(data), subject_dir)
            return "done"
        except Exception as exc:  # one bad scan never stops the cohort
            return failure_row(name, path, exc)


_WORKER: dict[str, Any] = {}  # the pipeline of a worker process, set once by _start_worker


def _start_worker(pipeline: _Pipeline, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER["pipeline"] = pipeline


def _worker_run(path: Path, name: str, output_dir: Path) -> tuple[str, Outcome]:
    return name, _WORKER["pipeline"](path, name, output_dir)


class CohortRunner:
    """Process every scan of a cohort into ``output_dir/<subject>/`` with one loaded pipeline.

    For each scan: ``data = preprocessing({"image": path, "subject": name})``, ``data = inferer(data)``,
    ``writer(data, output_dir / name)``. The writer writes ``done_file`` last; subjects that have it are skipped
    (resumable). A scan that fails (our ``DrasCLRError`` or anything unexpected) is listed with its reason in
    ``output_dir/failures.csv`` (rewritten as failures come) and the cohort goes on; ``output_dir/summary.json``
    sums up the run.

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
        workers: worker processes (spawned; each gets a copy of the pipeline, so it must pickle); 1 runs the scans
            in this process.
        threads: torch threads of each worker process.
        step_timings: run a ``Compose`` preprocessing step by step and give the writer each step's seconds in
            ``data["timings_s"]``.
        description: the progress bar's label.
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
        workers: int = 1,
        threads: int = 1,
        step_timings: bool = False,
        description: str = "subjects",
    ) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.pipeline = _Pipeline(preprocessing, inferer, writer, done_file, overwrite, step_timings)
        self.done_file = done_file
        self.progress, self.description = progress, description
        self.workers, self.threads = int(workers), int(threads)

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
        mine, parts = run_shares(self.output_dir, list(zip(scans, names)), self._process)
        if parts is None:  # a torchrun rank other than 0: rank 0 writes the cohort's files
            return {
                "rank": distributed_rank()[0],
                "processed": mine[0],
                "skipped": mine[1],
                "failed": [f["subject"] for f in mine[2]],
            }
        merged = [sum((part[i] for part in parts), []) for i in range(3)]
        return self._finish(*merged, max(part[3] for part in parts))

    def _outcomes(self, work: Sequence[tuple[Path, str]]):
        """(name, outcome) of each subject of ``work``, as they finish. Finished subjects are skipped here, so that no
        worker process is started (about 10 s each) only to skip them."""
        todo = []
        for path, name in work:
            if self.pipeline.finished(name, self.output_dir):
                yield name, "skipped"
            elif self.workers <= 1:
                yield name, self.pipeline(path, name, self.output_dir)
            else:
                todo.append((path, name))
        if not todo:
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # ITK and torch threads do not survive fork
        with ProcessPoolExecutor(
            min(self.workers, len(todo)),
            mp_context=context,
            initializer=_start_worker,
            initargs=(self.pipeline, self.threads),
        ) as pool:
            futures = [pool.submit(_worker_run, path, name, self.output_dir) for path, name in todo]
            for future in as_completed(futures):
                yield future.result()

    def _process(
        self, work: Sequence[tuple[Path, str]], alone: bool
    ) -> tuple[list[str], list[str], list[dict[str, str]], float]:
        """Run the subjects of ``work``; their names done and skipped, failure rows, seconds. ``alone`` (no other
        torchrun rank) rewrites ``failures.csv`` after each failure."""
        done: list[str] = []
        skipped: list[str] = []
        failures: list[dict[str, str]] = []
        start = time.perf_counter()
        with tqdm(total=len(work), desc=self.description, unit="scan", disable=not self.progress) as bar:
            for name, outcome in self._outcomes(work):
                if outcome == "done":
                    done.append(name)
                elif outcome == "skipped":
                    skipped.append(name)
                else:
                    failures.append(outcome)
                    if alone:
                        write_failures(self.output_dir / FAILURES_FILE, _sorted(failures))
                bar.set_postfix_str(f"{name}: {outcome if isinstance(outcome, str) else 'failed'}")
                bar.update(1)
        return done, skipped, failures, time.perf_counter() - start

    def _finish(
        self, done: list[str], skipped: list[str], failures: list[dict[str, str]], seconds: float
    ) -> dict[str, Any]:
        """Write ``failures.csv`` and ``summary.json`` of the run; the summary."""
        failures = _sorted(failures)
        write_failures(self.output_dir / FAILURES_FILE, failures)
        summary = {
            "processed": sorted(done),
            "skipped": sorted(skipped),
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


def _sorted(failures: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(failures, key=lambda f: f["subject"])
