"""Render the phantom check figures into docs/images/ and print HU statistics over several seeds.

Usage: python scripts/render_phantom_figures.py [--seeds 8] [--real ../shared/data/lung_ct/Lung_Dx-A0001]
The real CT is TCIA Lung-PET-CT-Dx (Li et al. 2020, CC BY 4.0), case A0001.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from drasclr_ext.data.phantom import generate_phantom  # noqa: E402

WINDOW = (-1350, 150)  # lung window (level -600, width 1500)
OVERLAY = ListedColormap([(0, 0, 0, 0), (0, 0, 0, 0), (1, 0.2, 0.2, 0.55), (0.2, 0.6, 1, 0.65), (1, 0.85, 0.1, 0.5)])


def _slices(out, z_rel=0.7):
    im, lab, sp = out["image"], out["label"], np.abs(np.diag(out["affine"])[:3])
    zs = np.flatnonzero((lab > 0).any((0, 1)))
    z = zs[int(len(zs) * z_rel)]
    ys = np.flatnonzero((lab > 0).any((0, 2)))
    y = ys[int(len(ys) * 0.5)]
    # axial: rows = y (anterior on top), columns = x (patient right on the left: radiological view)
    axial = (im[:, :, z].T, lab[:, :, z].T, sp[1] / sp[0])
    coronal = (im[:, y, ::-1].T, lab[:, y, ::-1].T, sp[2] / sp[0])
    return axial, coronal


def healthy_vs_severe(healthy, severe, path: Path) -> None:
    fig, ax = plt.subplots(2, 4, figsize=(12, 6.4))
    for r, (name, out) in enumerate((("healthy", healthy), ("severe", severe))):
        for c, (img, lab, aspect) in enumerate(_slices(out)):
            ax[r, 2 * c].imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect)
            ax[r, 2 * c + 1].imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect)
            ax[r, 2 * c + 1].imshow(lab, cmap=OVERLAY, vmin=0, vmax=4, aspect=aspect, interpolation="nearest")
        i = out["info"]
        ax[r, 0].set_title(f"{name}: LAA-950 {i['laa950_percent']:.1f} %, Perc15 {i['perc15_hu']:.0f} HU", fontsize=9)
        ax[r, 1].set_title("labels: CLE red, PSE blue, PLE yellow", fontsize=9)
    for a in ax.ravel():
        a.axis("off")
    plt.tight_layout()
    plt.savefig(path, dpi=55)
    plt.close(fig)


def phantom_vs_real(out, real_dir: Path, path: Path) -> None:
    import itk

    real = itk.imread(str(real_dir))
    arr = itk.array_view_from_image(real)  # (Z, Y, X), LPS
    sp = tuple(real.GetSpacing())
    z = int(arr.shape[0] * 0.45)
    fig, ax = plt.subplots(1, 2, figsize=(10, 5))
    (img, _, aspect), _ = _slices(out, 0.6)
    ax[0].imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect)
    ax[0].set_title(f"phantom (seed {out['info']['subject']['seed']}, healthy)", fontsize=9)
    ax[1].imshow(arr[z], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=sp[1] / sp[0])
    ax[1].set_title("real CT: TCIA Lung-PET-CT-Dx A0001 (CC BY 4.0)", fontsize=9)
    for a in ax:
        a.axis("off")
    plt.tight_layout()
    plt.savefig(path, dpi=55)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--real", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/lung_ct/Lung_Dx-A0001")
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/images"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"healthy": [], "severe": []}
    medians = []
    for seed in range(args.seeds):
        for sev in stats:
            out = generate_phantom(seed, severity=sev)
            stats[sev].append(out["info"]["laa950_percent"])
            if sev == "healthy":
                medians.append(float(np.median(out["image"][out["label"] == 1])))
            if seed == 0:
                if sev == "healthy":
                    first_healthy = out
                else:
                    healthy_vs_severe(first_healthy, out, out_dir / "phantom_healthy_vs_severe.png")
                    phantom_vs_real(first_healthy, Path(args.real), out_dir / "phantom_vs_real_ct.png")
    for sev, values in stats.items():
        print(
            f"{sev}: LAA-950 % over {len(values)} seeds: median {np.median(values):.2f}, "
            f"range {min(values):.2f}-{max(values):.2f}"
        )
    print(
        f"healthy normal-lung median HU: median {np.median(medians):.1f}, "
        f"range {min(medians):.1f} to {max(medians):.1f}"
    )


if __name__ == "__main__":
    main()
