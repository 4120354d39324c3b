"""sha256 files: ``<zip>.sha256`` beside each bundle zip and ``SHA256SUMS`` of a release folder, in the format of
``sha256sum`` (``sha256sum -c`` reads them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from drasclr_ext.errors import DistributionError
from drasclr_ext.fileio import PathLike, atomic_write_bytes, sha256sum

__all__ = ["HEX64", "SUMS_FILE", "read_sha256_file", "write_sha256_file", "write_sha256sums"]

SUMS_FILE = "SHA256SUMS"
HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def write_sha256_file(path: PathLike) -> Path:
    """Write ``<path>.sha256`` with ``<hex>  <file name>``, the format of ``sha256sum`` (``sha256sum -c`` reads it)."""
    path = Path(path)
    return atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{sha256sum(path)}  {path.name}\n".encode())


def read_sha256_file(path: PathLike) -> str:
    """The hex digest of a ``.sha256`` file (``<hex>  <file name>``)."""
    try:
        digest = Path(path).read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        raise DistributionError(f"cannot read a sha256 from {path}: expected '<64 hex digits>  <zip name>'") from exc
    if not HEX64.fullmatch(digest):
        raise DistributionError(f"{path} does not start with a sha256 (64 hex digits): got {digest[:80]!r}")
    return digest.lower()


def write_sha256sums(folder: PathLike, names: Sequence[str]) -> Path:
    """``folder/SHA256SUMS``: ``<hex>  <name>`` for each file ``names`` of ``folder``, sorted (``sha256sum -c``)."""
    folder = Path(folder)
    lines = "".join(f"{sha256sum(folder / name)}  {name}\n" for name in sorted(names))
    return atomic_write_bytes(folder / SUMS_FILE, lines.encode())
