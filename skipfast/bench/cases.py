"""The standard benchmark set: each case pairs the eager PyTorch module a user runs
today (torchvision's, or plain torch modules with the same state_dict) with the
skipfast module that replaces it."""
from __future__ import annotations

import dataclasses
import inspect

import torch
import torchvision
from torch import nn

import skipfast

from .core import Case

# Input sizes. "quick" fits the README's main job in under a minute on a 2-core CPU;
# "cpu" and "cuda" are the full runs (ResNet shapes from the issues).
SIZES = {
    "quick": dict(tail=(8, 64, 28, 28), res=(4, 64, 28, 28), bottleneck=(4, 256, 14, 14), dense=(4, 64, 14, 14),
                  img=(2, 3, 64, 64), unet=(1, 3, 64, 64), unet_c=16),
    "cpu": dict(tail=(16, 64, 56, 56), res=(8, 64, 56, 56), bottleneck=(8, 256, 28, 28), dense=(8, 64, 28, 28),
                img=(8, 3, 224, 224), unet=(2, 3, 128, 128), unet_c=32),
    "cuda": dict(tail=(32, 64, 56, 56), res=(32, 64, 56, 56), bottleneck=(32, 256, 56, 56), dense=(32, 64, 56, 56),
                 img=(64, 3, 224, 224), unet=(8, 3, 256, 256), unet_c=64),
}


# ------------------------------------------------------------------ reference modules


class AddReLURef(nn.Module):
    def forward(self, x, residual):
        return torch.relu(x + residual)


class AddReLUSkipfast(nn.Module):
    def forward(self, x, residual):
        return skipfast.ops.add_relu(x, residual)


