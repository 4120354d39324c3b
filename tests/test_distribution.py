"""Release zips and downloads: ``drasclr_ext.distribution`` (``scripts/package_bundles.py``, ``drasclr download``)
and MONAI's own ``monai.bundle download / run / load / download_large_files`` against a local HTTP server.

Both bundles are packaged once per module, and a second time alongside to check that the zips are reproducible
(the slow part: a fresh process exporting TorchScript per build). The slow end-to-end test is
``test_end_to_end_emphysema_download_run_and_load``: one ``monai.bundle run`` of a small phantom in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow

from drasclr_ext.distribution.bundle_checks import SCHEMA_NAME, check_bundle, release_files
from drasclr_ext.distribution.bundle_zips import package_bundles, stage_bundle, write_deterministic_zip
from drasclr_ext.distribution.downloads import download_bundle, extract_bundle_zip, verify_bundle_zip
from drasclr_ext.distribution.release import _check_required_version, build_release
from drasclr_ext.errors import CheckpointError, DistributionError
from drasclr_ext.fileio import sha256sum
from drasclr_ext.networks import DrasCLRFeatures
from drasclr_ext.networks.segmentation import DrasCLRSegNet
from tests.bundle_utils import (
    BUNDLES,
    LOCAL_HOSTS,
    PYTHON,
    mirror_large_files,
    run_bundle_cli,
    run_workflow,
    serve_folder,
    write_small_phantom,
)
from tests.conftest import REPO_ROOT, SHARED_DIR, shared_path

EMPHYSEMA, SSL = "drasclr_emphysema_subtype", "drasclr_lung_ct_ssl"
NAMES = (EMPHYSEMA, SSL)


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    """The folder that the local server serves; the release zips are written here."""
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="module")
def builds(www, tmp_path_factory) -> tuple[dict, dict]:
    """Both bundles packaged into ``www`` (checked against the schema when ../shared is there) and, at the same
    time, packaged again into another folder: each build exports its TorchScript in its own fresh process."""
    schema = SHARED_DIR / "schemas" / SCHEMA_NAME
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(package_bundles, BUNDLES, tmp_path_factory.mktemp("again"), NAMES, check=False)
        first = package_bundles(BUNDLES, www, NAMES, schema=schema, check=schema.is_file())
        second = again.result()
    return {r.name: r for r in first}, {r.name: r for r in second}


@pytest.fixture(scope="module")
def releases(builds) -> dict:
    return builds[0]


@pytest.fixture(scope="module")
def server(www):
    """``http://127.0.0.1:PORT`` serving ``www``."""
    with serve_folder(www) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("NO_PROXY", LOCAL_HOSTS)  # also for the subprocesses, which inherit os.environ
        mp.setenv("no_proxy", LOCAL_HOSTS)
        yield url


def version_of(name: str) -> str:
    return json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())["version"]


