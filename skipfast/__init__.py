"""skipfast: fused kernels and drop-in modules for skip-connection networks."""
from . import _backend, diagnostics, ops
from . import models, nn
from .nn import BottleneckBlock, DenseBlock, DenseLayer, Highway, Highway2d, ResidualBlock, Transition, UNet

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "diagnostics", "ResidualBlock", "BottleneckBlock", "DenseLayer", "DenseBlock",
           "Transition", "UNet", "Highway", "Highway2d"]
