"""The scans of a cohort and what a cohort command says about them: datalists and folders of scans, subject names
(one output folder each), and the rows of ``failures.csv``, the one schema of every cohort command."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from drasclr_ext.errors import DrasCLRError, our_error
from drasclr_ext.fileio import CT_SUFFIXES, atomic_write_bytes

__all__ = [
    "FAILURES_FILE",
    "FAILURE_FIELDS",
    "failure_row",
    "read_datalist",
    "subject_name",
    "subject_names",
    "write_failures",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
FAILURES_FILE = "failures.csv"
FAILURE_FIELDS = ("subject", "input", "error", "reason")  # the one failures.csv schema of every cohort command
_DATALIST_SECTIONS = ("training", "validation", "test", "testing")


def read_datalist(datalist: PathLike) -> list[Path]:
    """The scans of a MONAI datalist JSON (sections ``training``/``validation``/``test`` of ``{"image": ...}``
    entries, or a plain list of entries or paths; relative paths resolved against the JSON's folder) or of a folder
    (each image file and each DICOM series folder is a scan; a folder of DICOM files alone is one scan)."""
    src = Path(datalist)
    if src.is_dir():
        entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
        scans = [p for p in entries if p.is_file() and p.name.lower().endswith(CT_SUFFIXES)]
        scans += [p for p in entries if p.is_dir() and any(c.is_file() for c in p.iterdir())]
        if not scans and any(p.is_file() for p in entries):
            scans = [src]  # the folder itself is one DICOM series
        ignored = [p.name for p in entries if p not in scans and src not in scans]
        if ignored:
            logger.warning(
                f"{src}: ignoring {len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'} that are neither a "
                f"CT file ({', '.join(CT_SUFFIXES)}) nor a folder of DICOM files: {', '.join(ignored[:10])}"
                + (", ..." if len(ignored) > 10 else "")
            )
        return sorted(scans)
    if not src.is_file():
        raise DrasCLRError(f"datalist {src} does not exist; give a MONAI datalist JSON or a folder of scans")
    try:
        with open(src) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise DrasCLRError(f"datalist {src} is not valid JSON ({e}); give a MONAI datalist JSON or a folder") from e
    if isinstance(content, dict):
        items: list[Any] = []
        for section in _DATALIST_SECTIONS:
            items += list(content.get(section, []) or [])
    elif isinstance(content, list):
        items = content
    else:
        raise DrasCLRError(f"datalist {src}: expected a JSON object with 'training'/'test' lists or a list")
    scans: list[Path] = []
    for item in items:
        value = item.get("image") if isinstance(item, dict) else item
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise DrasCLRError(f"datalist {src}: entry {item!r} has no 'image' path")
        path = Path(value)
        path = path if path.is_absolute() else src.parent / path
        if path not in scans:
            scans.append(path)
    return scans


def subject_name(path: PathLike) -> str:
    """File name without its image extension(s), or the DICOM folder's name."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    name = p.name
    for suffix in CT_SUFFIXES + (".gz",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def subject_names(paths: Sequence[PathLike]) -> list[str]:
    """``subject_name`` of each path; ``DrasCLRError`` naming the files when two inputs would share one output folder
    (``scan.nii`` and ``scan.nii.gz``, or two DICOM folders of the same name)."""
    names = [subject_name(p) for p in paths]
    groups: dict[str, list[str]] = {}
    for name, path in zip(names, paths):
        groups.setdefault(name, []).append(str(path))
    clashes = {name: files for name, files in groups.items() if len(files) > 1}
    if clashes:
        listed = "; ".join(f"{name!r}: {', '.join(files)}" for name, files in list(clashes.items())[:5])
        raise DrasCLRError(
            f"{len(clashes)} subject name(s) are shared by several inputs, whose results would overwrite each other "
            f"({listed}). Rename or remove one of each, or give a datalist without them"
        )
    return names


def failure_row(subject: str, source: Any, exc: BaseException) -> dict[str, str]:
    """Log why ``subject`` failed and return its ``failures.csv`` row (our error's message, or the unexpected
    exception with its traceback in the log)."""
    ours = our_error(exc)
    if ours is not None:
        logger.error(f"{subject}: {ours}")
        reason, error = str(ours), type(ours).__name__
    else:
        logger.error(f"{subject}: unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        reason, error = f"unexpected: {exc}", type(exc).__name__
    return {"subject": subject, "input": str(source), "error": error, "reason": reason}


def write_failures(path: PathLike, failures: Sequence[Mapping[str, Any]]) -> Path:
    """``subject,input,error,reason`` rows, written atomically (an empty file with the header when none failed)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FAILURE_FIELDS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({key: row.get(key, "") for key in FAILURE_FIELDS} for row in failures)
    return atomic_write_bytes(path, buffer.getvalue().encode())
