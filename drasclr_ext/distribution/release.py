"""The release folder (``scripts/package_bundles.py --release``, ``drasclr release``): exactly what is published.

:func:`build_release` writes the wheel and sdist of ``drasclr-ext`` (``python -m build`` of a copy of the package's
source files), the bundle zips with their ``.sha256`` (:mod:`~drasclr_ext.distribution.bundle_zips`) and a
``SHA256SUMS`` over the wheel, the sdist and the zips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from drasclr_ext.distribution.bundle_checks import read_metadata
from drasclr_ext.distribution.bundle_zips import BundleRelease, package_bundles
from drasclr_ext.distribution.checksums import SUMS_FILE, write_sha256sums
from drasclr_ext.errors import DistributionError
from drasclr_ext.fileio import PathLike, sha256sum

__all__ = ["PACKAGE_FILES", "Release", "build_python_package", "build_release", "format_release"]

# what python -m build needs of a checkout: the package and its metadata (no tests, bundles or local files)
PACKAGE_FILES = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "drasclr_ext")
PACKAGE_NAME = "drasclr-ext"
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01: file dates in the wheel


@dataclass(frozen=True)
class Release:
    """A release folder: the package's wheel and sdist, the bundle releases and the ``SHA256SUMS`` file."""

    folder: Path
    wheel: Path
    sdist: Path
    bundles: tuple[BundleRelease, ...]
    sums: Path


def _copy_package_source(source: Path, staging: Path) -> Path:
    """Copy :data:`PACKAGE_FILES` of the checkout ``source`` to ``staging``, without caches and build metadata."""
    missing = [name for name in PACKAGE_FILES if not (source / name).exists()]
    if missing:
        raise DistributionError(f"{source} lacks {missing}: --source must be the drasclr-ext checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    staging.mkdir(parents=True, exist_ok=True)
    for name in PACKAGE_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, staging / name, ignore=ignore)
        else:
            shutil.copy2(source / name, staging / name)
    return staging


def build_python_package(
    source: PathLike, out: PathLike, isolation: bool = True, timeout: float = 600
) -> tuple[Path, Path]:
    """The wheel and sdist of the package in the checkout ``source``, built into ``out`` with ``python -m build``
    (the sdist, then the wheel from the sdist) from a copy of :data:`PACKAGE_FILES`; returns (wheel, sdist).

    ``isolation=False`` (``--no-isolation``) builds with the installed setuptools instead of fetching the build
    requirements into a fresh environment: the way to build offline.
    """
    import importlib.util

    if importlib.util.find_spec("build") is None:
        raise DistributionError("the 'build' package is not installed: pip install build (it is in the test extra)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drasclr_sdist_") as tmp:
        staging = _copy_package_source(Path(source).resolve(), Path(tmp) / "src")
        args = [sys.executable, "-m", "build", "--outdir", str(out.resolve()), str(staging)]
        if not isolation:
            args.insert(3, "--no-isolation")
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    if proc.returncode != 0 or len(wheels) != 1 or len(sdists) != 1:
        hint = "" if not isolation else " (offline? build with --no-isolation, which needs setuptools>=70.1)"
        raise DistributionError(
            f"python -m build failed ({proc.returncode}){hint}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return wheels[0], sdists[0]


def _check_required_version(bundles_dir: Path, names: Sequence[str], wheel: Path) -> None:
    """Each bundle's ``required_packages_version`` of drasclr-ext is the version of the wheel being released."""
    version = wheel.name.split("-")[1]
    for name in names:
        required = (read_metadata(bundles_dir / name).get("required_packages_version") or {}).get(PACKAGE_NAME)
        if required is not None and str(required) != version:
            raise DistributionError(
                f"bundle {name} requires {PACKAGE_NAME}=={required} but the release builds {wheel.name}: update "
                f"required_packages_version in {bundles_dir / name / 'configs' / 'metadata.json'} or the version"
            )


def build_release(
    out: PathLike,
    source: PathLike,
    bundles_dir: PathLike,
    names: Sequence[str] | None = None,
    schema: PathLike | None = None,
    isolation: bool = True,
    check: bool = True,
) -> Release:
    """Write the release folder ``out`` (new, or empty): the wheel and sdist of the package in ``source``
    (:func:`build_python_package`), the zips of the bundles of ``bundles_dir`` with their ``.sha256``
    (:func:`package_bundles`, default: every bundle) and ``SHA256SUMS``.

    Everything is built in a hidden folder beside ``out``, which becomes ``out`` when all succeeded; each bundle's
    required ``drasclr-ext`` version must be the wheel's.
    """
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DistributionError(f"{out} exists and is not an empty folder: a release folder holds only the release")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        wheel, sdist = build_python_package(source, tmp, isolation=isolation)
        bundles = package_bundles(bundles_dir, tmp, names=names, schema=schema, check=check)
        _check_required_version(Path(bundles_dir), [b.name for b in bundles], wheel)
        write_sha256sums(tmp, [wheel.name, sdist.name] + [b.zip_path.name for b in bundles])
        tmp.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bundles = tuple(BundleRelease(b.name, b.version, out / b.zip_path.name, b.sha256, b.files, b.size) for b in bundles)
    return Release(out, out / wheel.name, out / sdist.name, bundles, out / SUMS_FILE)


def format_release(release: Release) -> str:
    """A Markdown table of the files of a release folder: name, size and sha256."""
    rows = [f"release folder {release.folder}", "", "| file | size (MB) | sha256 |", "|---|---|---|"]
    for path in sorted(release.folder.iterdir()):
        digest = sha256sum(path) if path.name != SUMS_FILE and not path.name.endswith(".sha256") else ""
        rows.append(f"| {path.name} | {path.stat().st_size / 1e6:.3f} | {digest} |")
    return "\n".join(rows)