class BNAddReLURef(nn.Module):
    """The eager residual tail: ``relu(BatchNorm2d(x) + residual)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x, residual):
        return torch.relu(self.bn(x) + residual)


def _bn_act_cls():
    return getattr(skipfast.nn, "BatchNormAct2d", None)


class BNAddReLUSkipfast(nn.Module):
    """skipfast's residual tail: ``skipfast.nn.BatchNormAct2d`` (fused BN + add + ReLU)
    when this skipfast has it, else ``nn.BatchNorm2d`` followed by ``skipfast.ops.add_relu``."""

    def __init__(self, channels: int):
        super().__init__()
        cls = _bn_act_cls()
        self.fused = cls is not None
        self._call_kw = {}
        if cls is None:
            self.bn = nn.BatchNorm2d(channels)
            return
        init_params = inspect.signature(cls.__init__).parameters
        fwd_params = inspect.signature(cls.forward).parameters
        kw = {"activation": "relu"} if "activation" in init_params else {}
        if "activation" in fwd_params:
            self._call_kw = {"activation": "relu"}
        self.bn = cls(channels, **kw)

    def forward(self, x, residual):
        if self.fused:
            return self.bn(x, residual, **self._call_kw)
        return skipfast.ops.add_relu(self.bn(x), residual)


def tail_description() -> str:
    if _bn_act_cls() is not None:
        return "skipfast = skipfast.nn.BatchNormAct2d(x, residual) (fused BN + add + ReLU)"
    return "skipfast = nn.BatchNorm2d + skipfast.ops.add_relu (skipfast.nn.BatchNormAct2d not in this build)"


class _DoubleConvRef(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpRef(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = _DoubleConvRef(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.up(x), skip], 1))


class UNetRef(nn.Module):
    """The tutorial's U-Net in plain torch modules, with skipfast.UNet's state_dict keys.
    Input H, W must be multiples of ``2**depth``."""

    def __init__(self, in_channels=3, out_channels=1, base_channels=64, depth=4):
        super().__init__()
        w = [base_channels * 2**i for i in range(depth + 1)]
        self.inc = _DoubleConvRef(in_channels, w[0])
        self.down = nn.ModuleList(_DoubleConvRef(w[i], w[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(_UpRef(w[i + 1], w[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(w[0], out_channels, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(nn.functional.max_pool2d(skips[-1], 2)))
        out = skips.pop()
        for up in self.up:
            out = up(out, skips.pop())
        return self.outc(out)


# ------------------------------------------------------------------ the set


def _elementwise_bytes(n_elems: int, tensors: dict[str, float]):
    """Minimum bytes per mode: unique tensors read + written, in element units
    (a 1-byte-per-element mask counts 1/elem_size)."""
    def min_bytes(mode: str, elem: int) -> int:
        return int(n_elems * elem * tensors[mode])

    return min_bytes


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def standard_cases(size: str = "quick", batch: int | None = None) -> list[Case]:
    """The cases at one of SIZES; ``batch`` replaces the batch size of the whole-model inputs."""
    z = dict(SIZES[size])
    if batch is not None:
        z["img"], z["unet"] = (batch, *z["img"][1:]), (batch, *z["unet"][1:])
    quick = size == "quick"
    block_modes = ("fwd+bwd", "infer") if quick else ("fwd", "bwd", "fwd+bwd", "infer")
    tail_modes = ("fwd", "bwd", "fwd+bwd", "infer")
    n_tail = _numel(z["tail"])
    c_tail = z["tail"][1]
    img, unet_in, uc = z["img"], z["unet"], z["unet_c"]
    tv = torchvision.models
    return [
        Case("add_relu", AddReLURef, AddReLUSkipfast, [z["tail"], z["tail"]], tail_modes,
             "relu(x + residual) vs skipfast.ops.add_relu",
             # fwd: x, residual, out; bwd: dy, out (the mask), dx (= dresidual, one tensor)
             _elementwise_bytes(n_tail, {"fwd": 3, "infer": 3, "bwd": 3, "fwd+bwd": 6})),
        Case("bn_add_relu", lambda: BNAddReLURef(c_tail), lambda: BNAddReLUSkipfast(c_tail), [z["tail"], z["tail"]],
             tail_modes, "BN-add-ReLU tail: eager BatchNorm2d -> add -> relu; " + tail_description(),
             # fwd: x, residual, out; bwd: dy, x, 1-byte mask, dx, dresidual (unique bytes)
             lambda mode, e: int(n_tail * {"fwd": 3 * e, "infer": 3 * e, "bwd": 4 * e + 1,
                                           "fwd+bwd": 7 * e + 1}[mode])),
        Case("ResidualBlock", lambda: tv.resnet.BasicBlock(64, 64), lambda: skipfast.ResidualBlock(64), [z["res"]],
             block_modes, "torchvision BasicBlock(64, 64) vs skipfast.ResidualBlock(64)"),
        Case("BottleneckBlock", lambda: tv.resnet.Bottleneck(256, 64), lambda: skipfast.BottleneckBlock(256, 64),
             [z["bottleneck"]], block_modes, "torchvision Bottleneck(256, 64) vs skipfast.BottleneckBlock(256, 64)"),
        Case("DenseBlock", lambda: tv.densenet._DenseBlock(6, 64, 4, 32, 0.0),
             lambda: skipfast.DenseBlock(64, 32, 6, bn_size=4), [z["dense"]], ("fwd+bwd", "infer"),
             "torchvision _DenseBlock(6 layers, 64 in, k=32, bn_size=4) vs skipfast.DenseBlock"),
        Case("resnet18", tv.resnet18, skipfast.models.resnet18, [img], ("fwd+bwd", "infer"),
             "torchvision resnet18 vs skipfast.models.resnet18"),
        Case("resnet50", tv.resnet50, skipfast.models.resnet50, [img], ("fwd+bwd", "infer"),
             "torchvision resnet50 vs skipfast.models.resnet50"),
        Case("densenet121", tv.densenet121, skipfast.models.densenet121, [img], ("fwd+bwd",),
             "torchvision densenet121 vs skipfast.models.densenet121"),
        Case("unet", lambda: UNetRef(3, 1, uc, 4), lambda: skipfast.models.unet(3, 1, uc, 4), [unet_in],
             ("fwd+bwd",), f"plain-torch U-Net (base {uc}, depth 4) vs skipfast.models.unet"),
    ]


def select(cases: list[Case], names: str | None) -> list[Case]:
    """``names``: comma-separated case names (case-insensitive); None keeps all."""
    if not names:
        return cases
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    known = {c.name.lower(): c for c in cases}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {unknown}; expected names from {[c.name for c in cases]}")
    return [known[n] for n in wanted]


def select_modes(cases: list[Case], modes: str | None) -> list[Case]:
    """Keep only ``modes`` (comma-separated) in each case; cases left with none are dropped."""
    if not modes:
        return cases
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in ("fwd", "bwd", "fwd+bwd", "infer")]
    if unknown or not wanted:
        raise ValueError(f"--modes: expected some of fwd, bwd, fwd+bwd, infer, got {modes!r}")
    kept = [dataclasses.replace(c, modes=tuple(m for m in c.modes if m in wanted)) for c in cases]
    kept = [c for c in kept if c.modes]
    if not kept:
        raise ValueError(f"--modes {modes!r}: none of the selected cases has these modes")
    return kept
