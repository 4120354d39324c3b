"""``python -m drasclr_ext.monailabel``: write the app folder, start MONAI Label with it, write Slicer's colours.

::

    python -m drasclr_ext.monailabel app --out APP_DIR
    python -m drasclr_ext.monailabel start_server --app APP_DIR --studies STUDIES [--bundle BUNDLE] \\
        [--host 127.0.0.1 --port 8000 ... any other ``monailabel start_server`` option]
    python -m drasclr_ext.monailabel slicer_colors --out subtype_colors.ctbl

``start_server`` is ``monailabel start_server --app APP_DIR --studies STUDIES --conf bundle_path BUNDLE
--uvicorn_app drasclr_ext.monailabel.server:app`` in this Python, after writing ``APP_DIR/main.py`` if it is
missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from drasclr_ext.monailabel.errors import LabelAppSetupError

__all__ = ["APP_MAIN_PY", "UVICORN_APP", "main", "server_argv", "write_app"]

UVICORN_APP = "drasclr_ext.monailabel.server:app"
APP_MAIN_PY = '''"""MONAI Label app of the DrasCLR emphysema bundle: see docs/MONAILABEL.md of drasclr-ext."""

from drasclr_ext.monailabel.application import MyApp  # noqa: F401
'''


def write_app(out: Union[str, os.PathLike]) -> Path:
    """Write a MONAI Label app folder (its ``main.py``) to ``out``; MONAI Label adds model/, logs/, lib/, bin/."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(APP_MAIN_PY)
    return folder


def server_argv(app: str, studies: str, bundle: Optional[str], rest: Sequence[str] = ()) -> list[str]:
    """``monailabel start_server`` arguments for our app (bundle default: the source checkout's bundle)."""
    from drasclr_ext.monailabel.bundle import BUNDLE_NAME, SubtypeBundle, default_bundle_path

    bundle_path = bundle or default_bundle_path()
    if bundle_path is None:
        raise LabelAppSetupError(f"give --bundle <folder of {BUNDLE_NAME}>: no source checkout bundle to default to")
    root = SubtypeBundle(bundle_path).root
    argv = ["monailabel", "start_server", "--app", str(app), "--studies", str(studies)]
    argv += ["--conf", "bundle_path", str(root)]
    if "--uvicorn_app" not in rest:
        argv += ["--uvicorn_app", UVICORN_APP]
    return argv + list(rest)


def start_server(app: str, studies: str, bundle: Optional[str], rest: Sequence[str]) -> None:
    """Write ``app/main.py`` when missing and run MONAI Label's ``start_server`` in this process."""
    from drasclr_ext.monailabel.compat import apply_compat

    apply_compat()
    argv = server_argv(app, studies, bundle, rest)
    if not (Path(app) / "main.py").is_file():
        write_app(app)
    from monailabel.main import Main

    sys.argv = argv
    Main().run()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser("python -m drasclr_ext.monailabel", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    app = commands.add_parser("app", help="write a MONAI Label app folder for the emphysema bundle")
    app.add_argument("--out", required=True, help="app folder to write (main.py)")
    server = commands.add_parser("start_server", help="start MONAI Label with the emphysema app")
    server.add_argument("--app", required=True, help="app folder (written when it has no main.py)")
    server.add_argument("--studies", required=True, help="studies folder (images; labels in labels/final/)")
    server.add_argument("--bundle", default=None, help="bundle folder (default: the checkout's bundle)")
    colours = commands.add_parser("slicer_colors", help="write the 3D Slicer colour table of the subtype labels")
    colours.add_argument("--out", default="subtype_colors.ctbl")
    args, rest = parser.parse_known_args(argv)
    if args.command == "start_server":
        start_server(args.app, args.studies, args.bundle, rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "app":
        print(write_app(args.out))
    else:
        from drasclr_ext.monailabel.slicer import write_slicer_colour_table

        print(write_slicer_colour_table(args.out))
