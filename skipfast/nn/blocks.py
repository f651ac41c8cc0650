"""Residual blocks with torchvision's state_dict layout (BasicBlock / Bottleneck)."""
from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .batchnorm import BatchNormAct2d


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The 1x1 conv + BN shortcut torchvision uses when the shape changes (``downsample``)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), BatchNormAct2d(cout, activation=None))


class ResidualBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, torchvision's ``BasicBlock``.

    ``ResidualBlock(64)`` keeps 64 channels and the spatial size; a projection
    shortcut (``downsample``: 1x1 conv with stride + BN) is added whenever
    ``stride != 1`` or the channel count changes.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        _checks.positive_int("ResidualBlock", "in_channels", in_channels)
        _checks.positive_int("ResidualBlock", "out_channels", out_channels)
        _checks.positive_int("ResidualBlock", "stride", stride)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = BatchNormAct2d(out_channels)  # bn + relu
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = BatchNormAct2d(out_channels)  # bn + identity + relu
        self.downsample = projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.feature_map(self, x, self.in_channels)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1.then_conv(self.conv1(x), self.conv2)  # conv2(relu(bn1(conv1(x))))
        return self.bn2(out, identity)


class BottleneckBlock(nn.Module):
    """1x1 reduce -> 3x3 (stride here, ResNet v1.5) -> 1x1 expand (x4) + shortcut, ReLU.

    torchvision's ``Bottleneck`` state_dict: conv1..3, bn1..3, downsample.0/1.
    """

    expansion = 4

    def __init__(self, in_channels: int, bottleneck_channels: int, stride: int = 1):
        super().__init__()
        _checks.positive_int("BottleneckBlock", "in_channels", in_channels)
        _checks.positive_int("BottleneckBlock", "bottleneck_channels", bottleneck_channels)
        _checks.positive_int("BottleneckBlock", "stride", stride)
        out_channels = bottleneck_channels * self.expansion
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = conv1x1(in_channels, bottleneck_channels)
        self.bn1 = BatchNormAct2d(bottleneck_channels)
        self.conv2 = conv3x3(bottleneck_channels, bottleneck_channels, stride)
        self.bn2 = BatchNormAct2d(bottleneck_channels)
        self.conv3 = conv1x1(bottleneck_channels, out_channels)
        self.bn3 = BatchNormAct2d(out_channels)  # bn + identity + relu
        self.downsample = projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.feature_map(self, x, self.in_channels)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1.then_conv(self.conv1(x), self.conv2)
        out = self.bn2.then_conv(out, self.conv3)
        return self.bn3(out, identity)
