"""Package the bundles as release zips: ``<name>_v<version>.zip`` (one top folder ``<name>/``) and its ``.sha256``.

Each bundle is checked first: required files, metadata against the MONAI schema (offline, from
``../shared/schemas`` by default), a changelog entry for the version, ``models/model.pt`` against its sha256 in
``large_files.yml``, and ``verify_net_in_out`` of ``network_def``. ``models/model.ts`` is exported into a staging
copy (the repository is only read). The zips are deterministic: rebuilding in the same environment gives the same
sha256 (see ``drasclr_ext/distribution.py``).

    python scripts/package_bundles.py --out dist [--bundles drasclr_lung_ct_ssl ...] [--schema meta_schema.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drasclr_ext.distribution import DistributionError, format_summary, package_bundles

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the zips and their .sha256 files")
    parser.add_argument("--bundles", nargs="*", default=None, help="bundle names (default: every bundle)")
    parser.add_argument("--bundles_dir", type=Path, default=REPO / "bundles", help="folder holding the bundles")
    parser.add_argument("--schema", type=Path, default=None, help="metadata schema (default: ../shared/schemas)")
    args = parser.parse_args()
    try:
        releases = package_bundles(args.bundles_dir, args.out, names=args.bundles, schema=args.schema)
    except DistributionError as exc:
        sys.exit(f"error: {exc}")
    print(format_summary(releases))


if __name__ == "__main__":
    main()
