"""Drop-in modules for skip-connection networks."""
from .blocks import BottleneckBlock, ResidualBlock
from .dense import DenseBlock, DenseLayer, Transition
from .highway import Highway, Highway2d
from .sync_batchnorm import SyncBatchNormAct2d, convert_sync_batchnorm
from .unet import UNet

__all__ = ["ResidualBlock", "BottleneckBlock", "DenseLayer", "DenseBlock", "Transition", "Highway", "Highway2d", "UNet",
           "SyncBatchNormAct2d", "convert_sync_batchnorm"]
