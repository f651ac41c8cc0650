"""Drop-in modules for skip-connection networks."""
from .batchnorm import BatchNormAct2d
from .blocks import BottleneckBlock, ResidualBlock
from .dense import DenseBlock, DenseLayer, Transition
from .highway import Highway, Highway2d
from .sync_batchnorm import SyncBatchNormAct2d, convert_sync_batchnorm
from .unet import UNet

__all__ = ["BatchNormAct2d", "ResidualBlock", "BottleneckBlock", "DenseLayer", "DenseBlock", "Transition", "Highway",
           "Highway2d", "UNet", "SyncBatchNormAct2d", "convert_sync_batchnorm"]
