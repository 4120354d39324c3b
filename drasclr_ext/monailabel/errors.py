"""Errors of the MONAI Label app, all ``DrasCLRError`` kinds with a message that says what to do."""

from __future__ import annotations

from drasclr_ext.errors import DrasCLRError

INSTALL_HINT = (
    'pip install -c constraints-cpu.txt -e ".[label]" && '
    "pip install -c constraints-cpu.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1 (see docs/MONAILABEL.md)"
)


class LabelAppError(DrasCLRError):
    """Something the MONAI Label app of the emphysema bundle cannot do."""


class LabelAppSetupError(LabelAppError):
    """MONAI Label is missing or the app is configured wrongly (bundle path, app folder)."""


class LabelRequestError(LabelAppError, ValueError):
    """An infer or train request with a parameter we cannot use."""


class TrainingDataError(LabelAppError):
    """No usable final labels in the datastore to fine-tune from."""
