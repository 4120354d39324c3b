"""Figure of a CT with the outlines of its classical lung mask (right lung red, left lung blue, airways yellow).

Usage: python scripts/plot_lung_mask.py CT_PATH OUT_PNG [--slices 6] [--credit "data source"]

The figure docs/images/lung_mask_real_ct.png was made with
    python scripts/plot_lung_mask.py ../shared/data/lung_ct/Lung_Dx-A0001 docs/images/lung_mask_real_ct.png \
        --credit "Data: TCIA Lung-PET-CT-Dx, case A0001 (CC BY 4.0)."
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from drasclr_ext.geometry import voxel_spacing  # noqa: E402
from drasclr_ext.transforms.io import load_ct  # noqa: E402
from drasclr_ext.transforms.lung_mask import compute_lung_mask, lung_volumes_ml  # noqa: E402


def _show(ax, image: np.ndarray, labels: np.ndarray, airway: np.ndarray, aspect: float, title: str) -> None:
    ax.imshow(image.T, cmap="gray", vmin=-1000, vmax=300, aspect=aspect, origin="lower" if aspect != 1 else None)
    for mask, colour in ((labels == 1, "red"), (labels == 2, "deepskyblue"), (airway, "yellow")):
        if mask.any():
            ax.contour(mask.T.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_lung_mask(ct: str, out: str, slices: int = 6, credit: str = "") -> str:
    """Compute the lung mask of ``ct`` and save axial slices and a coronal slice with the mask outlines."""
    image = load_ct(ct)
    hu, affine = image.numpy(), image.affine.numpy()
    labels, airway = compute_lung_mask(hu, affine, return_airways=True)
    vol = lung_volumes_ml(labels, affine)
    spacing = voxel_spacing(affine)
    z_lung = np.flatnonzero(labels.any(axis=(0, 1)))
    zs = np.linspace(z_lung.min(), z_lung.max(), slices + 2)[1:-1].astype(int)
    fig, axes = plt.subplots(1, slices + 1, figsize=(3 * (slices + 1), 3.6))
    for ax, z in zip(axes[:-1], zs):
        _show(ax, hu[:, :, z], labels[:, :, z], airway[:, :, z], 1.0, f"axial z={z}")
    y = int(np.argmax(airway.sum(axis=(0, 2)))) if airway.any() else int(np.argmax(labels.sum(axis=(0, 2))))
    _show(axes[-1], hu[:, y, :], labels[:, y, :], airway[:, y, :], spacing[2] / spacing[0], f"coronal y={y}")
    fig.suptitle(
        f"{image.meta['subject']}: right (red) {vol['right']:.0f} ml, left (blue) {vol['left']:.0f} ml, "
        f"trachea/main bronchi removed (yellow). Image left = patient right. {credit}",
        fontsize=10,
    )
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=Path(out).parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    fire.Fire(plot_lung_mask)
