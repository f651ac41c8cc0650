"""bn_act: batch norm (+ residual) (+ ReLU), ``relu(bn(x) + residual)`` in two passes.

The public function is :func:`batch_norm_act`; :class:`skipfast.nn.BatchNormAct2d` is the
module. Schemas are in csrc/skipfast.cpp, the math in csrc/bn_act.h, kernels in
csrc/cpu/bn_act.cpp, csrc/cuda/bn_act.cu and (Triton) skipfast/kernels/bn_act.py.

The op family is split into phases, like torch's batch_norm_stats / batch_norm_elemt /
batch_norm_backward_reduce / batch_norm_backward_elemt, so a synchronized BN can
all-reduce between them. Per-channel tensors are float32 (float64 for float64 x); the
mask holds 1 bit per element of x (bit i in byte i // 8, flat index in x's memory
layout), ``(numel + 7) // 8`` uint8 values, and is empty when there is no ReLU.

====================================  ===============================================
``bn_act_stats(x)``                   ``(mean, var)`` per channel (biased var, Welford /
                                      shifted sums, fp32 accumulation). Sync BN: gather
                                      (count, mean, var) and merge with Chan's formula.
``bn_act_apply(x, mean, invstd,``     ``out = relu((x - mean) * invstd * weight + bias +
``weight?, bias?, residual?, relu)``  residual)`` and the ReLU mask, one pass.
``bn_act_backward_reduce(dy, x,``     ``(sum_dy, sum_dy_xhat)`` per channel, of ``dy' = dy``
``mean, invstd, mask?)``              masked by the ReLU and ``xhat = (x - mean) * invstd``;
                                      these are also grad_bias and grad_weight. Sync BN:
                                      all-reduce both.
``bn_act_backward_elemt(dy, x, mean,``  ``grad_x = weight * invstd * (dy' - sum_dy / count -
``invstd, weight?, mask?, sum_dy?,``    xhat * sum_dy_xhat / count)`` (sums None: eval,
``sum_dy_xhat?, count, grad_res)``      ``grad_x = weight * invstd * dy'``) and, when asked,
                                      the residual gradient ``dy'``. Sync BN: count is the
                                      global number of values per channel.
``bn_act_train(x, weight?, bias?,``   stats + apply in one call: ``(out, mean, var,``
``residual?, eps, relu)``             ``invstd, mask)``.
====================================  ===============================================

Autograd (``torch.library.register_autograd``): ``bn_act_train`` saves x, weight, mean,
invstd and the mask (nothing else full-size); its backward is backward_reduce then
backward_elemt. ``bn_act_apply`` (eval, or a sync BN's apply) has its own backward with
gradients for x, residual, weight, bias, mean and invstd. Running statistics are updated
here in Python with in-place torch ops (traceable by torch.compile), after validation.
In eager mode the C++ backend skips these Python layers (about 100 us of host time a call,
as much as the kernels of a 7x7 ResNet stage): training is one call of
``bn_act_train_eager`` (csrc/bn_act_eager.cpp: the kernel, a C++ autograd node with the
same saved tensors and backward phases, the running-statistics update), and eval is one
call of ``bn_act_eval_eager`` (the inverse standard deviation of the running variance, then
``bn_act_apply``, below autograd when no gradient is wanted), and so is the BN + ReLU +
convolution of ``batch_norm_relu_conv2d`` (``bn_act_relu_conv2d_eager``, the C++ form of
``_BnReluConv2d``). BatchNormAct2d goes one step further in eager mode: its forward is one
call of ``bn_act_forward_eager`` (this module's ``_validate`` checks, with the same messages,
the num_batches_tracked count, then the training or eval entry), its then_conv one call of
``bn_act_relu_conv2d_eager`` with the count. torch.compile traces the registered ops;
torch.func transforms take the reference (skipfast/_backend.py). The kernels' backward is
not differentiable: a second derivative through them (``create_graph=True``) is refused with
an error.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _backend, _layout
from . import _checks

OP = "skipfast.batch_norm_act"
ACTIVATIONS = ("relu", None)


def batch_norm_act_reference(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5,
                             residual=None, activation="relu"):
    """The eager PyTorch sequence this op replaces (test oracle and fallback)."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if activation == "relu" else y


def mask_bytes(numel):
    return (numel + 7) // 8


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the per-channel tensors the kernels take and return."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_vector(name: str, t, x: torch.Tensor) -> None:
    if t is None:
        return
    _checks.tensor(OP, name, t, dims=1)
    if t.shape[0] != x.shape[1]:
        raise ValueError(f"{OP}: {name} must have {x.shape[1]} values (one per channel of x), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{OP}: {name} must be on the device of x ({x.device}), got {t.device}")


