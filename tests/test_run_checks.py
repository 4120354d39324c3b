"""No silent garbage: every voxel checked, no NaN written, unique subject names, one locked output directory, stale
temporary files cleaned, quality flags, one failures.csv schema, and run-level errors as one short message."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from drasclr_ext.errors import DrasCLRError, InputImageError, error_message, our_error
from drasclr_ext.fileio import LOCK_FILE, OutputLock, atomic_save_npy
from drasclr_ext.inference.runner import CohortRunner
from drasclr_ext.quality import scan_quality
from drasclr_ext.subjects import FAILURE_FIELDS
from drasclr_ext.transforms.io import load_ct, save_like
from tests.bundle_utils import PYTHON, bundle_dir
from tests.conftest import REPO_ROOT
from tests.synthetic_chest import make_chest


@pytest.fixture(scope="module")
def phantom():
    from drasclr_ext.data.phantom import generate_phantom

    return generate_phantom(3, resolution_scale=3.0)


def test_a_single_nan_voxel_inside_the_lung_is_refused(phantom, tmp_path):
    image = phantom["image"].astype(np.float32)
    lung = np.argwhere(phantom["lung_mask"] > 0)
    voxel = next(tuple(v) for v in lung if all(i % 4 for i in v) and v[0] != image.shape[0] // 2)
    image[voxel] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(image, phantom["affine"]), path)
    with pytest.raises(InputImageError, match=rf"contains 1 NaN or infinite voxel\(s\).*index \({voxel[0]}, "):
        load_ct(path)


def test_writers_refuse_nan(tmp_path):
    values = np.zeros((4, 4, 4), np.float32)
    values[1, 2, 3] = np.inf
    with pytest.raises(DrasCLRError, match=r"refusing to write .*1 of 64 values are NaN or infinite"):
        atomic_save_npy(tmp_path / "x.npy", values)
    reference = MetaTensor(torch.zeros(4, 4, 4), affine=torch.eye(4))
    with pytest.raises(DrasCLRError, match="refusing to write"):
        save_like(np.full((4, 4, 4), np.nan, np.float32), reference, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_embedding_writer_refuses_nan_embeddings(tmp_path):
    from drasclr_ext.inference.embeddings import EmbeddingWriter

    data = {"patch_embeddings": np.full((3, 8), np.nan, np.float32), "subject": "s"}
    with pytest.raises(DrasCLRError, match="NaN or infinite"):
        EmbeddingWriter()(data, tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists()


class _Recorder:
    """Preprocessing / inferer / writer stand-ins that record the subjects they see."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def preprocessing(self, data: dict) -> dict:
        self.seen.append(data["subject"])
        return data

    def writer(self, data: dict, subject_dir: Path) -> None:
        subject_dir.mkdir(parents=True, exist_ok=True)
        (subject_dir / "manifest.json").write_text("{}")


def _runner(dataset, out, recorder: _Recorder) -> CohortRunner:
    return CohortRunner(dataset, out, recorder.preprocessing, lambda d: d, recorder.writer, progress=False)


def _scans(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"scan")
    return folder


def test_names_differing_only_by_extension_stop_the_run_before_any_scan(tmp_path):
    scans = _scans(tmp_path / "scans", "scan.nii", "scan.nii.gz", "other.nrrd")
    recorder = _Recorder()
    with pytest.raises(DrasCLRError, match=r"'scan': .*scan\.nii, .*scan\.nii\.gz"):
        _runner(scans, tmp_path / "out", recorder).run()
    assert recorder.seen == []


def test_preprocess_refuses_colliding_names_too(tmp_path):
    from drasclr_ext.preprocess.cohort import preprocess_cohort

    scans = _scans(tmp_path / "scans", "scan.nii", "scan.nii.gz")
    with pytest.raises(DrasCLRError, match="shared by several inputs"):
        preprocess_cohort(scans, tmp_path / "out", progress=False)


@pytest.mark.parametrize("case", ["missing dataset", "empty dataset", "output is a file", "output under a file"])
def test_run_level_problems_stop_before_any_scan(tmp_path, case):
    scans = _scans(tmp_path / "scans", "a.nii.gz")
    out = tmp_path / "out"
    messages = {
        "missing dataset": "does not exist",
        "empty dataset": "no scans found",
        "output is a file": "is a file",
        "output under a file": "cannot write to the output directory",
    }
    if case == "missing dataset":
        scans = tmp_path / "nowhere"
    elif case == "empty dataset":
        scans = tmp_path / "empty"
        scans.mkdir()
    elif case == "output is a file":
        out.write_text("")
    else:
        out.write_text("")
        out = out / "sub"
    recorder = _Recorder()
    with pytest.raises(DrasCLRError, match=messages[case]):
        _runner(scans, out, recorder).run()
    assert recorder.seen == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: nothing to check")
