"""DrasCLR for MONAI: anatomy-aware self-supervised representation learning for 3D lung CT."""

from drasclr_ext.errors import DrasCLRError, install_excepthook

__version__ = "0.1.0"

# an uncaught DrasCLRError (bad dataset, output folder, weights...) ends a run with its message, not a traceback
install_excepthook()

__all__ = ["DrasCLRError", "__version__"]
