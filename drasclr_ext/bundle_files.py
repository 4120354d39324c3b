"""A bundle's list of large files (``large_files.yml``: path, url, hash), read and kept up to date in one place, for
checkpoint loading (hash checks), training (recording new weights) and distribution (release checks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from drasclr_ext.errors import CheckpointError, DistributionError
from drasclr_ext.fileio import atomic_write_bytes, sha256sum

__all__ = ["LARGE_FILES", "large_file_hash", "read_large_files", "record_large_file"]

LARGE_FILES = "large_files.yml"
PathLike = Union[str, os.PathLike]


def read_large_files(bundle: PathLike) -> list[dict[str, Any]]:
    """The entries of the bundle's ``large_files.yml``; raises :class:`DistributionError` when it is unreadable."""
    import yaml

    path = Path(bundle) / LARGE_FILES
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get("large_files")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise DistributionError(f"cannot read {path} ({exc}): it must be a mapping with a large_files list") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise DistributionError(f"{path} must hold 'large_files:', a list of entries with path, url and hash_val")
    return entries


def large_file_hash(bundle_root: PathLike, path: PathLike) -> str | None:
    """The sha256 that the bundle's ``large_files.yml`` lists for ``path`` (None when there is no such listing)."""
    if not (Path(bundle_root) / LARGE_FILES).is_file():
        return None
    target = Path(path).resolve()
    for entry in read_large_files(bundle_root):
        if (Path(bundle_root) / entry["path"]).resolve() == target and entry.get("hash_type") == "sha256":
            return entry.get("hash_val") or None
    return None


def record_large_file(bundle_root: PathLike, path: PathLike) -> str:
    """Write the sha256 of ``path`` (a file inside the bundle) into the bundle's ``large_files.yml``, atomically.

    Called after training rewrites a bundle's weights, so that the hash check of the weights keeps protecting
    downloads without refusing the user's own training result. Returns the new hash.
    """
    import yaml

    root, target = Path(bundle_root), Path(path).resolve()
    try:
        relative = target.relative_to(root.resolve()).as_posix()
    except ValueError as exc:
        raise CheckpointError(
            f"{path} is not inside the bundle {bundle_root}; cannot list it in {LARGE_FILES}"
        ) from exc
    listing = root / LARGE_FILES
    content = (yaml.safe_load(listing.read_text()) or {}) if listing.is_file() else {}
    entries = content.setdefault("large_files", [])
    digest = sha256sum(target)
    for entry in entries:
        if (root / entry.get("path", "")).resolve() == target:
            entry.update({"hash_val": digest, "hash_type": "sha256"})
            break
    else:
        entries.append({"path": relative, "url": "", "hash_val": digest, "hash_type": "sha256"})
    atomic_write_bytes(listing, yaml.safe_dump(content, sort_keys=False).encode())
    return digest
