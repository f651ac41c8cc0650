"""BatchNormAct2d: ``nn.BatchNorm2d`` whose forward also adds a residual and applies ReLU,
through the fused ops of skipfast/ops/bn_act.py."""
from __future__ import annotations

import torch
from torch import nn

from ..fold import reads_directly
from ..ops import bn_act


def share_tensors(cls: type, bn: nn.modules.batchnorm._BatchNorm, **kwargs) -> nn.BatchNorm2d:
    """A new ``cls(bn.num_features, ..., **kwargs)`` (a BatchNorm2d subclass) whose
    parameters and buffers are ``bn``'s own tensor objects, in ``bn``'s train/eval mode."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"{cls.__name__}: bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    # Built on the meta device; every parameter and buffer is then replaced by bn's own.
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta", **kwargs)
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


class BatchNormAct2d(nn.BatchNorm2d):
    """``activation(bn(x) + residual)``, a drop-in subclass of ``nn.BatchNorm2d``.

    Same constructor arguments (plus ``activation``: ``"relu"`` or ``None``), same
    parameters, buffers and ``state_dict`` keys, same running-statistics semantics
    (``momentum=None`` cumulative average, ``num_batches_tracked``,
    ``track_running_stats=False``, ``affine=False``, eval with running statistics).
    ``forward(x, residual=None)``; with ``activation=None`` and no residual it computes
    exactly what ``nn.BatchNorm2d`` computes.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, activation: str | None = "relu"):
        if activation not in bn_act.ACTIVATIONS:
            raise ValueError(f"BatchNormAct2d: activation must be 'relu' or None, got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def shared_from(cls, bn: nn.modules.batchnorm._BatchNorm, activation: str | None = "relu", **kwargs):
        """A ``cls`` holding ``bn``'s own parameter and buffer tensors (no copies) and its
        train/eval mode: updates through either module are seen by both."""
        return share_tensors(cls, bn, activation=activation, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def _state(self, x):
        """nn.BatchNorm2d.forward's reading of the module: (weight, bias, running_mean,
        running_var, num_batches_tracked to count or None, training)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = f"{x.dim()}-D input" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"BatchNormAct2d: x must be a 4-D tensor [N, C, H, W], got {got}")
        # Parameters and buffers read once, from their dicts where they are registered there
        # (each attribute read goes through nn.Module.__getattr__, a measurable part of a small
        # layer's host time); pruning and parametrizations replace them with attributes.
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        running_mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean
        running_var = buffers["running_var"] if "running_var" in buffers else self.running_var
        training = self.training or (running_mean is None and running_var is None)
        num_batches_tracked = None
        if self.training:
            if self.track_running_stats:
                num_batches_tracked = (buffers["num_batches_tracked"] if "num_batches_tracked" in buffers
                                       else self.num_batches_tracked)
            else:
                running_mean = running_var = None
        return weight, bias, running_mean, running_var, num_batches_tracked, training

    def _prepare(self, x, residual, num_batches_tracked, *args):
        """The checks of the functional API, then num_batches_tracked counted, only for an
        accepted call (a rejected one leaves every buffer unchanged). Returns (x, residual,
        momentum). ``args``: (weight, bias, running_mean, running_var, training)."""
        x, residual = bn_act.autocast_promote(x, residual)
        bn_act._validate(x, *args, 0.0, self.eps, residual, self.activation)
        momentum = 0.0 if self.momentum is None else self.momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(num_batches_tracked)
        return x, residual, momentum

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        weight, bias, running_mean, running_var, nbt, training = self._state(x)
        if ((residual is None or type(residual) is torch.Tensor) and self.activation in bn_act.ACTIVATIONS
                and bn_act._module_eager(x)):  # checks, count and kernels in one C++ call
            return bn_act._FORWARD_EAGER(x, weight, bias, residual, running_mean, running_var, nbt, training,
                                         self.momentum, self.eps, self.activation == "relu")
        x, residual, momentum = self._prepare(x, residual, nbt, weight, bias, running_mean, running_var, training)
        return bn_act._forward(x, weight, bias, running_mean, running_var, training, momentum, self.eps, residual,
                               self.activation)

    def then_conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """``conv(self(x))``. In training with ReLU, backward recomputes this module's
        output from x instead of keeping it (see ``skipfast.ops.bn_act.batch_norm_relu_conv2d``):
        the residual blocks save about 0.6x of eager's bytes instead of 0.8x. Where this
        module or ``conv`` has module hooks or a parametrization (e.g. pruned), it is
        ``conv(self(x))``, both called as modules."""
        recompute = (self.activation == "relu" and type(conv) is nn.Conv2d and conv.bias is None
                     and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                     and reads_directly(self) and reads_directly(conv))  # e.g. neither pruned
        if not recompute:
            return conv(self(x))
        weight, bias, running_mean, running_var, nbt, training = self._state(x)
        if not training:
            return conv(self.forward(x))
        if bn_act._module_eager(x) and bn_act._recomputes(x):
            return bn_act._RELU_CONV2D_EAGER(x, weight, bias, running_mean, running_var, nbt, conv.weight,
                                             self.momentum, self.eps, bn_act._pair(conv.stride),
                                             bn_act._pair(conv.padding), bn_act._pair(conv.dilation), conv.groups)
        x, _, momentum = self._prepare(x, None, nbt, weight, bias, running_mean, running_var, True)
        return bn_act._bn_relu_conv2d(x, weight, bias, running_mean, running_var, conv.weight, momentum, self.eps,
                                      conv.stride, conv.padding, conv.dilation, conv.groups)
