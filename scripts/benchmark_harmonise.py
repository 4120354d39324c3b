"""Time the noise harmonisation (``drasclr_ext.transforms.harmonise.harmonise_noise``) on a 512x512x300 CT.

Usage: python scripts/benchmark_harmonise.py [--phantom /data/test_cohort/phantom_09005] [--noise 40]

The CT is the centre 512x512x300 of a full-resolution phantom (default: phantom 9005 generated on the fly), once as
it is (quiet: left unchanged) and once with white noise of ``--noise`` HU added (smoothed to the target).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from drasclr_ext.transforms.harmonise import harmonise_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", default=None, help="prefix of a written phantom (<prefix>_image.nii.gz, _lung)")
    parser.add_argument("--noise", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.phantom:
        import nibabel as nib

        img = nib.load(f"{args.phantom}_image.nii.gz")
        hu, affine = np.asarray(img.dataobj, np.float32), img.affine
        lung = np.asarray(nib.load(f"{args.phantom}_lung.nii.gz").dataobj)
    else:
        from drasclr_ext.data.phantom import generate_phantom

        phantom = generate_phantom(9005, resolution_scale=1.0)
        hu, lung, affine = phantom["image"], phantom["lung_mask"], phantom["affine"]
    start = [(s - t) // 2 for s, t in zip(hu.shape, (512, 512, 300))]
    box = tuple(slice(a, a + t) for a, t in zip(start, (512, 512, 300)))
    hu, lung = np.ascontiguousarray(hu[box]), np.ascontiguousarray(lung[box])
    noisy = hu + np.random.default_rng(0).normal(0, args.noise, hu.shape).astype(np.float32)
    print("| scan | median s | runs | noise before -> after (HU) | sigma mm |")
    print("|---|---|---|---|---|")
    for name, x in (("as generated", hu), (f"+{args.noise:g} HU white noise", noisy)):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            _, info = harmonise_noise(x, lung, affine)
            times.append(time.perf_counter() - t)
        runs = ", ".join(f"{v:.2f}" for v in times)
        noise = f"{info['noise_hu']:.1f} -> {info['noise_hu_after']:.1f}"
        print(f"| {name} | {np.median(times):.2f} | {runs} | {noise} | {info['sigma_mm']} |")


if __name__ == "__main__":
    main()
