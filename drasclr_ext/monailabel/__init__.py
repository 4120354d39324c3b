"""MONAI Label app for the dense emphysema subtype bundle (docs/MONAILABEL.md).

- :mod:`~drasclr_ext.monailabel.application`: ``MyApp``, the app (one model: infer and train).
- :mod:`~drasclr_ext.monailabel.infer` / :mod:`~drasclr_ext.monailabel.train`: the tasks, on the bundle's own
  configs (:mod:`~drasclr_ext.monailabel.bundle`).
- :mod:`~drasclr_ext.monailabel.compat`: the work-arounds for monailabel 0.8.5 with monai 1.6, pydicom 3 and a
  CPU-only torch; :mod:`~drasclr_ext.monailabel.server`: MONAI Label's ASGI app with them applied.
- ``python -m drasclr_ext.monailabel``: write the app folder, start the server, write Slicer's colour table.

Importing this package does not import monailabel (the optional ``label`` extra).
"""

from drasclr_ext.monailabel.errors import LabelAppError, LabelAppSetupError, LabelRequestError, TrainingDataError

__all__ = ["LabelAppError", "LabelAppSetupError", "LabelRequestError", "TrainingDataError"]
