"""DrasCLR for MONAI: anatomy-aware self-supervised representation learning for 3D lung CT."""

from drasclr_ext.errors import DrasCLRError

__version__ = "0.1.0"

__all__ = ["DrasCLRError", "__version__"]
