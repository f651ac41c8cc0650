"""Functional ops. Each family's module holds its wrapper, fake kernel, autograd and
eager reference (``<op>_reference``)."""
from .add_relu import add_relu, add_relu_reference
from .bn_act import batch_norm_act, batch_norm_act_reference
from .conv import conv2d_bias_act, conv2d_bias_act_reference
from .dense import bn_relu_conv1x1, bn_relu_conv1x1_reference, dense_block, dense_block_reference
from .highway import highway, highway_reference
from .unet import concat_conv2d, concat_conv2d_reference

__all__ = ["add_relu", "add_relu_reference", "batch_norm_act", "batch_norm_act_reference", "conv2d_bias_act",
           "conv2d_bias_act_reference", "bn_relu_conv1x1", "bn_relu_conv1x1_reference", "dense_block",
           "dense_block_reference", "highway", "highway_reference", "concat_conv2d", "concat_conv2d_reference"]