def stored_member_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    """Offset in the zip of the first data byte of member ``info`` (after its local header)."""
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def damaged_copies(zip_path: Path, folder: Path) -> dict[str, Path]:
    """A copy with one byte of the weights flipped, and two truncated copies: one cut in the middle of the weights,
    one cut right after ``models/model.pt`` (itself a zip, stored), whose inner directory ``zipfile`` then finds."""
    data = zip_path.read_bytes()
    with zipfile.ZipFile(zip_path) as zf:
        model = next(i for i in zf.infolist() if i.filename.endswith("/models/model.pt"))
    start = stored_member_offset(data, model)
    flipped = bytearray(data)
    flipped[start + model.compress_size // 2] ^= 0xFF
    folder.mkdir(parents=True, exist_ok=True)
    cases = {
        "flipped": bytes(flipped),
        "cut_in_weights": data[: start + model.compress_size // 2],
        "cut_after_inner_zip": data[: start + model.compress_size],
    }
    for case, content in cases.items():
        (folder / f"{case}.zip").write_bytes(content)
    return {case: folder / f"{case}.zip" for case in cases}


@pytest.fixture(scope="module")
def damaged(releases, www) -> dict[str, Path]:
    return damaged_copies(releases[SSL].zip_path, www / "damaged")


# ------------------------------------------------------------------------------------------------- packaging


@pytest.mark.parametrize("name", NAMES)
def test_release_zip_has_one_top_folder_fixed_entries_and_a_sha256_file(releases, name):
    release = releases[name]
    assert release.zip_path.name == f"{name}_v{version_of(name)}.zip"
    sha_file = release.zip_path.with_name(release.zip_path.name + ".sha256")
    assert sha_file.read_text() == f"{sha256sum(release.zip_path)}  {release.zip_path.name}\n"
    assert release.sha256 == sha256sum(release.zip_path)
    with zipfile.ZipFile(release.zip_path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        expected = {f"{name}/{f}" for f in release_files(BUNDLES / name)} | {f"{name}/models/model.ts"}
        assert set(names) == expected
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and i.external_attr >> 16 == 0o100644 for i in infos)
        large = yaml.safe_load(zf.read(f"{name}/large_files.yml"))["large_files"]
        model_hash = next(e["hash_val"] for e in large if e["path"] == "models/model.pt")
        assert hashlib.sha256(zf.read(f"{name}/models/model.pt")).hexdigest() == model_hash
    assert verify_bundle_zip(release.zip_path, sha_file) == name


def test_rebuilding_gives_the_same_zip(builds):
    """Two whole builds (staging copy, TorchScript export in a fresh process, zip) give the same bytes."""
    first, second = builds
    assert {n: r.sha256 for n, r in first.items()} == {n: r.sha256 for n, r in second.items()}


def test_zip_bytes_do_not_depend_on_file_times_or_modes(tmp_path):
    files = {}
    for i, (mode, mtime) in enumerate([(0o600, 1e9), (0o755, 2e9)]):
        path = tmp_path / f"src{i}" / "a.json"
        path.parent.mkdir()
        path.write_text('{"a": 1}\n' * 100)
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime))
        files[i] = path
    one = write_deterministic_zip(tmp_path / "one.zip", {"b/a.json": files[0], "b/LICENSE": files[0]})
    two = write_deterministic_zip(tmp_path / "two.zip", {"b/LICENSE": files[1], "b/a.json": files[1]})
    assert one.read_bytes() == two.read_bytes()


def test_release_files_leave_out_local_outputs_and_training_checkpoints(tmp_path):
    bundle = stage_bundle(BUNDLES / SSL, tmp_path / SSL)
    shipped = release_files(bundle)
    for junk in (
        "eval/x/report.json",
        "data/ct/a.nii.gz",
        ".hidden",
        "configs/.inference.json.swp",
        "scripts/__pycache__/a.cpython-311.pyc",
        "models/checkpoint_epoch=2.pt",
        "runs/events",
    ):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"x")
    assert release_files(bundle) == shipped
    assert {"LICENSE", "large_files.yml", "models/model.pt", "configs/metadata.json"} <= set(shipped)


