"""Time generate_phantom at given shapes; prints median wall time and peak RSS.

Usage: python scripts/benchmark_phantom.py --shape 256 256 256 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from drasclr_ext.data.phantom import generate_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 256))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--severity", default="severe")
    parser.add_argument("--subtypes", default="centrilobular+paraseptal")
    args = parser.parse_args()
    times = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        out = generate_phantom(seed, shape=args.shape, severity=args.severity, subtypes=args.subtypes)
        times.append(time.perf_counter() - start)
        print(f"seed {seed}: {times[-1]:.1f} s, spacing {out['info']['subject']['spacing']}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"shape {tuple(args.shape)}: median {statistics.median(times):.1f} s over {len(times)}, "
        f"peak RSS {peak_gb:.2f} GB"
    )


if __name__ == "__main__":
    main()