def _param_dtype(name: str, t: torch.Tensor, x: torch.Tensor, first) -> None:
    """torch's batch norm takes per-channel tensors of one dtype, x's, or float32 for a
    float16 or bfloat16 x."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    if t.dtype != x.dtype and not (half and t.dtype == torch.float32):
        raise TypeError(f"{OP}: {name} must have the dtype of x ({x.dtype}){' or float32' if half else ''}, as torch's "
                        f"batch norm requires, got {t.dtype}")
    if first is not None and t.dtype != first.dtype:
        raise TypeError(f"{OP}: weight, bias, running_mean and running_var must share one dtype, as torch's batch "
                        f"norm requires, got {first.dtype} and {t.dtype}")


def _validate(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation):
    _checks.tensor(OP, "x", x, dims=4)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be 'relu' or None, got {activation!r}")
    if not isinstance(training, bool):
        raise TypeError(f"{OP}: training must be a bool, got {type(training).__name__}")
    for name, v in (("momentum", momentum), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{OP}: {name} must be a float, got {type(v).__name__}")
    C, device = x.shape[1], x.device
    first = None  # the first per-channel tensor given
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        # one cheap test for the valid case; _channel_vector then names what is wrong
        if not (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == C and t.is_floating_point()
                and t.device == device):
            _channel_vector(name, t, x)
        _param_dtype(name, t, x, first)
        first = first if first is not None else t
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{OP}: running_mean and running_var must be defined in evaluation mode (training=False)")
    if residual is not None:
        _checks.like(OP, "residual", residual, x)
    if training and x.numel() // max(x.shape[1], 1) == 1:
        # torch's message (F.batch_norm), raised before any state changes.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def autocast_promote(x, residual):
    """Under autocast, a residual of another floating dtype is cast to x's dtype, as
    torchvision's blocks (``out += identity``) do; otherwise both are returned as given."""
    if (residual is not None and isinstance(x, torch.Tensor) and isinstance(residual, torch.Tensor)
            and residual.dtype != x.dtype and x.is_floating_point() and residual.is_floating_point()
            and torch.is_autocast_enabled(x.device.type)):
        return x, residual.to(x.dtype)
    return x, residual


def _float64_on_gpu(x):
    """The GPU kernels (CUDA C++ and Triton) compute in float32; float64 runs the reference there."""
    return x.dtype == torch.float64 and x.device.type != "cpu"


def batch_norm_act(x, weight, bias, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, residual=None,
                   activation="relu"):
    """``activation(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    In training the batch statistics normalize x and, when running stats are given,
    update them in place as torch does (``momentum`` is the exponential average factor;
    ``nn.BatchNorm2d``'s ``momentum=None`` cumulative average is the module's job, see
    :class:`skipfast.nn.BatchNormAct2d`). In eval the running statistics are used, in
    one fused pass. Output in x's memory format (channels_last in, channels_last out).
    Under autocast a residual of another floating dtype is cast to x's dtype (as
    torchvision's ``out += identity``); otherwise it must match x's dtype.
    """
    x, residual = autocast_promote(x, residual)
    _validate(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation)
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation)


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, activation):
    """batch_norm_act on inputs already promoted and validated (the module validates once)."""
    backend = _backend.select("bn_act", x.device)
    if backend == "reference" or x.numel() == 0 or _float64_on_gpu(x):
        return batch_norm_act_reference(x, weight, bias, running_mean, running_var, training=training,
                                        momentum=momentum, eps=eps, residual=residual, activation=activation)
    ops = _OPS[backend]
    relu = activation == "relu"
    sd = stat_dtype(x)
    w = weight if weight is None or weight.dtype == sd else weight.to(sd)
    b = bias if bias is None or bias.dtype == sd else bias.to(sd)
    if training:
        if _eager_cpp(backend, x):
            # kernel, autograd node and running-statistics update in one C++ call
            return _TRAIN_EAGER(x, w, b, residual, running_mean, running_var, float(momentum), float(eps), relu)
        out, mean, var, _invstd, _mask = ops.train(x, w, b, residual, float(eps), relu)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
        return out
    if _eager_cpp(backend, x):
        # invstd and the apply kernel in one C++ call (below autograd when no gradient is wanted)
        return _EVAL_EAGER(x, w, b, residual, running_mean, running_var, float(eps), relu)
    mean, invstd = running_mean.to(sd), torch.rsqrt(running_var.to(sd) + eps)
    return ops.apply(x, mean, invstd, w, b, residual, relu)[0]