def test_read_only_output_directory_stops_before_any_scan(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    recorder = _Recorder()
    try:
        with pytest.raises(DrasCLRError, match="cannot write to the output directory"):
            _runner(_scans(tmp_path / "scans", "a.nii.gz"), out, recorder).run()
    finally:
        out.chmod(0o755)
    assert recorder.seen == []


def test_a_second_run_on_a_locked_output_directory_stops(tmp_path):
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_FILE).write_text(f"{other.pid} {os.uname().nodename}\n")
        recorder = _Recorder()
        with pytest.raises(DrasCLRError, match=rf"lock {out / LOCK_FILE} is held by process {other.pid}"):
            _runner(_scans(tmp_path / "scans", "a.nii.gz"), out, recorder).run()
        assert recorder.seen == []
    finally:
        other.kill()
        other.wait()
    with OutputLock(out):  # the process is gone: its lock is stale and taken over
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(DrasCLRError, match="another run is writing"):
            OutputLock(out).acquire()
    assert not (out / LOCK_FILE).exists()


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from drasclr_ext.fileio import OutputLock, atomic_write
out = Path(sys.argv[1])
OutputLock(out).acquire()
killed = lambda tmp: (Path(tmp).write_text("half"), os.kill(os.getpid(), signal.SIGKILL))
atomic_write(out / "a" / "report.json", killed)
"""


def test_stale_lock_and_temporary_files_of_a_killed_run_are_cleaned(tmp_path):
    out = tmp_path / "out"
    killed = _run([PYTHON, "-c", KILLED_WHILE_WRITING, str(out)])
    assert killed.returncode == -9
    stale = [p for p in (out / "a").iterdir() if p.name != "report.json"]
    assert len(stale) == 1 and stale[0].name.startswith(".report.json.") and (out / LOCK_FILE).is_file()
    (out / ".notes.tmp").write_text("not ours")  # not named as our temporary files: kept
    recorder = _Recorder()
    summary = _runner(_scans(tmp_path / "scans", "a.nii.gz", "b.nii.gz"), out, recorder).run()
    assert summary["processed"] == ["a", "b"] and recorder.seen == ["a", "b"]
    assert not stale[0].exists() and not (out / LOCK_FILE).exists() and (out / ".notes.tmp").exists()


def test_thick_slices_get_a_quality_flag():
    thick = MetaTensor(torch.zeros(8, 8, 8), affine=torch.diag(torch.tensor([0.7, 0.7, 5.0, 1.0])))
    flags = scan_quality(thick)
    assert [(f["flag"], f["severity"]) for f in flags] == [("thick_slices", "warning")]
    assert "5 mm" in flags[0]["message"]
    thin = MetaTensor(torch.zeros(8, 8, 8), affine=torch.diag(torch.tensor([0.7, 0.7, 1.0, 1.0])))
    thin.meta["acquisition"] = {"slice_thickness": 10.0}  # 1 mm apart, but 10 mm thick
    assert [f["flag"] for f in scan_quality(thin)] == ["thick_slices"]
    assert scan_quality(MetaTensor(torch.zeros(8, 8, 8), affine=torch.eye(4))) == []


def test_dense_report_lists_quality_flags():
    from drasclr_ext.inference.dense import DenseSubtypeWriter

    chest = make_chest(spacing=(3.0, 3.0, 4.0))
    image = MetaTensor(torch.from_numpy(chest.hu)[None], affine=torch.from_numpy(chest.affine))
    lung = MetaTensor(torch.from_numpy(chest.lungs)[None], affine=image.affine)
    report = DenseSubtypeWriter().report({"image": image, "lung_mask": lung, "subtype_label": lung}, "chest")
    assert [f["flag"] for f in report["quality"]] == ["thick_slices"]


def test_failures_csv_has_one_schema_for_bundles_and_preprocessing(tmp_path):
    from drasclr_ext.preprocess.cohort import preprocess_cohort

    scans = _scans(tmp_path / "scans", "broken.nii.gz")
    preprocess_cohort(scans, tmp_path / "pre", progress=False, build_store=False)

    def failing(data):
        raise InputImageError("bad scan")

    CohortRunner(scans, tmp_path / "run", failing, lambda d: d, lambda d, p: None, progress=False).run()
    for out in (tmp_path / "pre", tmp_path / "run"):
        with open(out / "failures.csv") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        assert tuple(reader.fieldnames) == FAILURE_FIELDS
        assert [(r["subject"], r["input"]) for r in rows] == [("broken", str(scans / "broken.nii.gz"))]


def test_no_lungs_names_the_file(tmp_path):
    from drasclr_ext.transforms.lung_mask import LungMaskd

    chest = make_chest(lungs=False)
    path = tmp_path / "abdomen.nii.gz"
    nib.save(nib.Nifti1Image(chest.hu, chest.affine), path)
    with pytest.raises(InputImageError, match=rf"{path}: no lungs were found"):
        LungMaskd("image")({"image": load_ct(path)[None]})


def test_loose_files_in_the_dataset_folder_are_mentioned(tmp_path, caplog):
    from drasclr_ext.subjects import read_datalist

    scans = _scans(tmp_path / "scans", "a.nii.gz", "notes.txt", "scan.dcm.zip")
    with caplog.at_level("WARNING"):
        assert read_datalist(scans) == [scans / "a.nii.gz"]
    assert "ignoring 2 entries" in caplog.text and "notes.txt" in caplog.text


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "DRASCLR_DEBUG"}
    environment.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment)


def _assert_short_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "ConfigExpression" not in output, output[-3000:]
    assert proc.stderr.strip().splitlines()[-2].startswith("drasclr: error: ") and message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "(set DRASCLR_DEBUG=1 to see the full traceback)"


SSL = bundle_dir("drasclr_lung_ct_ssl")


def _bundle_settings(tmp_path: Path, case: str) -> tuple[dict, str]:
    """Overrides of the pretraining bundle's inference that make its run fail, and the message expected."""
    settings = {"dataset_dir": str(tmp_path / "nowhere"), "output_dir": str(tmp_path / "out")}
    if case == "missing dataset":
        return settings, "does not exist"
    if case == "rejected weights":
        (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
        return {**settings, "ckpt_path": str(tmp_path / "model.pt")}, "could not read checkpoint"
    settings["dataset_dir"] = str(_scans(tmp_path / "scans", "a.nii.gz"))
    if case == "output is a file":
        (tmp_path / "out").write_text("")
        return settings, "is a file"
    return {**settings, "atlas_name": "drasclr", "atlas_path": str(tmp_path / "no_atlas")}, "atlas 'drasclr': missing"


def test_bundle_run_level_error_is_one_message_from_the_command_line(tmp_path):
    """``python -m monai.bundle run``: our error, wrapped by MONAI's config parser, ends the process with its message
    alone (the excepthook installed by ``import drasclr_ext``); the other cases below raise the same way in-process."""
    settings, expected = _bundle_settings(tmp_path, "missing dataset")
    args = [PYTHON, "-m", "monai.bundle", "run", "--config_file", str(SSL / "configs" / "inference.json")]
    args += ["--bundle_root", str(SSL)] + [f"--{k}={v}" for k, v in settings.items()]
    _assert_short_error(_run(args), expected)
    assert not (tmp_path / "out" / "failures.csv").exists()


@pytest.mark.parametrize("case", ["output is a file", "rejected weights", "missing atlas"])
def test_bundle_run_level_errors_are_ours_and_stop_before_any_scan(tmp_path, case):
    """The bundle's run raises our error (what the excepthook prints, see the test above) before any scan."""
    from monai.bundle import ConfigWorkflow

    settings, expected = _bundle_settings(tmp_path, case)
    workflow = ConfigWorkflow(
        config_file=str(SSL / "configs" / "inference.json"), workflow_type="infer", bundle_root=str(SSL), **settings
    )
    with pytest.raises(Exception) as raised:
        workflow.initialize()
        workflow.run()
    ours = our_error(raised.value)
    assert ours is not None and expected in str(ours), repr(raised.value)
    assert "ConfigExpression" not in error_message(ours)
    assert not (tmp_path / "out" / "failures.csv").exists()


def test_drasclr_commands_report_our_errors_in_one_message_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    """The ``drasclr`` command line in processes of its own; ``preprocess`` through the same ``main`` in-process."""
    from drasclr_ext.cli import main

    monkeypatch.delenv("DRASCLR_DEBUG", raising=False)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    args = [PYTHON, "-m", "drasclr_ext.cli", "convert_checkpoint", str(tmp_path / "bad.pt"), str(tmp_path / "o.pt")]
    proc = _run(args)
    _assert_short_error(proc, "could not read checkpoint")
    assert "weights_only=False" not in proc.stderr
    debug = _run(args, DRASCLR_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    command = ["preprocess", str(tmp_path / "none"), str(tmp_path / "o")]
    with pytest.raises(SystemExit) as ended:
        main(command)
    output = capsys.readouterr()
    assert ended.value.code == 1
    _assert_short_error(
        subprocess.CompletedProcess(command, ended.value.code, output.out, output.err), "does not exist"
    )