def test_check_bundle_says_what_to_fix(tmp_path):
    schema = shared_path("schemas", SCHEMA_NAME)
    bundle = stage_bundle(BUNDLES / SSL, tmp_path / SSL)
    (bundle / "LICENSE").unlink()
    with pytest.raises(DistributionError, match=r"lacks \['LICENSE'\]"):
        check_bundle(bundle, schema)
    shutil.copyfile(BUNDLES / SSL / "LICENSE", bundle / "LICENSE")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    (bundle / "configs" / "metadata.json").write_text(json.dumps({**meta, "version": "9.9.9"}))
    with pytest.raises(DistributionError, match="'9.9.9' has no changelog entry"):
        check_bundle(bundle, schema)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    data = bytearray((bundle / "models" / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (bundle / "models" / "model.pt").write_bytes(bytes(data))
    with pytest.raises(DistributionError, match="large_files.yml lists"):
        check_bundle(bundle, schema)
    with pytest.raises(DistributionError, match="--schema"):
        check_bundle(bundle, tmp_path / "no_schema.json")


def test_check_bundle_wants_the_data_licence_and_files_within_the_zoo_limit(tmp_path, monkeypatch):
    from drasclr_ext.distribution import bundle_checks

    schema = shared_path("schemas", SCHEMA_NAME)
    bundle = stage_bundle(BUNDLES / SSL, tmp_path / SSL)
    (bundle / "docs" / "data_license.txt").unlink()
    with pytest.raises(DistributionError, match="docs/data_license.txt"):
        check_bundle(bundle, schema)
    shutil.copyfile(BUNDLES / SSL / "docs" / "data_license.txt", bundle / "docs" / "data_license.txt")
    monkeypatch.setattr(bundle_checks, "MAX_FILE_BYTES", 10 * 2**20)  # the weights (16.6 MB) are now too large
    with pytest.raises(DistributionError, match=r"models/model.pt \(15.8 MiB\) exceed .* float16"):
        check_bundle(bundle, schema)


def test_a_release_folder_must_be_new_or_empty_and_a_failed_build_leaves_nothing(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.whl").write_bytes(b"")
    with pytest.raises(DistributionError, match="exists and is not an empty folder"):
        build_release(tmp_path / "used", REPO_ROOT, BUNDLES, isolation=False)
    (tmp_path / "not_a_checkout").mkdir()
    with pytest.raises(DistributionError, match=r"lacks .*'setup.cfg'.*--source must be the drasclr-ext checkout"):
        build_release(tmp_path / "release", tmp_path / "not_a_checkout", BUNDLES, isolation=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_checkout", "used"]  # no release, no hidden folder


def test_released_bundles_must_require_the_wheel_version(tmp_path):
    meta = json.loads((BUNDLES / SSL / "configs" / "metadata.json").read_text())
    version = meta["required_packages_version"]["drasclr-ext"]
    (tmp_path / SSL / "configs").mkdir(parents=True)
    (tmp_path / SSL / "configs" / "metadata.json").write_text(json.dumps(meta))
    _check_required_version(tmp_path, [SSL], tmp_path / f"drasclr_ext-{version}-py3-none-any.whl")
    with pytest.raises(DistributionError, match=rf"requires drasclr-ext=={version} but the release builds"):
        _check_required_version(tmp_path, [SSL], tmp_path / "drasclr_ext-9.9.9-py3-none-any.whl")


# ------------------------------------------------------------------------------------------------ downloading


def test_end_to_end_emphysema_download_run_and_load(releases, server, tmp_path, monkeypatch):
    """Download with MONAI from the local server (``monai.bundle download``, here in this process;
    tests/test_stranger_install.py runs its command line and a fresh process), run the downloaded bundle's inference
    on a small phantom from another working directory, then monai.bundle.load offline."""
    from monai.bundle import download, load

    bundle_dir, elsewhere = tmp_path / "bundles", tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = f"{server}/{releases[EMPHYSEMA].zip_path.name}"
    download(name=EMPHYSEMA, url=url, bundle_dir=str(bundle_dir), progress=False)
    root = bundle_dir / EMPHYSEMA
    assert sha256sum(bundle_dir / f"{EMPHYSEMA}.zip") == releases[EMPHYSEMA].sha256
    # a phantom with small lungs (fewer 64^3 windows than the default seed's)
    scans = write_small_phantom(tmp_path / "scans", seed=21).parent
    out = tmp_path / "out"
    # 64^3 windows without overlap, one at a time (the fewest network seconds on a CPU) and no overview figure: this
    # checks the download, not the maps
    monkeypatch.chdir(elsewhere)
    run_workflow(
        str(root / "configs" / "inference.json"),
        root,
        dataset_dir=str(scans),
        output_dir=str(out),
        overlap=0.0,
        sw_batch_size=1,
        overview=False,
    )
    assert not any(elsewhere.iterdir())
    report = json.loads((out / "small" / "report.json").read_text())
    assert report["model"]["weights_sha256"] == sha256sum(root / "models" / "model.pt")
    assert (report["dense"]["window"], report["dense"]["overlap"]) == (64, 0.0)
    assert not (root / "eval").exists()

    # models/model.pt is there, so load() does not download. With model= it parses no config (weights_only=True)
    net = load(name=EMPHYSEMA, bundle_dir=str(bundle_dir), model=DrasCLRSegNet(), device="cpu", progress=False)
    shipped = torch.load(root / "models" / "model.pt", weights_only=True)
    assert set(net.state_dict()) == set(shipped)
    for key, value in shipped.items():  # exactly the stored (float16) values, widened to the network's float32
        loaded = net.state_dict()[key]
        torch.testing.assert_close(loaded, value.to(loaded.dtype), rtol=0, atol=0)
    ts, meta, _ = load(name=EMPHYSEMA, bundle_dir=str(bundle_dir), load_ts_module=True, device="cpu")
    assert meta["version"] == version_of(EMPHYSEMA)
    x = torch.rand(1, 4, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net.eval()(x))


def test_monai_download_and_load_of_the_pretraining_bundle(releases, server, tmp_path):
    from monai.bundle import download, load

    url = f"{server}/{releases[SSL].zip_path.name}"
    download(name=SSL, url=url, bundle_dir=str(tmp_path), progress=False)
    # Without model=, load() builds network_def from the config and runs its "initialize" (our hash-checked weight
    # loading), which resolves bundle_root ("." in the config) against the working directory: pass it.
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"bundle_root": str(tmp_path / SSL)}))
    net = load(name=SSL, bundle_dir=str(tmp_path), workflow_type="inference", args_file=str(args), device="cpu")
    assert isinstance(net, DrasCLRFeatures)
    shipped = torch.load(tmp_path / SSL / "models" / "model.pt", weights_only=True)
    assert set(net.state_dict()) == set(shipped)
    loaded = net.state_dict()["conv1.weight"]
    torch.testing.assert_close(loaded, shipped["conv1.weight"].to(loaded.dtype), rtol=0, atol=0)


def test_drasclr_download_checks_the_sha256_and_extracts_atomically(releases, server, tmp_path):
    release = releases[SSL]
    url = f"{server}/{release.zip_path.name}"
    cli = [PYTHON, "-m", "drasclr_ext.cli", "download", SSL, "--url", url, "--bundle_dir", str(tmp_path)]
    run_bundle_cli([*cli, "--sha256", release.sha256], cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SSL]  # no temporary zip or folder left
    assert sha256sum(tmp_path / SSL / "models" / "model.pt") == sha256sum(BUNDLES / SSL / "models" / "model.pt")
    with pytest.raises(AssertionError, match="already exists"):
        run_bundle_cli([*cli, "--sha256", release.sha256], cwd=tmp_path)
    with pytest.raises(DistributionError, match="expected 0{64}: the download is incomplete or corrupt"):
        download_bundle(SSL, url, tmp_path / "other", sha256="0" * 64)
    assert list((tmp_path / "other").iterdir()) == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("flipped", "fails its CRC check|Bad CRC-32"),
        ("cut_in_weights", "not a complete, valid zip"),
        ("cut_after_inner_zip", "is truncated"),
    ],
)
def test_damaged_zips_are_refused(releases, damaged, server, tmp_path, case, message):
    damaged = damaged[case]
    url = f"{server}/damaged/{damaged.name}"
    with pytest.raises(DistributionError, match=message):
        verify_bundle_zip(damaged, name=SSL)
    with pytest.raises(DistributionError, match="download it again"):
        verify_bundle_zip(damaged, sha256=releases[SSL].sha256, name=SSL)
    with pytest.warns(UserWarning, match="not verified"), pytest.raises(DistributionError, match=message):
        download_bundle(SSL, url, tmp_path / "ours")
    assert list((tmp_path / "ours").iterdir()) == []  # nothing extracted, no temporary file left

    # monai.bundle download (no hash for url downloads) extracts member by member into bundle_dir/<name>:
    # - a flipped byte: BadZipFile (bad CRC) at the end of that member, but the files before it and the corrupt
    #   member itself stay; a second download then skips extraction ("non-empty folder exists") and succeeds;
    # - cut in the weights: BadZipFile, nothing extracted;
    # - cut right after models/model.pt: no error at all. zipfile reads the directory of the stored model.pt (a zip
    #   itself) and MONAI extracts torch's archive members next to the bundle, with no bundle folder.
    from monai.bundle import download

    theirs = tmp_path / "theirs"
    if case == "cut_after_inner_zip":
        download(name=SSL, url=url, bundle_dir=str(theirs), progress=False)
        assert not (theirs / SSL).exists() and any(p.name == "data.pkl" for p in theirs.rglob("*"))
    else:
        with pytest.raises(zipfile.BadZipFile):
            download(name=SSL, url=url, bundle_dir=str(theirs), progress=False)
    if case == "flipped":
        model = theirs / SSL / "models" / "model.pt"
        assert model.is_file() and sha256sum(model) != sha256sum(BUNDLES / SSL / "models" / "model.pt")
        download(name=SSL, url=url, bundle_dir=str(theirs), progress=False)  # accepted the second time


