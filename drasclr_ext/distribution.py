"""Release zips of the bundles, and safe downloads of them.

Packaging (``scripts/package_bundles.py``): :func:`check_bundle` checks a bundle folder (required files, metadata
schema, changelog, weights hash, network input/output); :func:`package_bundles` copies the files that ship
(:func:`release_files`) into a staging folder, exports ``models/model.ts`` there and writes
``<name>_v<version>.zip`` (one top folder ``<name>/``) with a ``.sha256`` file beside it.

The zips are deterministic: the same bundle files built with the same torch, MONAI and zlib give the same bytes.
Entries are sorted, dated 1980-01-01 with mode 644, compressed at a fixed level. TorchScript export is not
deterministic across Python processes by itself: ``torch.jit.script`` iterates a module's ``__constants__`` as a
Python ``set`` of strings, whose order follows the per-process string hash seed, so the order of the ``Final``
constants in the generated code (and with it ``.data/serialization_id``) changes from run to run. We export in a
subprocess with ``PYTHONHASHSEED=0``. The TorchScript debug info also records the absolute paths of the network's
source files, so a build from another checkout location or another torch version gives a different ``model.ts``
(and zip hash); rebuilding in the same environment gives the same hash.

The release folder (``scripts/package_bundles.py --release``, ``drasclr release``): :func:`build_release` writes
the wheel and sdist of ``drasclr-ext`` (``python -m build`` of a copy of the package's source files), the bundle
zips with their ``.sha256`` and a ``SHA256SUMS`` over the wheel, the sdist and the zips: exactly what is published.

Downloading (``drasclr download``): :func:`verify_bundle_zip` checks a zip's sha256, that it is complete, that its
members stay inside one top folder named as the bundle; :func:`download_bundle` fetches, verifies and extracts
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from drasclr_ext.bundle_files import read_large_files
from drasclr_ext.errors import DistributionError
from drasclr_ext.fileio import PathLike, atomic_write, atomic_write_bytes, sha256sum

__all__ = [
    "PACKAGE_FILES",
    "REQUIRED_FILES",
    "SUMS_FILE",
    "BundleRelease",
    "DistributionError",
    "Release",
    "build_python_package",
    "build_release",
    "check_bundle",
    "default_schema_path",
    "download_bundle",
    "export_torchscript",
    "extract_bundle_zip",
    "format_release",
    "format_summary",
    "package_bundle",
    "package_bundles",
    "read_sha256_file",
    "release_files",
    "stage_bundle",
    "verify_bundle_zip",
    "write_deterministic_zip",
    "write_release",
    "write_sha256_file",
    "write_sha256sums",
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
TORCHSCRIPT = "models/model.ts"
SCHEMA_NAME = "meta_schema_20240725.json"
# top-level folders that running a bundle writes (outputs, downloaded data and atlas, logs): never shipped
LOCAL_OUTPUT_DIRS = frozenset({"eval", "data", "runs", "logs", "output", "outputs"})
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
COMPRESS_LEVEL = 6
# already compressed or incompressible (float weights): stored, which is also much faster
STORED_SUFFIXES = (".pt", ".pth", ".ts", ".gz", ".zip", ".npz", ".png", ".jpg")
# what python -m build needs of a checkout: the package and its metadata (no tests, bundles or local files)
PACKAGE_FILES = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "drasclr_ext")
PACKAGE_NAME = "drasclr-ext"
SUMS_FILE = "SHA256SUMS"
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01: file dates in the wheel
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_VERSIONED_ZIP = re.compile(r"(?P<name>.+?)_v\d[0-9A-Za-z.+-]*")


@dataclass(frozen=True)
class BundleRelease:
    """One packaged bundle: its zip, the zip's sha256, the number of files and the zip size in bytes."""

    name: str
    version: str
    zip_path: Path
    sha256: str
    files: int
    size: int


# ---------------------------------------------------------------------------------------------------- checking


def default_schema_path() -> Path | None:
    """The metadata schema in the shared data folder beside the checkout (``$DRASCLR_SHARED_DIR`` or ``../shared``),
    or None when it is not there."""
    shared = os.environ.get("DRASCLR_SHARED_DIR")
    root = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared"
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


# -------------------------------------------------------------------------------------------------- packaging


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
    if not _HEX64.fullmatch(digest):
        raise DistributionError(f"{path} does not start with a sha256 (64 hex digits): got {digest[:80]!r}")
    return digest.lower()


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


# ---------------------------------------------------------------------------------------------- release folder


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


def write_sha256sums(folder: PathLike, names: Sequence[str]) -> Path:
    """``folder/SHA256SUMS``: ``<hex>  <name>`` for each file ``names`` of ``folder``, sorted (``sha256sum -c``)."""
    folder = Path(folder)
    lines = "".join(f"{sha256sum(folder / name)}  {name}\n" for name in sorted(names))
    return atomic_write_bytes(folder / SUMS_FILE, lines.encode())


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


# ------------------------------------------------------------------------------------------------ downloading


def _expected_sha256(sha256: str | PathLike) -> str:
    text = str(sha256).strip()
    if _HEX64.fullmatch(text):
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
