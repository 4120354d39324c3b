"""DrasCLR networks: location-conditioned convolution, encoder, MoCo training module."""

from drasclr_ext.networks.condconv import CondConv3d
from drasclr_ext.networks.drasclr import DrasCLR
from drasclr_ext.networks.encoder import DrasCLREncoder, DrasCLRFeatures

__all__ = ["CondConv3d", "DrasCLR", "DrasCLREncoder", "DrasCLRFeatures"]
