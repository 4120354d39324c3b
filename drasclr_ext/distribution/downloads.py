"""Safe downloads of bundle zips (``drasclr download``).

:func:`verify_bundle_zip` checks a zip's sha256, that it is complete, that its members stay inside one top folder
named as the bundle; :func:`download_bundle` fetches, verifies and extracts atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

from drasclr_ext.distribution.checksums import HEX64, read_sha256_file
from drasclr_ext.errors import DistributionError
from drasclr_ext.fileio import PathLike, sha256sum

__all__ = ["download_bundle", "extract_bundle_zip", "verify_bundle_zip"]

_VERSIONED_ZIP = re.compile(r"(?P<name>.+?)_v\d[0-9A-Za-z.+-]*")


def _expected_sha256(sha256: str | PathLike) -> str:
    text = str(sha256).strip()
    if HEX64.fullmatch(text):
        return text.lower()
    if Path(text).is_file():
        return read_sha256_file(text)
    raise DistributionError(f"sha256 {text!r} is neither 64 hex digits nor a .sha256 file")


def _bundle_name_from_zip(zip_path: Path) -> str:
    stem = zip_path.name[: -len(".zip")] if zip_path.name.endswith(".zip") else zip_path.name
    match = _VERSIONED_ZIP.fullmatch(stem)
    return match.group("name") if match else stem


def _check_archive_starts_at_zero(zip_path: Path, infos: Sequence[zipfile.ZipInfo]) -> None:
    """A truncated bundle zip can still open: the weights are stored zips themselves, and ``zipfile`` then finds the
    central directory of the last complete inner archive (``model.pt``) and reads that instead. Such a directory
    does not start at the file's first byte."""
    if infos and min(info.header_offset for info in infos) != 0:
        raise DistributionError(
            f"{zip_path} is truncated: its last zip directory describes an archive embedded at byte "
            f"{min(info.header_offset for info in infos)}, not the bundle zip; download it again"
        )


def _check_member_paths(zip_path: Path, infos: Sequence[zipfile.ZipInfo], name: str) -> None:
    if not infos:
        raise DistributionError(f"{zip_path} is an empty zip: it is not a bundle")
    for info in infos:
        member = info.filename
        parts = member.replace("\\", "/").split("/")
        if member.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member) or ".." in parts:
            raise DistributionError(f"{zip_path} has an unsafe member path {member!r} (absolute or '..'): refusing it")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise DistributionError(f"{zip_path} has a symbolic link {member!r}: refusing it")
    tops = sorted({info.filename.replace("\\", "/").split("/")[0] for info in infos})
    if tops != [name]:
        raise DistributionError(
            f"{zip_path} must hold one top folder {name!r}, found {tops[:5]}: it is not the bundle {name}"
        )
    if f"{name}/configs/metadata.json" not in {info.filename for info in infos}:
        raise DistributionError(f"{zip_path} has no {name}/configs/metadata.json: it is not a MONAI bundle")


def verify_bundle_zip(zip_path: PathLike, sha256: str | PathLike | None = None, name: str | None = None) -> str:
    """Check a downloaded bundle zip before extracting it; returns the bundle name.

    Args:
        zip_path: the zip.
        sha256: the expected sha256, as 64 hex digits or the path of a ``.sha256`` file; None skips the hash check.
        name: the bundle name, which must be the zip's one top folder; default: the zip name without
            ``_v<version>.zip``.

    Raises:
        DistributionError: the hash differs, the zip is truncated or corrupt (bad CRC), it has absolute or ``..``
            member paths or links, or it is not one top folder ``name/`` holding ``configs/metadata.json``.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise DistributionError(f"bundle zip {zip_path} does not exist")
    if sha256 is not None:
        expected, actual = _expected_sha256(sha256), sha256sum(zip_path)
        if actual != expected:
            raise DistributionError(
                f"{zip_path} has sha256 {actual}, expected {expected}: the download is incomplete or corrupt, or not "
                "the published release; download it again and do not use this file"
            )
    name = name or _bundle_name_from_zip(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            _check_archive_starts_at_zero(zip_path, zf.infolist())
            _check_member_paths(zip_path, zf.infolist(), name)
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
        raise DistributionError(
            f"{zip_path} is not a complete, valid zip ({type(exc).__name__}: {exc}): the download was truncated or "
            "corrupted; download it again"
        ) from exc
    if bad is not None:
        raise DistributionError(f"{zip_path}: member {bad} fails its CRC check: the zip is corrupt; download it again")
    return name


def extract_bundle_zip(zip_path: PathLike, bundle_dir: PathLike, name: str, overwrite: bool = False) -> Path:
    """Extract a verified bundle zip to ``bundle_dir/name`` atomically (a temporary folder, then a rename)."""
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / name
    if target.exists() and not overwrite:
        raise DistributionError(f"{target} already exists: remove it, choose another --bundle_dir or pass --overwrite")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=bundle_dir))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        if target.exists():
            target.rename(tmp / ".previous")
        (tmp / name).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch(url: str, dst: Path, timeout: float = 60) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dst, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DistributionError(f"could not download {url} ({exc}): check the address and your connection") from exc


def download_bundle(
    name: str, url: str, bundle_dir: PathLike = ".", sha256: str | PathLike | None = None, overwrite: bool = False
) -> Path:
    """Download the bundle zip at ``url``, verify it (:func:`verify_bundle_zip`) and extract it to
    ``bundle_dir/name``. Nothing is written to ``bundle_dir/name`` unless every check passes."""
    bundle_dir = Path(bundle_dir)
    if (bundle_dir / name).exists() and not overwrite:
        raise DistributionError(f"{bundle_dir / name} already exists: remove it or pass --overwrite")
    if sha256 is None:
        warnings.warn(f"no sha256 given for {url}: the download's integrity is not verified", stacklevel=2)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".zip.part", dir=bundle_dir)
    os.close(fd)
    try:
        _fetch(url, Path(tmp))
        verify_bundle_zip(tmp, sha256, name=name)
        return extract_bundle_zip(tmp, bundle_dir, name, overwrite=overwrite)
    finally:
        os.unlink(tmp)