def _eager_cpp(backend, x):
    """The C++ ops may be called below autograd / through the ``bn_act_*_eager`` entries:
    plain eager mode on plain tensors (not traced by torch.compile, no torch.func transform,
    no tensor subclass or dispatch mode such as FakeTensorMode, which take the registered
    ops and their fake kernels)."""
    return (backend == "cpp" and type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and torch._C._len_torch_dispatch_stack() == 0)


def _module_eager(x):
    """Whether BatchNormAct2d runs through ``bn_act_forward_eager`` / ``bn_act_relu_conv2d_eager``
    (the module's checks, its num_batches_tracked count and the kernels in one C++ call): the
    C++ backend in plain eager mode, on a non-empty x (float32 or narrower on a GPU)."""
    return (x.numel() != 0 and _backend.select("bn_act", x.device) == "cpp" and _eager_cpp("cpp", x)
            and not _float64_on_gpu(x))


def _recomputes(x):
    """Whether the BN + ReLU + convolution may recompute its activation in backward: a
    gradient is wanted and autocast is off (batch_norm_relu_conv2d, BatchNormAct2d.then_conv)."""
    return torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def _pair(v):
    """A convolution's stride, padding or dilation as a pair."""
    return (v, v) if isinstance(v, int) else tuple(v)


def _update_running(running_mean, running_var, mean, var, momentum, n):
    """torch's update: running = (1 - momentum) * running + momentum * batch (unbiased var)."""
    if _backend.has_extension() and _eager_cpp("cpp", running_mean):
        _UPDATE_RUNNING(running_mean, running_var, mean, var, float(momentum), n)  # one C++ call
        return
    if mean.dtype != running_mean.dtype:
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))


# ---- autograd -------------------------------------------------------------------


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, relu = inputs
    out, mean, var, invstd, mask = output
    ctx.mark_non_differentiable(mean, var, invstd, mask)
    ctx.save_for_backward(x, weight, mean, invstd, mask if relu else None)
    ctx.relu = relu


SECOND_DERIVATIVE = (f"{OP}: second derivatives are not supported (the fused backward is not differentiable); "
                     "create_graph=True needs the reference backend, SKIPFAST_BACKEND=reference")


def _first_order_only(grad_out, saved):
    """The phase ops have no derivatives of their own: with create_graph=True a second
    derivative through them would silently miss terms, so it is refused."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (grad_out.requires_grad or any(t is not None and t.requires_grad for t in saved))):
        raise RuntimeError(SECOND_DERIVATIVE)


def _train_grads(ctx, ops, grad_out):
    """Gradients of bn_act_train's (x, weight, bias, residual)."""
    x, weight, mean, invstd, mask = ctx.saved_tensors
    _first_order_only(grad_out, (x, weight))
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    sum_dy, sum_dy_xhat = ops.backward_reduce(grad_out, x, mean, invstd, mask)
    gx = gr = None
    if need_x or (need_r and ctx.relu):
        count = x.numel() // x.shape[1]
        gx, gr = ops.backward_elemt(grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count,
                                    bool(need_r and ctx.relu))
    if need_r and not ctx.relu:
        gr = grad_out
    gw = sum_dy_xhat if need_w else None
    gb = sum_dy if need_b else None
    return gx if need_x else None, gw, gb, gr if need_r else None


def _make_train_backward(ops):
    def backward(ctx, grad_out, *_):
        return (*_train_grads(ctx, ops, grad_out), None, None)

    return backward


def _apply_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, residual, relu = inputs
    out, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(x, mean, invstd, weight, mask if relu else None)
    ctx.relu = relu


def _make_apply_backward(ops):
    def backward(ctx, grad_out, _grad_mask):
        x, mean, invstd, weight, mask = ctx.saved_tensors
        _first_order_only(grad_out, (x, mean, invstd, weight))
        need_x, need_mean, need_invstd, need_w, need_b, need_r = ctx.needs_input_grad[:6]
        gx = gr = gmean = ginvstd = gw = gb = None
        if need_mean or need_invstd or need_w or need_b:
            sum_dy, sum_dy_xhat = ops.backward_reduce(grad_out, x, mean, invstd, mask)
            w = torch.ones_like(invstd) if weight is None else weight
            gw = sum_dy_xhat if need_w else None
            gb = sum_dy if need_b else None
            gmean = -(w * invstd * sum_dy) if need_mean else None
            ginvstd = w * sum_dy_xhat / invstd if need_invstd else None
        if need_x or (need_r and ctx.relu):
            gx, gr = ops.backward_elemt(grad_out, x, mean, invstd, weight, mask, None, None, 0, bool(need_r and ctx.relu))
        if need_r and not ctx.relu:
            gr = grad_out
        return gx if need_x else None, gmean, ginvstd, gw, gb, gr if need_r else None, None

    return backward


