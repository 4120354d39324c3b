"""A stranger's install (``release`` marker): the release folder of ``drasclr_ext.distribution.release.build_release``
(wheel, sdist, bundle zip, ``SHA256SUMS``) is the only source of ``drasclr-ext`` in a fresh virtual environment that
cannot see the checkout; a bundle zip comes over HTTP from 127.0.0.1 with ``python -m monai.bundle download``, runs
from another directory, and ``download_large_files`` fetches the atlas from a local mirror of the real addresses.

The virtual environment has no pip of its own and no system site-packages; pip installs into it with
``--python`` (faster than ``ensurepip``), and after the install a ``.pth`` file adds the running interpreter's
site-packages for torch, MONAI and the other dependencies, which a stranger installs from the package index. That
folder also holds the checkout's editable install, but its ``__editable__`` finder only runs from a ``.pth`` file
that ``site`` processes, and a folder added by a ``.pth`` line is not processed: the tests check that
``drasclr_ext`` comes from the virtual environment. About a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from drasclr_ext import __version__
from drasclr_ext.distribution.checksums import SUMS_FILE
from drasclr_ext.distribution.release import build_release
from drasclr_ext.fileio import sha256sum
from tests.bundle_utils import BUNDLES, LOCAL_HOSTS, mirror_large_files, serve_folder, write_small_phantom
from tests.conftest import REPO_ROOT, shared_path

pytestmark = pytest.mark.release

SSL = "drasclr_lung_ct_ssl"


def stranger_env(home: Path) -> dict[str, str]:
    """The environment of a user outside the checkout: no PYTHONPATH, no pip configuration or extra package
    sources, requests to 127.0.0.1 without a proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, NO_PROXY=LOCAL_HOSTS, no_proxy=LOCAL_HOSTS, HOME=str(home))
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a command; fails the test with its output on error; returns stdout and stderr."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        command = " ".join(map(str, args))
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """The release folder (the package and the pretraining bundle), served over HTTP; a virtual environment with
    drasclr-ext installed from that folder only; the bundle downloaded into ``home/bundles`` with MONAI."""
    tmp = tmp_path_factory.mktemp("stranger")
    # offline (--no-isolation), and without the bundle checks (10 s here; tests/test_distribution.py runs them)
    release = build_release(tmp / "release", REPO_ROOT, BUNDLES, names=[SSL], isolation=False, check=False)
    home, work = tmp / "home", tmp / "home" / "work"
    work.mkdir(parents=True)
    env = stranger_env(home)
    venv.create(home / "venv", with_pip=False, symlinks=True)
    python = home / "venv" / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps"]
    log = run([*install, "--find-links", release.folder, "drasclr-ext"], cwd=work, env=env)
    # the dependencies, as a stranger would have installed them from the package index beforehand
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work, env=env)
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site.strip()) / "_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    with serve_folder(tmp) as server:
        zip_name = release.bundles[0].zip_path.name
        download = [python, "-m", "monai.bundle", "download", "--name", SSL, "--bundle_dir", home / "bundles"]
        run([*download, "--url", f"{server}/release/{zip_name}", "--progress", "False"], cwd=work, env=env)
        yield {
            "release": release,
            "home": home,
            "work": work,
            "env": env,
            "python": python,
            "install_log": log,
            "bundle": home / "bundles" / SSL,
            "server": server,
            "www": tmp,
        }


def test_the_release_folder_is_exactly_what_is_published(stranger):
    release = stranger["release"]
    names = sorted(p.name for p in release.folder.iterdir())
    zip_name = release.bundles[0].zip_path.name
    wheel, sdist = f"drasclr_ext-{__version__}-py3-none-any.whl", f"drasclr_ext-{__version__}.tar.gz"
    assert names == sorted([SUMS_FILE, wheel, sdist, zip_name, f"{zip_name}.sha256"])
    sums = dict(line.split()[::-1] for line in (release.folder / SUMS_FILE).read_text().splitlines())
    assert sums == {name: sha256sum(release.folder / name) for name in (wheel, sdist, zip_name)}
    # a released bundle names the package version it needs, which the wheel provides
    meta = json.loads((stranger["bundle"] / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["drasclr-ext"] == __version__


def test_drasclr_ext_comes_from_the_venv_not_the_checkout(stranger):
    assert "Successfully installed drasclr-ext" in stranger["install_log"]
    code = "import drasclr_ext, importlib.metadata as m; print(drasclr_ext.__file__); print(m.version('drasclr-ext'))"
    out = run([stranger["python"], "-c", code], cwd=stranger["work"], env=stranger["env"]).split()
    module = Path(out[-2]).resolve()
    assert module.is_relative_to((stranger["home"] / "venv").resolve()), module
    assert not module.is_relative_to(REPO_ROOT), module
    assert out[-1] == __version__
    help_text = run(
        [stranger["home"] / "venv" / "bin" / "drasclr", "--help"], cwd=stranger["work"], env=stranger["env"]
    )
    assert "download" in help_text and "release" in help_text


def test_the_downloaded_zip_is_the_published_one_and_runs_from_another_directory(stranger, tmp_path):
    release = stranger["release"]
    assert sha256sum(stranger["home"] / "bundles" / f"{SSL}.zip") == release.bundles[0].sha256
    scans = write_small_phantom(stranger["home"] / "scans").parent
    out = stranger["home"] / "embeddings"
    bundle = stranger["bundle"]
    args = [stranger["python"], "-m", "monai.bundle", "run", "--config_file", bundle / "configs" / "inference.json"]
    args += ["--bundle_root", bundle, "--dataset_dir", scans, "--output_dir", out]
    run(args, cwd=stranger["work"], env=stranger["env"], timeout=600)
    manifest = json.loads((out / "small" / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == sha256sum(bundle / "models" / "model.pt")
    assert not (bundle / "eval").exists() and not any(stranger["work"].iterdir())  # nothing written elsewhere


def test_download_large_files_fetches_the_atlas_from_a_mirror_of_the_real_addresses(stranger):
    atlas = shared_path("data", "drasclr_atlas")
    bundle = stranger["bundle"]
    mirrored = mirror_large_files(bundle, stranger["www"], stranger["server"], atlas)
    assert len(mirrored) == 2 and not (bundle / "data").exists()
    command = [stranger["python"], "-m", "monai.bundle", "download_large_files", "--bundle_path", bundle]
    run(command, cwd=stranger["work"], env=stranger["env"])
    for entry in mirrored:
        assert sha256sum(bundle / entry["path"]) == entry["hash_val"]
