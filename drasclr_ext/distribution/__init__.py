"""Releases of the bundles and the package, and safe downloads of them.

Modules: ``bundle_checks`` (what a bundle folder passes before it ships), ``bundle_zips`` (deterministic release
zips, ``scripts/package_bundles.py`` and ``drasclr package``), ``checksums`` (``.sha256`` and ``SHA256SUMS`` files),
``release`` (the release folder: wheel, sdist, zips and sums, ``drasclr release``) and ``downloads`` (verified,
atomic downloads, ``drasclr download``).
"""
