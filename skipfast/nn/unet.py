"""U-Net: encoder of double convs; decoder that upsamples and convolves over the
upsampled tensor and the skip together without concatenating them
(``skipfast.ops.concat_conv2d``)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..fold import reads_directly
from . import _checks


class DoubleConv(nn.Sequential):
    """(Conv3x3 -> BN -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x transposed-conv upsampling, then DoubleConv over ``cat([up(x), skip])``.

    The first convolution reads both sources in place (its weight stays one tensor over
    both, as in the eager module, so state_dicts are unchanged): no concatenated copy is
    made, nor kept for backward."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        first, up = self.conv[0], self.up(x)
        if reads_directly(first):
            out = ops.concat_conv2d(up, skip, first.weight, first.bias, padding=first.padding[0])
        else:  # hooks or a parametrization (pruned, say): its own forward computes its weight
            out = first(torch.cat([up, skip], 1))
        for layer in itertools.islice(self.conv, 1, None):
            out = layer(out)
        return out


class UNet(nn.Module):
    """The tutorial's U-Net. Any input height and width: the input is zero-padded to a
    multiple of ``2**depth`` and the output cropped back, so output H, W equal input H, W.
    Returns logits with ``out_channels`` channels."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_channels: int = 64, depth: int = 4):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_channels", base_channels), ("depth", depth)):
            _checks.positive_int("UNet", name, v)
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.feature_map(self, x, self.in_channels)
        h, w = x.shape[-2:]
        m = 2**self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        out = skips.pop()
        for up in self.up:
            out = up(out, skips.pop())
        return self.outc(out)[..., :h, :w]