def _register_autograd(ops):
    torch.library.register_autograd(ops.train_name, _make_train_backward(ops), setup_context=_train_setup_context)
    torch.library.register_autograd(ops.apply_name, _make_apply_backward(ops), setup_context=_apply_setup_context)


_OPS: dict[str, types.SimpleNamespace] = {}
_PHASES = ("stats", "apply", "train", "backward_reduce", "backward_elemt")


def _op_set(suffix: str) -> types.SimpleNamespace:
    """The phase ops ``skipfast::bn_act_<phase><suffix>`` of one backend."""
    ops = types.SimpleNamespace(**{p: getattr(torch.ops.skipfast, f"bn_act_{p}{suffix}") for p in _PHASES})
    ops.train_name, ops.apply_name = f"skipfast::bn_act_train{suffix}", f"skipfast::bn_act_apply{suffix}"
    return ops


if _backend.has_extension():
    _OPS["cpp"] = _op_set("")
    # the eager-mode entries, as overloads (called without the packet's overload lookup)
    _TRAIN_EAGER = torch.ops.skipfast.bn_act_train_eager.default
    _EVAL_EAGER = torch.ops.skipfast.bn_act_eval_eager.default
    _UPDATE_RUNNING = torch.ops.skipfast.bn_act_update_running.default
    _RELU_CONV2D_EAGER = torch.ops.skipfast.bn_act_relu_conv2d_eager.default
    _FORWARD_EAGER = torch.ops.skipfast.bn_act_forward_eager.default

    def _channel(x):
        return x.new_empty((x.shape[1],), dtype=stat_dtype(x))

    def _mask(x, relu):
        return x.new_empty((mask_bytes(x.numel()) if relu else 0,), dtype=torch.uint8)

    @torch.library.register_fake("skipfast::bn_act_stats")
    def _(x):
        return _channel(x), _channel(x)

    @torch.library.register_fake("skipfast::bn_act_apply")
    def _(x, mean, invstd, weight, bias, residual, relu):
        return _layout.empty_like(x), _mask(x, relu)

    @torch.library.register_fake("skipfast::bn_act_train")
    def _(x, weight, bias, residual, eps, relu):
        return _layout.empty_like(x), _channel(x), _channel(x), _channel(x), _mask(x, relu)

    @torch.library.register_fake("skipfast::bn_act_backward_reduce")
    def _(grad_out, x, mean, invstd, mask):
        return _channel(x), _channel(x)

    @torch.library.register_fake("skipfast::bn_act_backward_elemt")
    def _(grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count, grad_residual):
        gr = _layout.empty_like(x) if grad_residual else x.new_empty((0,))
        return _layout.empty_like(x), gr

    _register_autograd(_OPS["cpp"])


