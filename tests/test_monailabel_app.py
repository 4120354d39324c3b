"""The MONAI Label app of the emphysema bundle on a real server: ``python -m drasclr_ext.monailabel start_server``
on 127.0.0.1 with a studies folder of two coarse phantoms (one with a final label) and a broken scan, then
``GET /info/``, ``POST /infer/<model>`` (label map geometry and report values; errors with their message) and
``POST /train/<model>`` for one short epoch (``models/model.pt`` rewritten). A copy of the bundle is used, so the
repository's weights stay as they are. Any attempt to reach the internet goes to a dead proxy. Skipped when
monailabel is not installed (it is not in the ``test`` extra: see docs/MONAILABEL.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip(
    "monailabel",
    reason="monailabel is not installed; install it as docs/MONAILABEL.md says (the `label` extra, then monailabel "
    "and pydicom-seg with --no-deps)",
)

from drasclr_ext.bundle_files import large_file_hash
from drasclr_ext.checkpoint import sha256sum  # noqa: E402
from drasclr_ext.data.phantom import generate_phantom  # noqa: E402
from drasclr_ext.metrics.emphysema import laa950_percent  # noqa: E402
from drasclr_ext.transforms.io import load_ct  # noqa: E402
from tests.bundle_utils import bundle_dir, write_small_phantom  # noqa: E402

NAME = "drasclr_emphysema_subtype"
START_TIMEOUT_S = 180
INFER_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 420
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, every proxied request fails at once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server by its PID (and any training subprocess it started), kill after a timeout."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [proc, *children]:
        try:
            p.terminate()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import requests

    root = tmp_path_factory.mktemp("monailabel")
    bundle = root / NAME
    shutil.copytree(bundle_dir(NAME), bundle, ignore=shutil.ignore_patterns("eval"))
    # a short training run: 1 subject x 2 crops of 32^3 per iteration
    train = json.loads((bundle / "configs" / "train.json").read_text())
    train.update(window=32, crops_per_subject=2, subject_repeats=1)
    (bundle / "configs" / "train.json").write_text(json.dumps(train, indent=4))
    studies = root / "studies"
    write_small_phantom(studies, seed=21, name="chest_a")  # small lungs: fewer 64^3 windows to infer
    write_small_phantom(studies, seed=12, name="chest_b")
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b not a scan")
    phantom = generate_phantom(12, resolution_scale=4.0, severity="moderate")
    (studies / "labels" / "final").mkdir(parents=True)
    nib.save(nib.Nifti1Image(phantom["label"], phantom["affine"]), studies / "labels" / "final" / "chest_b.nii.gz")
    port = _free_port()
    log = root / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", MONAI_LABEL_SESSION_PATH=str(root / "sessions"))
    env.update(HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, NO_PROXY="127.0.0.1,localhost")
    cmd = [sys.executable, "-m", "drasclr_ext.monailabel", "start_server", "--app", str(root / "app")]
    cmd += ["--studies", str(studies), "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    session = requests.Session()
    session.trust_env = False  # talk to the server directly, whatever the test's environment says
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                if session.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /info/ within {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(1)
        yield {"url": url, "session": session, "root": root, "bundle": bundle, "studies": studies, "log": log}
    finally:
        _stop(proc)


def test_info_lists_the_model_its_labels_and_trainer(server):
    info = server["session"].get(f"{server['url']}/info/", timeout=30).json()
    model = info["models"][NAME]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"normal": 1, "centrilobular": 2, "paraseptal": 3, "panlobular": 4}
    assert NAME in info["trainers"]
    assert info["datastore"]["total"] == 3 and info["datastore"]["completed"] == 1
    assert "ProxyError" not in _log_tail(server["log"], 10**7), "the server tried to reach the internet"


def test_infer_returns_the_label_map_in_the_input_geometry_and_the_report(server):
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    response = server["session"].post(
        f"{server['url']}/infer/{NAME}",
        params={"image": "chest_a"},
        data={"params": json.dumps({"overlap": 0.0, "sw_batch_size": 1})},
        timeout=INFER_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text[:2000]
    parts = {}
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        parts[disposition.split('name="')[1].split('"')[0]] = part.content
    result = json.loads(parts["params"])
    label_file = server["root"] / "returned_label.nii.gz"
    label_file.write_bytes(parts["image"])

    scan = load_ct(server["studies"] / "chest_a.nii.gz")
    returned = nib.load(label_file)
    label = np.asarray(returned.dataobj)
    assert returned.get_data_dtype() == np.uint8
    assert label.shape == tuple(scan.shape)
    np.testing.assert_allclose(returned.affine, scan.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(result["subtype_label"]["affine"], scan.affine.numpy(), atol=1e-6)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4} and (label > 0).any()

    report = result["report"]
    hu, lung = scan.numpy(), label > 0  # the label map is 0 exactly outside the bundle's lung mask
    assert report["laa950_percent"] == pytest.approx(laa950_percent(hu, lung), abs=1e-9)
    assert report["lung_volume_ml"] == pytest.approx(lung.sum() * abs(np.linalg.det(returned.affine[:3, :3])) / 1000)
    fractions = report["subtype_fractions"]
    for value, name in enumerate(("normal", "centrilobular", "paraseptal", "panlobular"), start=1):
        assert fractions[name] == pytest.approx((label == value).sum() / lung.sum())
    assert (report["dense"]["window"], report["dense"]["overlap"]) == (64, 0.0)
    assert report["model"]["weights_sha256"] == sha256sum(server["bundle"] / "models" / "model.pt")
    assert result["label_names"] == {"normal": 1, "centrilobular": 2, "paraseptal": 3, "panlobular": 4}


def test_infer_errors_come_back_with_our_message(server):
    session, url = server["session"], server["url"]
    broken = session.post(f"{url}/infer/{NAME}", params={"image": "broken"}, timeout=INFER_TIMEOUT_S)
    assert broken.status_code == 422 and "InputImageError: could not read" in broken.json()["detail"]
    bad = session.post(
        f"{url}/infer/{NAME}", params={"image": "chest_a"}, data={"params": '{"overlap": 1.5}'}, timeout=60
    )
    assert bad.status_code == 422 and "LabelRequestError" in bad.json()["detail"]


def test_train_fine_tunes_from_the_final_label_and_rewrites_the_weights(server):
    session, url = server["session"], server["url"]
    model = server["bundle"] / "models" / "model.pt"
    before = model.read_bytes()
    params = {"max_epochs": 1, "epoch_length": 1, "val_split": 0, "batch_size": 1}
    response = session.post(f"{url}/train/{NAME}", json=params, timeout=30)
    assert response.status_code == 200, response.text[:2000]
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        task = session.get(f"{url}/train/", timeout=30).json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"training did not finish within {TRAIN_TIMEOUT_S} s:\n" + "\n".join(task.get("details", [])))
        time.sleep(2)
    assert task["status"] == "DONE", "\n".join(task.get("details", [])) + "\n" + _log_tail(server["log"])
    after = model.read_bytes()
    assert after != before
    assert large_file_hash(server["bundle"], model) == sha256sum(model)
    stats = session.get(f"{url}/info/", timeout=30).json()["train_stats"][NAME]
    assert stats["weights_changed"] and stats["training_subjects"] == 1 and stats["validation_subjects"] == 0
    assert stats["weights_sha256"] == sha256sum(model)
    datalist = json.loads((Path(stats["run_dir"]) / "datalist.json").read_text())
    assert [Path(p["label"]).name for p in datalist["training"]] == ["chest_b.nii.gz"]


def test_monai_label_image_path_breaks_spacingd_and_our_rename_fixes_it(tmp_path):
    """The MONAI 1.6 failure our infer task works around (docs/MONAILABEL.md), on a tiny NIfTI."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Spacingd

    from drasclr_ext.monailabel.compat import move_string_image_keys

    path = str(tmp_path / "tiny.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.int16), np.eye(4)), path)
    load = [LoadImaged("image"), EnsureChannelFirstd("image")]
    data = {"image": path, "image_path": path}  # what BasicInferTask passes to the pre-transforms
    for t in load:
        data = t(data)
    with pytest.raises(AttributeError, match="'str' object has no attribute 'update'"):
        Spacingd("image", pixdim=(2.0, 2.0, 2.0))(dict(data))
    move_string_image_keys(data)
    assert data["input_path"] == path and "image_path" not in data
    np.testing.assert_allclose(Spacingd("image", pixdim=(2.0, 2.0, 2.0))(data)["image"].pixdim, [2.0, 2.0, 2.0])


def test_bad_requests_and_the_validation_split():
    from drasclr_ext.monailabel.bundle import check_infer_overrides
    from drasclr_ext.monailabel.errors import LabelRequestError
    from drasclr_ext.monailabel.train import split_datalist

    assert check_infer_overrides({"overlap": "0.5", "sw_batch_size": "3", "autocast": ["true", "false"]}) == {
        "overlap": 0.5,
        "sw_batch_size": 3,
        "autocast": True,
    }
    assert check_infer_overrides({"autocast": False, "other": 1}) == {"autocast": False}
    assert check_infer_overrides({"autocast": "0"}) == {"autocast": False}
    for bad in (
        {"overlap": 1.0},
        {"overlap": -0.1},
        {"overlap": "half"},
        {"sw_batch_size": 0},
        {"sw_batch_size": "x"},
        {"autocast": "maybe"},
    ):
        with pytest.raises(LabelRequestError, match="bad inference parameter"):
            check_infer_overrides(bad)
    pairs = [{"image": f"/s/{c}.nii.gz", "label": f"/s/labels/final/{c}.nii.gz"} for c in "dcba"]
    train, val = split_datalist(pairs, 0.25)
    assert [p["image"] for p in val] == ["/s/d.nii.gz"] and len(train) == 3
    assert split_datalist(pairs[:1], 0.5) == (pairs[:1], [])
