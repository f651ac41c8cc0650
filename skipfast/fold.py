"""Folding an eval-mode BatchNorm into the convolution before it.

``fold_bn(conv, bn)`` returns the folded ``(weight, bias)``: ``w' = w * g / sqrt(v + eps)``
per output channel and ``b' = (b - m) * g / sqrt(v + eps) + beta``, computed in float64
and rounded once to the weight's dtype.

``FoldedConvBN`` keeps that fold (and, on CPU, oneDNN's prepacked weight) for a module
pair and recomputes it whenever any source tensor changed: it keys the cache on each
tensor's identity, storage, version counter (bumped by every in-place update: an
optimizer step, ``load_state_dict``, a running-stat update), dtype and device.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import conv as conv_ops


def fold_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``conv`` followed by ``bn`` in eval mode."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"skipfast.fold_bn: conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"skipfast.fold_bn: bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("skipfast.fold_bn: bn has no running statistics (track_running_stats=False), so its eval "
                         "output depends on the batch and cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"skipfast.fold_bn: bn has {bn.num_features} features but conv has {conv.out_channels} "
                         "output channels")
    with torch.no_grad():
        w = conv.weight.double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = -bn.running_mean.double() * scale
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        if bn.bias is not None:
            bias = bias + bn.bias.double()
        weight = (w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
        return weight, bias.to(conv.weight.dtype)


def _key(conv, bn):
    parts = [bn.eps]
    for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
        parts.append(None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(parts)


class FoldedConvBN:
    """Eval-mode ``act(bn(conv(x)) + residual)`` as one ``conv2d_bias_act`` call with the
    BN folded into the convolution. Holds no state of its own but the cache: the fold,
    and on CPU oneDNN's prepacked weight per input shape (a weight packed without the
    input shape can pick a much slower kernel: 8x for 512 channels at 7x7 here)."""

    def __init__(self):
        self._key = None
        self._weight = self._bias = None
        self._packed: dict[tuple, torch.Tensor] = {}

    def folded(self, conv: nn.Conv2d, bn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = _key(conv, bn)
        if key != self._key:
            self._weight, self._bias = fold_bn(conv, bn)
            self._key, self._packed = key, {}
        shape = tuple(x.shape)
        packed = self._packed.get(shape)
        if packed is None:
            if len(self._packed) >= 8:  # many input shapes: keep the newest few
                self._packed.pop(next(iter(self._packed)))
            packed = self._packed[shape] = conv_ops.prepack_weight(
                self._weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                input_size=list(shape))
        return packed, self._bias

    def __call__(self, conv: nn.Conv2d, bn, x: torch.Tensor, residual: torch.Tensor | None = None,
                 activation: str | None = "relu") -> torch.Tensor:
        if torch.compiler.is_compiling():
            weight, bias = fold_bn(conv, bn)  # traced into the graph, no Python-side cache
        else:
            weight, bias = self.folded(conv, bn, x)
        return conv_ops.conv2d_bias_act(x, weight, bias, stride=conv.stride, padding=conv.padding,
                                        dilation=conv.dilation, groups=conv.groups, residual=residual,
                                        activation=activation)

    def __getstate__(self):  # deepcopy / pickle: the cache is rebuilt on first use
        return {"_key": None, "_weight": None, "_bias": None, "_packed": {}}


class FoldSet(dict):
    """One ``FoldedConvBN`` per named conv/BN pair of a module, made on first use."""

    def __call__(self, name: str, conv: nn.Conv2d, bn, x: torch.Tensor, residual: torch.Tensor | None = None,
                 activation: str | None = "relu") -> torch.Tensor:
        fold = self.get(name)
        if fold is None:
            fold = self[name] = FoldedConvBN()
        return fold(conv, bn, x, residual, activation)


def reads_directly(m: nn.Module) -> bool:
    """Whether m's tensors may be used without calling m: no module hooks (pruning's
    pre-hook computes the weight) and no parametrization (``parametrize`` keeps them in
    ``m.parametrizations``). Otherwise only m's own forward sees its current tensors. Dict
    reads only: this runs on every call."""
    return not (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
                or "parametrizations" in m._modules)


def can_fold(conv, bn, x: torch.Tensor) -> bool:
    """Eval-mode folding applies: running stats exist, no grad is needed, x has the
    weights' dtype (under autocast the unfused path casts as torch does), zero padding,
    and neither module computes its tensors in its own forward (``reads_directly``)."""
    return (reads_directly(conv) and reads_directly(bn)
            and not bn.training and bn.running_mean is not None and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and x.dtype == conv.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)))
