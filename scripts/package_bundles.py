"""Package the bundles as release zips: ``<name>_v<version>.zip`` (one top folder ``<name>/``) and its ``.sha256``;
with ``--release``, the whole release folder: also the wheel and sdist of ``drasclr-ext`` and ``SHA256SUMS``.

Each bundle is checked first: required files, metadata against the MONAI schema (offline, from
``../shared/schemas`` by default), a changelog entry for the version, ``models/model.pt`` against its sha256 in
``large_files.yml``, and ``verify_net_in_out`` of ``network_def``. ``models/model.ts`` is exported into a staging
copy (the repository is only read). The zips are deterministic: rebuilding in the same environment gives the same
sha256 (see ``drasclr_ext/distribution/bundle_zips.py``).

    python scripts/package_bundles.py --out dist [--bundles drasclr_lung_ct_ssl ...] [--schema meta_schema.json]
    python scripts/package_bundles.py --release --out release [--no-isolation]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drasclr_ext.distribution.bundle_zips import format_summary, package_bundles
from drasclr_ext.distribution.release import build_release, format_release
from drasclr_ext.errors import DistributionError

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the zips and their .sha256 files")
    parser.add_argument("--bundles", nargs="*", default=None, help="bundle names (default: every bundle)")
    parser.add_argument("--bundles_dir", type=Path, default=REPO / "bundles", help="folder holding the bundles")
    parser.add_argument("--schema", type=Path, default=None, help="metadata schema (default: ../shared/schemas)")
    parser.add_argument(
        "--release", action="store_true", help="the release folder (a new or empty --out): wheel, sdist, zips, sums"
    )
    parser.add_argument("--source", type=Path, default=REPO, help="the drasclr-ext checkout the wheel is built from")
    parser.add_argument(
        "--no-isolation", action="store_true", help="build the wheel with the installed setuptools (offline)"
    )
    args = parser.parse_args()
    try:
        if args.release:
            release = build_release(
                args.out,
                args.source,
                args.bundles_dir,
                names=args.bundles,
                schema=args.schema,
                isolation=not args.no_isolation,
            )
            print(format_release(release))
        else:
            print(format_summary(package_bundles(args.bundles_dir, args.out, names=args.bundles, schema=args.schema)))
    except DistributionError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
