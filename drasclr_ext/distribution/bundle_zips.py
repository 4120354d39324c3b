"""Release zips of the bundles: ``<name>_v<version>.zip`` (one top folder ``<name>/``) with a ``.sha256`` beside it.

:func:`package_bundles` checks the bundles (:func:`~drasclr_ext.distribution.bundle_checks.check_bundle`), copies
the files that ship into a staging folder, exports ``models/model.ts`` there and writes the zips.

The zips are deterministic: the same bundle files built with the same torch, MONAI and zlib give the same bytes.
Entries are sorted, dated 1980-01-01 with mode 644, compressed at a fixed level. TorchScript export is not
deterministic across Python processes by itself: ``torch.jit.script`` iterates a module's ``__constants__`` as a
Python ``set`` of strings, whose order follows the per-process string hash seed, so the order of the ``Final``
constants in the generated code (and with it ``.data/serialization_id``) changes from run to run. We export in a
subprocess with ``PYTHONHASHSEED=0``. The TorchScript debug info also records the absolute paths of the network's
source files, so a build from another checkout location or another torch version gives a different ``model.ts``
(and zip hash); rebuilding in the same environment gives the same hash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from drasclr_ext.distribution.bundle_checks import check_bundle, read_metadata, release_files
from drasclr_ext.distribution.checksums import write_sha256_file
from drasclr_ext.errors import DistributionError
from drasclr_ext.fileio import PathLike, atomic_write, sha256sum

__all__ = [
    "BundleRelease",
    "export_torchscript",
    "format_summary",
    "package_bundle",
    "package_bundles",
    "stage_bundle",
    "write_deterministic_zip",
    "write_release",
]

TORCHSCRIPT = "models/model.ts"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
COMPRESS_LEVEL = 6
# already compressed or incompressible (float weights): stored, which is also much faster
STORED_SUFFIXES = (".pt", ".pth", ".ts", ".gz", ".zip", ".npz", ".png", ".jpg")


@dataclass(frozen=True)
class BundleRelease:
    """One packaged bundle: its zip, the zip's sha256, the number of files and the zip size in bytes."""

    name: str
    version: str
    zip_path: Path
    sha256: str
    files: int
    size: int


_EXPORT = """
import sys
from monai.bundle import ckpt_export
for bundle, filepath in zip(sys.argv[1::2], sys.argv[2::2]):
    print(f"exporting {bundle}", file=sys.stderr, flush=True)
    ckpt_export(net_id="network_def", filepath=filepath, ckpt_file=bundle + "/models/model.pt",
                meta_file=bundle + "/configs/metadata.json", config_file=bundle + "/configs/inference.json")
"""


def export_torchscript(exports: Sequence[tuple[PathLike, PathLike]], timeout: float = 600) -> None:
    """``monai.bundle.ckpt_export`` of each bundle's ``network_def`` with its ``models/model.pt`` to the paired
    ``.ts`` path, in one fresh process with ``PYTHONHASHSEED=0`` so that the bytes are reproducible (module doc)."""
    args = [sys.executable, "-c", _EXPORT] + [str(Path(p)) for pair in exports for p in pair]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    missing = [str(ts) for _, ts in exports if not Path(ts).is_file()]
    if proc.returncode != 0 or missing:
        raise DistributionError(
            f"TorchScript export failed ({proc.returncode}):\n{proc.stderr[-3000:]}\nnetwork_def in "
            "configs/inference.json must be scriptable with torch.jit.script and load models/model.pt"
        )


def write_deterministic_zip(zip_path: PathLike, files: Mapping[str, PathLike]) -> Path:
    """Write ``{arcname: source file}`` as a zip whose bytes depend only on the names and contents.

    Entries are sorted by name, dated 1980-01-01 00:00, Unix mode 644, deflated at level 6 (stored for weights and
    compressed formats). The zip is written atomically.
    """

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            for arcname in sorted(files):
                source = Path(files[arcname])
                info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
                info.create_system = 3  # Unix, so that the mode below is honoured
                info.external_attr = (0o100000 | FILE_MODE) << 16
                method = zipfile.ZIP_STORED if source.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                zf.writestr(info, source.read_bytes(), compress_type=method, compresslevel=COMPRESS_LEVEL)

    return atomic_write(zip_path, write)


def stage_bundle(bundle: PathLike, staging: PathLike) -> Path:
    """Copy the files of ``bundle`` that ship (:func:`release_files`) into the folder ``staging``."""
    bundle, staging = Path(bundle), Path(staging)
    for rel in release_files(bundle):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle / rel, staging / rel)
    return staging


def write_release(staging: PathLike, version: str, out: PathLike) -> BundleRelease:
    """Zip a staged bundle folder as ``<out>/<name>_v<version>.zip`` (top folder ``<name>/``) with its .sha256."""
    staging = Path(staging)
    name = staging.name
    files = {f"{name}/{p.relative_to(staging).as_posix()}": p for p in staging.rglob("*") if p.is_file()}
    zip_path = write_deterministic_zip(Path(out) / f"{name}_v{version}.zip", files)
    write_sha256_file(zip_path)
    return BundleRelease(name, version, zip_path, sha256sum(zip_path), len(files), zip_path.stat().st_size)


def package_bundles(
    bundles_dir: PathLike,
    out: PathLike,
    names: Sequence[str] | None = None,
    schema: PathLike | None = None,
    check: bool = True,
) -> list[BundleRelease]:
    """Check the selected bundles of ``bundles_dir`` (default: all), then write their release zips to ``out``.

    The bundles are copied to a staging folder, where ``models/model.ts`` is exported; the bundle folders are only
    read. ``check=False`` skips :func:`check_bundle` (tests of the packaging itself).
    """
    bundles_dir = Path(bundles_dir).resolve()
    available = sorted(p.name for p in bundles_dir.iterdir() if (p / "configs" / "metadata.json").is_file())
    selected = list(names) if names else available
    unknown = [n for n in selected if n not in available]
    if unknown:
        raise DistributionError(f"no bundle named {unknown} in {bundles_dir}: choose from {available}")
    if check:
        versions = {name: check_bundle(bundles_dir / name, schema) for name in selected}
    else:
        versions = {name: str(read_metadata(bundles_dir / name).get("version")) for name in selected}
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drasclr_release_") as tmp:
        stagings = [stage_bundle(bundles_dir / name, Path(tmp) / name) for name in selected]
        export_torchscript([(staging, staging / TORCHSCRIPT) for staging in stagings])
        return [write_release(staging, versions[staging.name], out) for staging in stagings]


def package_bundle(
    bundle: PathLike, out: PathLike, schema: PathLike | None = None, check: bool = True
) -> BundleRelease:
    """:func:`package_bundles` of one bundle folder."""
    bundle = Path(bundle).resolve()
    return package_bundles(bundle.parent, out, [bundle.name], schema, check)[0]


def format_summary(releases: Sequence[BundleRelease]) -> str:
    """A Markdown table of the releases."""
    rows = ["| bundle | version | files | size (MB) | sha256 | zip |", "|---|---|---|---|---|---|"]
    for r in releases:
        rows.append(f"| {r.name} | {r.version} | {r.files} | {r.size / 1e6:.1f} | {r.sha256} | {r.zip_path} |")
    return "\n".join(rows)
