"""MONAI Label's ASGI app with our compatibility fixes applied first.

``monailabel start_server ... --uvicorn_app drasclr_ext.monailabel.server:app`` (our launcher passes it): plain
``monailabel.app:app`` cannot be imported with pydicom 3 (see :mod:`drasclr_ext.monailabel.compat`).
"""

from __future__ import annotations

from drasclr_ext.monailabel.compat import apply_compat

apply_compat()

from monailabel.app import app  # noqa: E402

__all__ = ["app"]
