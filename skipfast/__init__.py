"""skipfast: fused kernels and drop-in modules for skip-connection networks."""
from . import _backend, diagnostics, ops
from . import models, nn
from .fold import fold_bn
from .patch import patch
from .nn import BatchNormAct2d, BottleneckBlock, DenseBlock, DenseLayer, Highway, Highway2d, ResidualBlock, Transition, UNet
from .nn import SyncBatchNormAct2d, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "diagnostics", "patch", "fold_bn", "BatchNormAct2d", "ResidualBlock", "BottleneckBlock",
           "DenseLayer", "DenseBlock", "Transition", "UNet", "Highway", "Highway2d", "SyncBatchNormAct2d",
           "convert_sync_batchnorm"]
