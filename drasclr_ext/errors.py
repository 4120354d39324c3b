"""The one exception type of drasclr_ext, and its specific kinds."""

from __future__ import annotations


class DrasCLRError(Exception):
    """An error with a message that says what is wrong and what to do about it."""


class InputImageError(DrasCLRError, ValueError):
    """A scan that cannot be used: unreadable, not a CT, or without lungs."""


class RegistrationError(DrasCLRError):
    """Atlas registration failed or diverged."""


class CheckpointError(DrasCLRError, ValueError):
    """A file that is not a checkpoint of the expected format."""
