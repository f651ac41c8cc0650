"""Residual blocks with torchvision's state_dict layout (BasicBlock / Bottleneck)."""
from __future__ import annotations

import torch
from torch import nn

from ..fold import FoldSet, can_fold, reads_directly
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


class _Block(nn.Module):
    """What both residual blocks share: eval-mode BN folding and building from torchvision."""

    # (conv, bn, activation) names in forward order; the last pair takes the shortcut.
    _pairs: tuple[tuple[str, str], ...] = ()

    def __init__(self):
        super().__init__()
        self._folds = FoldSet()

    def _shortcut(self, x: torch.Tensor, fold: bool) -> torch.Tensor:
        if self.downsample is None:
            return x
        if fold:
            return self._folds("downsample", self.downsample[0], self.downsample[1], x, None, None)
        return self.downsample(x)

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode without grad: every BN folded into its conv, bias + residual + ReLU
        in the convolution's epilogue."""
        identity = self._shortcut(x, True)
        out = x
        for i, (conv, bn) in enumerate(self._pairs):
            last = i == len(self._pairs) - 1
            out = self._folds(conv, getattr(self, conv), getattr(self, bn), out, identity if last else None, "relu")
        return out

    def _use_fold(self, x: torch.Tensor) -> bool:
        if not can_fold(self.conv1, self.bn1, x):
            return False
        mods = [getattr(self, name) for pair in self._pairs for name in pair]
        if self.downsample is not None:
            mods += [self.downsample, *self.downsample]
        return all(reads_directly(m) for m in mods)  # e.g. none pruned

    @classmethod
    def shared_from(cls, block: nn.Module) -> "_Block":
        """The skipfast block holding the parameters and buffers of a torchvision
        ``BasicBlock`` / ``Bottleneck`` (same tensors, no copies)."""
        new = cls.__new__(cls)
        _Block.__init__(new)
        convs = [name for name, _ in cls._pairs]
        new.in_channels = getattr(block, convs[0]).in_channels
        new.out_channels = getattr(block, convs[-1]).out_channels
        new.stride = block.stride
        for i, (conv, bn) in enumerate(cls._pairs):
            setattr(new, conv, getattr(block, conv))
            setattr(new, bn, BatchNormAct2d.shared_from(getattr(block, bn), "relu"))
        ds = block.downsample
        new.downsample = None if ds is None else nn.Sequential(ds[0], BatchNormAct2d.shared_from(ds[1], None))
        new.train(block.training)
        return new


class ResidualBlock(_Block):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, torchvision's ``BasicBlock``.

    ``ResidualBlock(64)`` keeps 64 channels and the spatial size; a projection
    shortcut (``downsample``: 1x1 conv with stride + BN) is added whenever
    ``stride != 1`` or the channel count changes.
    """

    expansion = 1
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))

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
        if self._use_fold(x):
            return self._forward_folded(x)
        identity = self._shortcut(x, False)
        out = self.bn1.then_conv(self.conv1(x), self.conv2)  # conv2(relu(bn1(conv1(x))))
        return self.bn2(out, identity)


class BottleneckBlock(_Block):
    """1x1 reduce -> 3x3 (stride here, ResNet v1.5) -> 1x1 expand (x4) + shortcut, ReLU.

    torchvision's ``Bottleneck`` state_dict: conv1..3, bn1..3, downsample.0/1.
    """

    expansion = 4
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

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
        if self._use_fold(x):
            return self._forward_folded(x)
        identity = self._shortcut(x, False)
        out = self.bn1.then_conv(self.conv1(x), self.conv2)
        out = self.bn2.then_conv(out, self.conv3)
        return self.bn3(out, identity)
