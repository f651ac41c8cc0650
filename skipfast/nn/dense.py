"""DenseNet layers and blocks with torchvision's state_dict layout
(``denselayer1.norm1``, ``transition1.conv``, ...)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..fold import reads_directly
from ..ops import dense as _dense
from . import _checks


class DenseLayer(nn.Module):
    """One dense layer: ``bn_size=None`` is BN-ReLU-Conv3x3 (the tutorial's layer);
    ``bn_size=b`` is DenseNet-BC: BN-ReLU-Conv1x1(b*k)-BN-ReLU-Conv3x3(k), as torchvision.
    Returns only the ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None = None, drop_rate: float = 0.0):
        super().__init__()
        _checks.positive_int("DenseLayer", "in_channels", in_channels)
        _checks.positive_int("DenseLayer", "growth_rate", growth_rate)
        if bn_size is not None:
            _checks.positive_int("DenseLayer", "bn_size", bn_size)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"DenseLayer: drop_rate must be in [0, 1), got {drop_rate!r}")
        self.in_channels, self.growth_rate, self.bn_size, self.drop_rate = in_channels, growth_rate, bn_size, float(drop_rate)
        self.norm1 = nn.BatchNorm2d(in_channels)
        if bn_size is None:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.feature_map(self, x, self.in_channels)
        out = self.conv1(torch.relu(self.norm1(x)))
        if self.bn_size is not None:
            out = self.conv2(torch.relu(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; layer ``l`` reads every earlier feature map.
    Output: ``in_channels + num_layers * growth_rate`` channels, channels_last.

    No ``torch.cat``: the block allocates one buffer, each layer writes its new channels
    into its own slice and the next layer's BN -> ReLU -> conv reads the buffer's channel
    prefix in place (``skipfast.ops.dense``). ``forward(x, out=buffer)`` writes into a
    preallocated channels_last buffer with at least ``out_channels`` channels."""

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int, bn_size: int | None = None, drop_rate: float = 0.0):
        super().__init__()
        _checks.positive_int("DenseBlock", "in_channels", in_channels)
        _checks.positive_int("DenseBlock", "growth_rate", growth_rate)
        _checks.positive_int("DenseBlock", "num_layers", num_layers)
        self.in_channels, self.growth_rate, self.num_layers = in_channels, growth_rate, num_layers
        self.out_channels = in_channels + num_layers * growth_rate
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    @classmethod
    def shared_from(cls, block: nn.Module) -> "DenseBlock":
        """The skipfast block over a torchvision ``_DenseBlock``'s own layers' tensors
        (same parameters and buffers, no copies)."""
        layers = list(block.children())
        first = layers[0]
        growth = first.conv2.out_channels
        new = cls(first.norm1.num_features, growth, len(layers), bn_size=first.conv1.out_channels // growth,
                  drop_rate=float(first.drop_rate))
        for mine, theirs in zip(new.layers(), layers):
            for name in ("norm1", "conv1", "norm2", "conv2"):
                setattr(mine, name, getattr(theirs, name))
        new.train(block.training)
        return new

    def _plain_modules(self) -> bool:
        """The fused block computes nn.BatchNorm2d's statistics itself and reads the layers'
        tensors directly; any other norm (a SyncBatchNormAct2d after convert_sync_batchnorm,
        say), or a module with hooks or a parametrization (pruned, say), runs through its
        own module."""
        return all((type(m) is nn.BatchNorm2d or not isinstance(m, nn.modules.batchnorm._BatchNorm))
                   and reads_directly(m) for layer in self.layers() for m in layer.modules())

    def layers(self):
        return [getattr(self, f"denselayer{i + 1}") for i in range(self.num_layers)]

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        _checks.feature_map(self, x, self.in_channels)
        if (_backend.select("dense", x.device) == "reference" or torch.is_autocast_enabled(x.device.type)
                or not self._plain_modules()):
            if out is not None:
                _dense.check_block_args(self.layers(), self.growth_rate, x, out)  # before any state changes
            y = _dense.dense_block_reference(self.layers(), x)
            return y if out is None else out.narrow(1, 0, y.shape[1]).copy_(y)
        return _dense.dense_block(self.layers(), self.growth_rate, x, out=out)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 between dense blocks (torchvision's ``_Transition``)."""

    def __init__(self, in_channels: int, out_channels: int):
        _checks.positive_int("Transition", "in_channels", in_channels)
        _checks.positive_int("Transition", "out_channels", out_channels)
        super().__init__()
        self.in_channels = in_channels
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.feature_map(self, x, self.in_channels)
        return super().forward(x)
