"""The one exception type of drasclr_ext, its specific kinds, and how a run reports them (one line, no traceback)."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any, Callable, Optional

DEBUG_ENV = "DRASCLR_DEBUG"


class DrasCLRError(Exception):
    """An error with a message that says what is wrong and what to do about it."""


class InputImageError(DrasCLRError, ValueError):
    """A scan that cannot be used: unreadable, not a CT, or without lungs."""


class RegistrationError(DrasCLRError):
    """Atlas registration failed or diverged."""


class CheckpointError(DrasCLRError, ValueError):
    """A file that is not a checkpoint of the expected format."""


class DistributionError(DrasCLRError):
    """A bundle that cannot be released, or a downloaded bundle zip that must not be used."""


def our_error(exc: Optional[BaseException]) -> Optional[DrasCLRError]:
    """Our ``DrasCLRError`` behind ``exc``: MONAI's ``Compose`` and config parser wrap errors in a ``RuntimeError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DrasCLRError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def debug_enabled() -> bool:
    """True when ``DRASCLR_DEBUG`` is set (to anything but 0/false/no/empty): show full tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_message(exc: DrasCLRError) -> str:
    """The text a user sees for one of our errors: its message and how to get the traceback."""
    return f"drasclr: error: {exc}\n(set {DEBUG_ENV}=1 to see the full traceback)"


def _make_excepthook(previous: Callable[..., Any]) -> Callable[..., Any]:
    def hook(kind: type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
        ours = our_error(value)
        if ours is None or debug_enabled():
            previous(kind, value, tb)
            return
        print(error_message(ours), file=sys.stderr)

    hook.drasclr = True  # type: ignore[attr-defined]
    return hook


def install_excepthook() -> None:
    """Report an uncaught ``DrasCLRError`` (also when wrapped, e.g. by ``python -m monai.bundle run``) as one message
    without traceback; other exceptions, and everything with ``DRASCLR_DEBUG=1``, go to the previous hook."""
    if not getattr(sys.excepthook, "drasclr", False):
        sys.excepthook = _make_excepthook(sys.excepthook)
