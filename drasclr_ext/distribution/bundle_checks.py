"""The checks a bundle folder passes before it is released (``scripts/package_bundles.py``, ``drasclr package``).

:func:`check_bundle`: the required files, ``metadata.json`` against the MONAI schema (offline) with a changelog entry
for its version, the weights against their hashes in ``large_files.yml``, the model zoo's size limit per file and
``verify_net_in_out`` of ``network_def``. :func:`release_files` lists the files that ship.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from drasclr_ext.bundle_files import read_large_files
from drasclr_ext.errors import DistributionError
from drasclr_ext.fileio import PathLike, sha256sum

__all__ = [
    "MAX_FILE_BYTES",
    "MODEL",
    "REQUIRED_FILES",
    "SCHEMA_NAME",
    "check_bundle",
    "default_schema_path",
    "read_metadata",
    "release_files",
]

REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
    "models/model.pt",
    "large_files.yml",
)
MODEL = "models/model.pt"
MAX_FILE_BYTES = 25 * 2**20  # the MONAI model zoo's limit per file
SCHEMA_NAME = "meta_schema_20240725.json"
# top-level folders that running a bundle writes (outputs, downloaded data and atlas, logs): never shipped
LOCAL_OUTPUT_DIRS = frozenset({"eval", "data", "runs", "logs", "output", "outputs"})


def default_schema_path() -> Path | None:
    """The metadata schema in the shared data folder beside the checkout (``$DRASCLR_SHARED_DIR`` or ``../shared``),
    or None when it is not there."""
    shared = os.environ.get("DRASCLR_SHARED_DIR")
    root = Path(shared) if shared else Path(__file__).resolve().parents[3] / "shared"
    path = root / "schemas" / SCHEMA_NAME
    return path if path.is_file() else None


def _resolve_schema(schema: PathLike | None) -> Path:
    path = Path(schema) if schema is not None else default_schema_path()
    if path is None:
        raise DistributionError(
            f"no metadata schema: ../shared/schemas/{SCHEMA_NAME} is not beside the checkout. Download it once from "
            f"https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/{SCHEMA_NAME} and "
            "pass --schema PATH"
        )
    if not path.is_file():
        raise DistributionError(f"metadata schema {path} does not exist: pass --schema with the path of {SCHEMA_NAME}")
    return path


def read_metadata(bundle: Path) -> dict[str, Any]:
    path = bundle / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DistributionError(f"cannot read {path} ({exc}): fix the bundle's metadata JSON") from exc


def _check_required_files(bundle: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    if missing:
        raise DistributionError(f"bundle {bundle} lacks {missing}: every released bundle needs {list(REQUIRED_FILES)}")


def _check_metadata(bundle: Path, schema: Path) -> str:
    """Validate metadata.json against ``schema`` (offline) and return its version, which must be in the changelog."""
    from monai.bundle import verify_metadata

    meta_file = bundle / "configs" / "metadata.json"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no hash value provided" for the local schema file
            verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    except Exception as exc:  # ValueError from monai with the failing key, or a missing jsonschema
        raise DistributionError(f"{meta_file} does not follow {schema.name}: {exc}") from exc
    meta = read_metadata(bundle)
    version = str(meta.get("version", ""))
    if not version or version not in (meta.get("changelog") or {}):
        raise DistributionError(
            f"{meta_file}: version {version!r} has no changelog entry; add one to 'changelog' before releasing"
        )
    return version


def _file_hash(path: Path, hash_type: str) -> str:
    if hash_type == "sha256":
        return sha256sum(path)
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_large_file_hashes(bundle: Path, shipped: Sequence[str]) -> None:
    """Every shipped file listed in large_files.yml has its listed hash; models/model.pt must be listed (sha256)."""
    entries = {Path(e["path"]).as_posix(): e for e in read_large_files(bundle)}
    model = entries.get(MODEL)
    if model is None or model.get("hash_type") != "sha256" or not model.get("hash_val"):
        raise DistributionError(
            f"{bundle / 'large_files.yml'} has no sha256 entry for {MODEL}: run "
            f"python scripts/write_large_files.py {bundle}"
        )
    for rel in shipped:
        entry = entries.get(rel)
        if entry is None or not entry.get("hash_val"):
            continue
        hash_type = str(entry.get("hash_type") or "sha256").lower()
        actual = _file_hash(bundle / rel, hash_type)
        if actual != str(entry["hash_val"]).lower():
            raise DistributionError(
                f"{bundle / rel} has {hash_type} {actual} but large_files.yml lists {entry['hash_val']}: the weights "
                f"changed without updating large_files.yml (python scripts/write_large_files.py {bundle}), or the "
                "file is corrupt"
            )


def _check_file_sizes(bundle: Path, shipped: Sequence[str]) -> None:
    """Every shipped file fits the model zoo's limit (:data:`MAX_FILE_BYTES`)."""
    large = [f"{rel} ({(bundle / rel).stat().st_size / 2**20:.1f} MiB)" for rel in shipped]
    large = [entry for rel, entry in zip(shipped, large) if (bundle / rel).stat().st_size > MAX_FILE_BYTES]
    if large:
        raise DistributionError(
            f"{bundle}: {', '.join(large)} exceed the model zoo's {MAX_FILE_BYTES // 2**20} MiB per file; store "
            "weights in float16 (drasclr_ext.checkpoint.compact_weights_file) or fetch them through large_files.yml"
        )


def _check_network(bundle: Path) -> None:
    from monai.bundle import verify_net_in_out

    try:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(bundle / "configs" / "metadata.json"),
            config_file=str(bundle / "configs" / "inference.json"),
        )
    except Exception as exc:
        raise DistributionError(
            f"verify_net_in_out failed for {bundle} ({type(exc).__name__}: {exc}): network_def in "
            "configs/inference.json must take and return what metadata.json's network_data_format says"
        ) from exc


def release_files(bundle: PathLike) -> list[str]:
    """The bundle files that ship, as sorted POSIX paths relative to the bundle.

    Left out: hidden files and folders, ``__pycache__``, ``*.pyc``, the local output folders (``eval``, ``data``,
    ``runs``, ...), and in ``models/`` everything that large_files.yml does not list (training checkpoints).
    """
    bundle = Path(bundle)
    listed = {Path(e["path"]).as_posix() for e in read_large_files(bundle)} | {MODEL}
    files = []
    for path in bundle.rglob("*"):
        rel = path.relative_to(bundle)
        parts = rel.parts
        if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        if path.suffix == ".pyc" or parts[0] in LOCAL_OUTPUT_DIRS:
            continue
        if parts[0] == "models" and rel.as_posix() not in listed:
            continue
        files.append(rel.as_posix())
    return sorted(files)


def check_bundle(bundle: PathLike, schema: PathLike | None = None) -> str:
    """Check that a bundle folder can be released; returns its version. Raises :class:`DistributionError`."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise DistributionError(f"bundle folder {bundle} does not exist")
    _check_required_files(bundle)
    version = _check_metadata(bundle, _resolve_schema(schema))
    shipped = release_files(bundle)
    _check_large_file_hashes(bundle, shipped)
    _check_file_sizes(bundle, shipped)
    _check_network(bundle)
    return version
