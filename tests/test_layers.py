"""The package's layers (README, "Where things live"): a module imports only modules of its own layer or below, so
every arrow of the import graph points down and no two parts of the package import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import drasclr_ext

LAYERS = [
    ["errors", "fileio", "geometry"],
    ["subjects", "bundle_files", "atlas", "parallel"],
    ["networks"],
    ["transforms"],
    ["metrics", "quality"],
    ["data"],
    ["inference"],
    ["engines", "handlers", "checkpoint"],
    ["preprocess", "cli", "demo", "distribution", "monailabel"],
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
PACKAGE = Path(drasclr_ext.__file__).parent


def _imports(path: Path) -> list[str]:
    """The ``drasclr_ext.<part>`` names that a file imports (at the top or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [n.split(".")[1] for n in names if n.startswith("drasclr_ext.")]
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    parts -= {"__init__", "__pycache__", "assets"}
    assert parts == set(LEVEL), f"give these a layer in tests/test_layers.py and README.md: {parts ^ set(LEVEL)}"


def test_imports_point_down():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        upward += [f"{path.relative_to(PACKAGE)} imports {dst}" for dst in _imports(path) if LEVEL[dst] > LEVEL[part]]
    assert not upward, upward
