"""Functional ops. Each family's module holds its wrapper, fake kernel, autograd and
eager reference (``<op>_reference``)."""
from .add_relu import add_relu, add_relu_reference
from .highway import highway, highway_reference
from .unet import concat_conv2d, concat_conv2d_reference

__all__ = ["add_relu", "add_relu_reference", "highway", "highway_reference", "concat_conv2d",
           "concat_conv2d_reference"]