def test_verify_refuses_unsafe_paths_and_foreign_zips(tmp_path):
    cases = {
        "../evil.txt": "unsafe member path",
        "/etc/evil.txt": "unsafe member path",
        f"{SSL}/../../evil.txt": "unsafe member path",
        "other_bundle/configs/metadata.json": "one top folder 'drasclr_lung_ct_ssl'",
        f"{SSL}/README.md": "no drasclr_lung_ct_ssl/configs/metadata.json",
    }
    for i, (member, message) in enumerate(cases.items()):
        path = tmp_path / f"{SSL}_v0.1.{i}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(member, "{}")
        with pytest.raises(DistributionError, match=message):
            verify_bundle_zip(path)  # the bundle name comes from the zip name
    with pytest.raises(DistributionError, match="neither 64 hex digits nor a .sha256 file"):
        verify_bundle_zip(path, sha256="abc")


def test_altered_weights_in_a_downloaded_bundle_fail_inference_with_the_hash(releases, tmp_path):
    root = extract_bundle_zip(releases[SSL].zip_path, tmp_path, SSL)
    data = bytearray((root / "models" / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (root / "models" / "model.pt").write_bytes(bytes(data))
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(root),
        output_dir=str(tmp_path / "out"),
        dataset_dir=str(tmp_path / "scans"),
    )
    with pytest.raises(Exception) as info:  # MONAI wraps errors of "$" expressions in a RuntimeError
        workflow.initialize()
    errors = [info.value]
    while errors[-1].__cause__ is not None:
        errors.append(errors[-1].__cause__)
    ours = next(e for e in errors if isinstance(e, CheckpointError))
    large = yaml.safe_load((root / "large_files.yml").read_text())["large_files"]
    expected = next(e["hash_val"] for e in large if e["path"] == "models/model.pt")
    assert f"expected {expected}" in str(ours) and "download it again" in str(ours)


def test_atlas_urls_follow_the_official_repository_layout(www, server, tmp_path):
    """The atlas entries of large_files.yml, with only the host mapped to a local mirror laid out like
    raw.githubusercontent.com/batmanlab/DrasCLR/main/ (the files are in preprocess/misc/ there), download and pass
    their hash check. ``monai.bundle.download_large_files`` runs in this process; the next test runs its command
    line."""
    from monai.bundle import download_large_files

    atlas = shared_path("data", "drasclr_atlas")
    for name in (EMPHYSEMA, SSL):
        root = stage_bundle(BUNDLES / name, tmp_path / name)
        entries = mirror_large_files(root, www, server, atlas)
        assert len(entries) == 2
        assert not any((root / entry["path"]).exists() for entry in entries)  # the staged bundle has no data/
        download_large_files(bundle_path=str(root))
        for entry in entries:
            assert sha256sum(root / entry["path"]) == entry["hash_val"]


def test_download_large_files_fetches_the_weights_and_checks_their_hash(releases, server, www, tmp_path):
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    root = extract_bundle_zip(releases[SSL].zip_path, tmp_path, SSL)
    served = www / "large" / SSL
    entries = []
    # the models/ entries, pointed at the local server; the atlas entries point at GitHub (no network here)
    for entry in yaml.safe_load((root / "large_files.yml").read_text())["large_files"]:
        if entry["path"].startswith("models/"):
            (served / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(root / entry["path"], served / entry["path"])
            entries.append({**entry, "url": f"{server}/large/{SSL}/{entry['path']}"})
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))
    assert not (root / "models" / "model.pt").exists()
    download_large_files(bundle_path=str(root))  # its command line: tests/test_stranger_install.py
    for entry in entries:
        assert sha256sum(root / entry["path"]) == entry["hash_val"]

    (root / "models" / "model.pt").unlink()
    wrong = [{**e, "hash_val": "0" * 64} for e in entries]
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": wrong}, sort_keys=False))
    with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
        download_large_files(bundle_path=str(root))
    assert not (root / "models" / "model.pt").exists()
