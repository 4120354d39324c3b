"""3D Slicer colour table of the subtype labels: the colours of the bundle's ``overview.png``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from drasclr_ext.inference.overview import LABEL_COLOURS
from drasclr_ext.networks.segmentation import SUBTYPE_CLASSES

__all__ = ["slicer_colour_table", "write_slicer_colour_table"]


def slicer_colour_table() -> str:
    """Slicer colour table text (``value name R G B A``, 0-255) for ``subtype_label.nii.gz``."""
    lines = ["# DrasCLR emphysema subtypes: labels of subtype_label.nii.gz", "0 background 0 0 0 0"]
    for value, name in enumerate(SUBTYPE_CLASSES, start=1):
        r, g, b = (int(round(255 * c)) for c in LABEL_COLOURS[value])
        lines.append(f"{value} {name} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def write_slicer_colour_table(path: Union[str, os.PathLike] = "subtype_colors.ctbl") -> Path:
    """Write :func:`slicer_colour_table` to ``path`` (load it in Slicer with Add Data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(slicer_colour_table())
    return path
