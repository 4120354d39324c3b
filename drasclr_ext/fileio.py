"""Atomic file writing: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from drasclr_ext.errors import DrasCLRError

PathLike = Union[str, os.PathLike]
LOCK_FILE = ".drasclr.lock"
TMP_MARK = ".tmp"  # every temporary file of atomic_write is named ".<name>.<random><suffix>", suffix from ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\..+)?$")  # mkstemp's 8 random characters, then our suffix
logger = logging.getLogger(__name__)


def atomic_write(path: PathLike, write: Callable[[str], Any], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (named ``...<suffix>``, for writers that pick
    the format by extension), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the result the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def check_finite(array: Any, what: PathLike) -> None:
    """Raise ``DrasCLRError`` when a float array holds NaN or infinite values (no output may contain them)."""
    arr = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    if arr.dtype.kind not in "fc" or np.isfinite(arr.sum(dtype=np.float64 if arr.itemsize < 4 else arr.dtype)):
        return  # a finite sum (one fast pass) means every value is finite; else count (the sum may have overflowed)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise DrasCLRError(
            f"refusing to write {what}: {bad} of {arr.size} values are NaN or infinite. The computation went wrong "
            "for this scan; check its values (or report it)"
        )


NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
CT_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES  # the image files a cohort may hold (and DICOM folders)


def write_nifti(
    path: PathLike,
    array: Any,
    affine: Any,
    dtype: Any = None,
    *,
    slope: Optional[float] = None,
    intent: Optional[tuple[str, str]] = None,
) -> Path:
    """Write ``array`` (X, Y, Z) or (X, Y, Z, C) as a NIfTI-1 file atomically: ``affine`` as both sform and qform
    (code 1), millimetre units, optional scaling ``slope`` and ``intent`` (code, name). Float data must be finite.
    ``.nii.gz`` files are gzip level 1 with no timestamp, so the same data gives the same bytes."""
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"NIfTI files end in .nii.gz or .nii, not {path}")
    check_finite(array, path)
    arr = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(arr, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    if intent is not None:
        image.header.set_intent(intent[0], (), name=intent[1])
    data = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    return atomic_write_bytes(path, data)


def atomic_save_npy(path: PathLike, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically; float arrays must be finite."""
    check_finite(array, path)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return atomic_write_bytes(path, buffer.getvalue())


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: numpy types to Python, NaN/inf to None, unknown objects to str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (str, int)) or value is None:
        return value
    return str(value)


def atomic_write_json(path: PathLike, content: Any) -> Path:
    """Write ``content`` as indented JSON (through :func:`json_safe`) atomically."""
    return atomic_write_bytes(path, (json.dumps(json_safe(content), indent=2) + "\n").encode())


def sha256sum(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def is_stale_temporary(path: Path) -> bool:
    """A temporary file named as :func:`atomic_write` names them (left by a process killed before its rename)."""
    return bool(_TEMPORARY.match(path.name)) and path.is_file()


def clean_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete the temporary files that killed runs left in ``folder`` and its direct subfolders (the subjects');
    call it while holding the folder's lock."""
    folder = Path(folder)
    candidates = [*folder.glob(f".*{TMP_MARK}*"), *folder.glob(f"*/.*{TMP_MARK}*")]
    removed = [p for p in candidates if is_stale_temporary(p)]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        logger.warning(f"removed {len(removed)} temporary file(s) left by an interrupted run in {folder}")
    return removed


def prepare_output_dir(path: PathLike) -> Path:
    """Create ``path`` and check that files can be written there; ``DrasCLRError`` with the reason otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DrasCLRError(f"output directory {path} is a file: give a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_check.", suffix=TMP_MARK)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DrasCLRError(
            f"cannot write to the output directory {path} ({err.strerror or err}): give a writable folder"
        ) from err
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputLock:
    """An exclusive lock on an output folder (the file ``<folder>/.drasclr.lock`` holding ``pid host``).

    A second run on the same folder stops with a ``DrasCLRError`` naming the lock and the process that holds it; a
    lock whose process no longer exists (a killed run, same host) is taken over. Entering also removes stale
    temporary files. Use as a context manager.
    """

    def __init__(self, folder: PathLike, name: str = LOCK_FILE, clean: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.clean = clean  # False for the processes of one distributed run (one cleans for all, before they start)
        self.held = False

    def _owner(self) -> tuple[Optional[int], str]:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
            return int(pid), host
        except (OSError, ValueError):
            return None, ""

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True

    def acquire(self) -> OutputLock:
        prepare_output_dir(self.folder)
        for _ in range(3):  # a lock file being written, or removed, between our steps
            if self._try_create():
                self.held = True
                if self.clean:
                    clean_stale_temporaries(self.folder)
                return self
            pid, host = self._owner()
            if pid is None or host != socket.gethostname() or _pid_alive(pid):
                continue
            logger.warning(f"taking over the stale lock {self.path} of process {pid}, which no longer exists")
            self.path.unlink(missing_ok=True)
        pid, host = self._owner()
        raise DrasCLRError(
            f"another run is writing to {self.folder}: the lock {self.path} is held by process {pid} on "
            f"{host or 'an unknown host'}. Wait for it to finish, or use another output directory (delete the lock "
            "file only if that process is gone)"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