if _backend.has_triton():
    from typing import Optional

    from ..kernels import bn_act as _kernels

    _wrap = torch.library.wrap_triton
    _T = Optional[torch.Tensor]

    @torch.library.triton_op("skipfast::bn_act_stats_triton", mutates_args=())
    def _stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.stats(x, wrap=_wrap)

    @torch.library.triton_op("skipfast::bn_act_apply_triton", mutates_args=())
    def _apply_triton(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: _T, bias: _T, residual: _T,
                      relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.apply(x, mean, invstd, weight, bias, residual, relu, wrap=_wrap)

    @torch.library.triton_op("skipfast::bn_act_train_triton", mutates_args=())
    def _train_triton(x: torch.Tensor, weight: _T, bias: _T, residual: _T, eps: float,
                      relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _kernels.train(x, weight, bias, residual, eps, relu, wrap=_wrap)

    @torch.library.triton_op("skipfast::bn_act_backward_reduce_triton", mutates_args=())
    def _backward_reduce_triton(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                                mask: _T) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.backward_reduce(grad_out, x, mean, invstd, mask, wrap=_wrap)

    @torch.library.triton_op("skipfast::bn_act_backward_elemt_triton", mutates_args=())
    def _backward_elemt_triton(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: _T, mask: _T, sum_dy: _T, sum_dy_xhat: _T, count: int,
                               grad_residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.backward_elemt(grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count,
                                       grad_residual, wrap=_wrap)

    _OPS["triton"] = _op_set("_triton")
    _register_autograd(_OPS["triton"])


# ---- BN + ReLU followed by a convolution, recomputing the activation in backward -------


class _BnReluConv2d(torch.autograd.Function):
    """``conv2d(relu(bn(x)), conv_weight)`` in training. Saves x (which the caller keeps
    anyway: it is the previous convolution's output) and per-channel statistics, not the
    activation the convolution reads: backward recomputes it with one bn_act_apply pass.
    Eager saves x, the activation and the convolution's copy of it; this saves x.
    Returns (y, mean, var, invstd). Its backward is not differentiable: a second derivative
    through it is an error (once_differentiable)."""

    @staticmethod
    def forward(x, weight, bias, conv_weight, eps, stride, padding, dilation, groups, backend):
        a, mean, var, invstd, _mask = _OPS[backend].train(x, weight, bias, None, eps, True)
        return F.conv2d(a, conv_weight, None, stride, padding, dilation, groups), mean, var, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, conv_weight, _eps, stride, padding, dilation, groups, backend = inputs
        _y, mean, var, invstd = output
        ctx.save_for_backward(x, weight, bias, conv_weight, mean, invstd)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.backend = backend
        ctx.mark_non_differentiable(mean, var, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *_):
        x, weight, bias, conv_weight, mean, invstd = ctx.saved_tensors
        ops = _OPS[ctx.backend]
        stride, padding, dilation, groups = ctx.conv
        a, mask = ops.apply(x, mean, invstd, weight, bias, None, True)
        grad_a, grad_cw, _ = torch.ops.aten.convolution_backward(
            grad_y, a, conv_weight, None, stride, padding, dilation, False, [0, 0], groups,
            [True, ctx.needs_input_grad[3], False])
        sum_dy, sum_dy_xhat = ops.backward_reduce(grad_a, x, mean, invstd, mask)
        gx = None
        if ctx.needs_input_grad[0]:
            gx, _ = ops.backward_elemt(grad_a, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat,
                                       x.numel() // x.shape[1], False)
        gw = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_dy if bias is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, grad_cw, None, None, None, None, None, None


def batch_norm_relu_conv2d(x, weight, bias, running_mean, running_var, conv_weight, *, momentum=0.1, eps=1e-5,
                           stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(batch_norm_act(x, ..., training=True), conv_weight, None, stride, padding,
    dilation, groups)`` in training, without keeping the normalized activation for backward
    (recomputed there from x in one pass). Falls back to the plain sequence where the
    recompute does not apply (no grad, autocast, the reference backend, empty x)."""
    _validate(x, weight, bias, running_mean, running_var, True, momentum, eps, None, "relu")
    _checks.tensor(OP, "conv_weight", conv_weight, dims=4)
    return _bn_relu_conv2d(x, weight, bias, running_mean, running_var, conv_weight, momentum, eps, stride, padding,
                           dilation, groups)


def _bn_relu_conv2d(x, weight, bias, running_mean, running_var, conv_weight, momentum, eps, stride, padding,
                    dilation, groups):
    """batch_norm_relu_conv2d on inputs already validated (BatchNormAct2d.then_conv validates once)."""
    backend = _backend.select("bn_act", x.device)
    if backend == "reference" or x.numel() == 0 or _float64_on_gpu(x) or not _recomputes(x):
        a = _forward(x, weight, bias, running_mean, running_var, True, momentum, eps, None, "relu")
        return F.conv2d(a, conv_weight, None, stride, padding, dilation, groups)
    sd = stat_dtype(x)
    w = weight if weight is None or weight.dtype == sd else weight.to(sd)
    b = bias if bias is None or bias.dtype == sd else bias.to(sd)
    if _eager_cpp(backend, x):
        # the same autograd node in C++, and the running-statistics update, in one call
        return _RELU_CONV2D_EAGER(x, w, b, running_mean, running_var, None, conv_weight, float(momentum), float(eps),
                                  _pair(stride), _pair(padding), _pair(dilation), groups)
    y, mean, var, _invstd = _BnReluConv2d.apply(x, w, b, conv_weight, float(eps), _pair(stride), _pair(padding),
                                                _pair(dilation), groups, backend)
    if running_mean is not None:
        _update_running(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return y
