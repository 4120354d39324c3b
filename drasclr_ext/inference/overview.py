"""The ``overview.png`` of a subtype map: three axial slices and a coronal one with the labels overlaid, in the
colours every view of the maps uses (:data:`LABEL_COLOURS`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from drasclr_ext.errors import InputImageError
from drasclr_ext.fileio import atomic_write
from drasclr_ext.geometry import voxel_spacing
from drasclr_ext.networks.segmentation import SUBTYPE_CLASSES

__all__ = ["LABEL_COLOURS", "render_overview"]

LABEL_COLOURS = {1: (0.55, 0.8, 0.55), 2: (0.9, 0.15, 0.15), 3: (0.15, 0.45, 0.95), 4: (0.95, 0.75, 0.1)}


def render_overview(
    hu: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    path: Union[str, Path],
    title: str = "",
    truth: Optional[np.ndarray] = None,
) -> Path:
    """PNG with three axial slices (upper, middle, lower lung) and a coronal slice, subtype labels overlaid.

    With ``truth`` (a label map on the same grid) a first row shows the truth and a second the labels, on the same
    slices, so the two can be compared at a glance.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Patch

    ornt = nib.orientations.io_orientation(affine)  # to R, A, S axis order and direction
    hu_ras = nib.orientations.apply_orientation(hu, ornt)
    rows = [("", label)] if truth is None else [("truth, ", truth), ("predicted, ", label)]
    rows = [(name, nib.orientations.apply_orientation(np.asarray(m), ornt)) for name, m in rows]
    spacing = voxel_spacing(affine)[ornt[:, 0].astype(int)]
    lung = rows[-1][1] > 0
    per_y = np.count_nonzero(lung, axis=(0, 2))  # lung voxels per coronal plane
    occupied_z = np.flatnonzero(np.any(lung, axis=(0, 1)))
    if occupied_z.size == 0:
        raise InputImageError("no lung voxels to show in the overview")
    z_lo, z_hi = occupied_z[0], occupied_z[-1]
    axial = [int(z_lo + f * (z_hi - z_lo)) for f in (0.8, 0.5, 0.2)]
    # the median y of the lung voxels (np.median of their y indices) from the counts per plane
    cumulative, n = np.cumsum(per_y), int(per_y.sum())
    coronal = int(np.searchsorted(cumulative, [(n - 1) // 2, n // 2], side="right").mean())
    colours = np.zeros((5, 4))
    for value, rgb in LABEL_COLOURS.items():
        colours[value] = (*rgb, 0.25 if value == 1 else 0.85)
    fig, axes = plt.subplots(len(rows), 4, figsize=(16, 4.6 * len(rows)), squeeze=False)
    for ax_row, (prefix, lab_ras) in zip(axes, rows):
        views = [(hu_ras[:, :, k], lab_ras[:, :, k], spacing[1] / spacing[0], f"axial z={k}") for k in axial]
        views.append((hu_ras[:, coronal, :], lab_ras[:, coronal, :], spacing[2] / spacing[0], f"coronal y={coronal}"))
        for ax, (img, lab, aspect, name) in zip(ax_row, views):
            # rows = second axis (A or S), columns = R->L as radiologists view (patient right on the left)
            ax.imshow(img.T[:, ::-1], cmap="gray", vmin=-1000, vmax=200, origin="lower", aspect=aspect)
            ax.imshow(colours[lab.T[:, ::-1].astype(int)], origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(prefix + name)
            ax.axis("off")
    handles = [Patch(color=LABEL_COLOURS[v], label=n) for v, n in zip((1, 2, 3, 4), SUBTYPE_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.suptitle(title or "emphysema subtypes (patient right on the image's left)")
    fig.tight_layout(rect=(0, 0.06 / len(rows), 1, 1 - 0.05 / len(rows)))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path
