"""Helpers for the model-zoo-style bundle tests: bundle paths, workflows, a small phantom scan, a local HTTP server
and a local mirror of the large files' download addresses."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import yaml

from tests.conftest import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"


def bundle_dir(name: str) -> Path:
    return BUNDLES / name


def config(name: str, *files: str) -> list[str]:
    return [str(bundle_dir(name) / "configs" / f) for f in files]


def write_small_phantom(folder: Path, seed: int = 11, name: str = "small") -> Path:
    """A coarse (about 3 mm) phantom chest CT saved as NIfTI: fast to preprocess, still a whole chest."""
    from drasclr_ext.data.phantom import generate_phantom

    phantom = generate_phantom(seed, resolution_scale=4.0, severity="moderate")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(phantom["image"].astype(np.int16), phantom["affine"]), path)
    return path


def run_bundle_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` in another working directory; fails the test with its output on error."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


PYTHON = sys.executable


def run_workflow(config_file, bundle_root: Path, workflow_type: str | None = "infer", **overrides) -> None:
    """A bundle's run in this process, as ``python -m monai.bundle run`` does it: initialize, run, finalize."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=config_file, workflow_type=workflow_type, bundle_root=str(bundle_root), **overrides
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def check_metadata(name: str) -> None:
    """The bundle's metadata validates against the 2024-07-25 schema in ../shared."""
    from monai.bundle import verify_metadata

    from tests.conftest import shared_path

    meta = str(bundle_dir(name) / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(shared_path("schemas", "meta_schema_20240725.json")))


def check_network_export(name: str, network, tmp_path: Path) -> None:
    """``verify_net_in_out`` passes, and ``ckpt_export``'s TorchScript equals ``network`` with the shipped weights."""
    import torch
    from monai.bundle import ckpt_export, verify_net_in_out

    from drasclr_ext.checkpoint import load_bundle_weights

    bundle = bundle_dir(name)
    meta, inference = str(bundle / "configs" / "metadata.json"), config(name, "inference.json")[0]
    model = bundle / "models" / "model.pt"
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference)
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts_path), ckpt_file=str(model), meta_file=meta, config_file=inference
    )
    exported = torch.jit.load(str(ts_path))
    net = load_bundle_weights(network, model, bundle).eval()
    x = torch.rand(2, 4, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x))


GITHUB_RAW = "https://raw.githubusercontent.com"
LOCAL_HOSTS = "127.0.0.1,localhost"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving ``folder`` during the block (set ``NO_PROXY`` to :data:`LOCAL_HOSTS` for
    the clients)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def mirror_large_files(bundle: Path, www: Path, server: str, sources: Path, subdir: str = "mirror") -> list[dict]:
    """Mirror the atlas files (``data/`` entries) of ``bundle``'s ``large_files.yml``, taken from ``sources``, under
    ``www/subdir/`` laid out as on raw.githubusercontent.com, and map only the host of their ``url`` to
    ``server/subdir``. Rewrites ``large_files.yml`` (the other entries unchanged); returns the mirrored entries."""
    path = bundle / "large_files.yml"
    entries, mirrored = [], []
    for entry in yaml.safe_load(path.read_text())["large_files"]:
        if entry["path"].startswith("data/"):
            url = entry["url"]
            assert url.startswith(f"{GITHUB_RAW}/batmanlab/DrasCLR/main/preprocess/misc/"), url
            target = www / subdir / url.removeprefix(f"{GITHUB_RAW}/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources / Path(entry["path"]).name, target)
            entry = {**entry, "url": url.replace(GITHUB_RAW, f"{server}/{subdir}")}
            mirrored.append(entry)
        entries.append(entry)
    path.write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))
    return mirrored
