"""The ``drasclr`` command line (python-fire). Each command imports its module lazily."""

from __future__ import annotations

import sys

import fire

from drasclr_ext.errors import debug_enabled, error_message, our_error


def phantom(out: str, n: int = 4, seed: int = 0, **kwargs):
    """Write ``n`` synthetic lung CT phantoms with emphysema ground truth and a datalist to ``out``."""
    from drasclr_ext.data.phantom import write_phantom_cohort

    return write_phantom_cohort(out=out, n=n, seed=seed, **kwargs)


def preprocess(
    datalist: str,
    out: str,
    atlas: str = "default",
    workers: int = 1,
    atlas_path: str = None,
    k: int = 2,
    overwrite: bool = False,
    threads: int = None,
    **kwargs,
):
    """Preprocess a cohort (datalist JSON or folder of scans) into anatomical patches under ``out``.

    Writes ``out/<subject>/`` (lung mask, patches, transform, meta.json), ``out/failures.csv`` and ``out/store``;
    finished subjects are skipped on a rerun. ``--atlas drasclr --atlas_path DIR`` uses the DrasCLR COPDGene atlas.
    ``--threads N`` (or ``$DRASCLR_THREADS``) sets the torch threads per process; by default processes x threads
    fill the usable cores.
    """
    from drasclr_ext.preprocess.cohort import preprocess_cohort

    return preprocess_cohort(
        datalist=datalist,
        out=out,
        atlas=atlas,
        workers=workers,
        atlas_path=atlas_path,
        k=k,
        overwrite=overwrite,
        threads=threads,
        **kwargs,
    )


def convert_checkpoint(src: str, dst: str):
    """Convert an official DrasCLR training checkpoint into a bundle-ready ``model.pt`` (encoder state dict)."""
    from drasclr_ext.checkpoint import convert_official_checkpoint

    return str(convert_official_checkpoint(src, dst))


def demo(out: str = "drasclr_demo", bundle: str | None = None, seed: int = 0):
    """Embed a generated phantom chest CT with the pretraining bundle (the embedded default input)."""
    from drasclr_ext.demo import run_demo

    run_demo(out=out, bundle=bundle, seed=seed)


def download(name: str, url: str, bundle_dir: str = ".", sha256: str = None, overwrite: bool = False):
    """Download a bundle zip, check it (``--sha256`` HEX or a .sha256 file; a complete zip; one top folder ``name``)
    and extract it to ``bundle_dir/name`` atomically. Run bundles only from sources you trust: configs run code."""
    from drasclr_ext.distribution.downloads import download_bundle

    sha = None if sha256 is None else str(sha256)  # fire may turn an all-digit value into a number
    return str(download_bundle(str(name), str(url), bundle_dir, sha256=sha, overwrite=overwrite))


def package(out: str, bundles: str | list | None = None, bundles_dir: str = "bundles", schema: str = None):
    """Check the bundles and write deterministic release zips with their .sha256 to ``out`` (as
    ``scripts/package_bundles.py``); ``--bundles NAME`` or ``--bundles "[A,B]"`` picks bundles."""
    from drasclr_ext.distribution.bundle_zips import format_summary, package_bundles

    names = [bundles] if isinstance(bundles, str) else bundles
    print(format_summary(package_bundles(bundles_dir, out, names=names, schema=schema)))


def release(
    out: str,
    bundles: str | list | None = None,
    bundles_dir: str = "bundles",
    schema: str = None,
    source: str = ".",
    isolation: bool = True,
):
    """Write the release folder ``out``: the wheel and sdist of drasclr-ext (``python -m build`` of ``--source``),
    the bundle zips with their .sha256 and ``SHA256SUMS``. ``--noisolation`` builds offline with the installed
    setuptools (as ``scripts/package_bundles.py --release``)."""
    from drasclr_ext.distribution.release import build_release, format_release

    names = [bundles] if isinstance(bundles, str) else bundles
    print(format_release(build_release(out, source, bundles_dir, names=names, schema=schema, isolation=isolation)))


COMMANDS = {
    "phantom": phantom,
    "preprocess": preprocess,
    "convert_checkpoint": convert_checkpoint,
    "demo": demo,
    "download": download,
    "package": package,
    "release": release,
}


def main(argv: list[str] | None = None) -> None:
    """Run a command; our errors end it with their message and exit status 1 (the traceback with DRASCLR_DEBUG=1)."""
    try:
        fire.Fire(COMMANDS, command=argv, name="drasclr")
    except Exception as exc:
        ours = our_error(exc)
        if ours is None or debug_enabled():
            raise
        print(error_message(ours), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
