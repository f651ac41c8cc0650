"""SyncBatchNormAct2d: batch norm (+ residual) (+ ReLU) with batch statistics
all-reduced over a ``torch.distributed`` process group, and ``convert_sync_batchnorm``.

Training forward, in phases (each a small function below, with the signature of the
matching ``skipfast::bn_act_*`` op so a fused kernel can replace it one for one):

1. ``_stats(x) -> (mean, var)``: local per-channel mean and biased variance.
2. ONE ``all_reduce(SUM)`` of ``[sum, sum of squares, count]`` per channel, as one
   float64 tensor of ``2C + 1`` values (float32 would lose the variance of channels whose
   mean is large against their spread, and counts above 2^24).
3. ``_apply(x, mean, invstd, weight, bias, residual, relu) -> (out, mask)``:
   ``relu(x * scale + shift + residual)`` with the global statistics, and the ReLU mask
   (1 bit per element).

Backward: ``_backward_reduce`` (local per-channel ``sum(dy')`` and ``sum(dy' * xhat)``,
``dy'`` = dy masked by the ReLU; they are also the local bias and weight gradients) ->
ONE ``all_reduce(SUM)`` of both sums (in the statistics dtype: float32, float64 for
float64 x) -> ``_backward_elemt`` (input and residual gradients). Saved for backward: x, the global mean and invstd, the mask; never the
normalized tensor or the output. Weight and bias gradients stay local (the sum over this
rank's batch), as torch's ``nn.SyncBatchNorm`` returns them: DDP averages them.

Running statistics follow ``nn.BatchNorm2d`` over the global batch (unbiased variance
with the global count, ``momentum=None`` cumulative average, ``num_batches_tracked``).
Eval mode uses the running statistics and communicates nothing.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn

from .. import _backend, _layout
from ..ops import bn_act
from .batchnorm import share_tensors

NAME = "SyncBatchNormAct2d"
ACTIVATIONS = ("relu", None)


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


# ---- the ReLU mask: 1 bit per element, bit i in byte i // 8 (flat index in x's layout) ----

_BITS = {}


def _bit_weights(device) -> torch.Tensor:
    if device not in _BITS:
        _BITS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return _BITS[device]


def _memory_order(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`t` flattened in the element order of memory format `fmt`."""
    if fmt == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def _pack_mask(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    flat = _memory_order(keep, _layout.layout_of(x)).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bits = (mask.unsqueeze(1) & _bit_weights(mask.device)).ne(0).view(-1)[: x.numel()]
    n, c, h, w = x.shape
    if _layout.layout_of(x) == torch.channels_last:
        return bits.view(n, h, w, c).permute(0, 3, 1, 2)
    return bits.view(n, c, h, w)


# ---- the four phases (plain torch; same signatures as skipfast::bn_act_* ops) ----


def _stats(x: torch.Tensor):
    """Per-channel (mean, biased var) of x in the statistics dtype (bn_act_stats)."""
    var, mean = torch.var_mean(x.to(stat_dtype(x)), dim=(0, 2, 3), unbiased=False)
    return mean, var


def _apply(x, mean, invstd, weight, bias, residual, relu: bool):
    """``relu((x - mean) * invstd * weight + bias + residual)`` and the ReLU mask (bn_act_apply)."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    out = torch.addcmul(_per_channel(shift), x.to(scale.dtype), _per_channel(scale))
    if residual is not None:
        out += residual
    out = out.to(x.dtype)
    if not relu:
        return out, x.new_empty((0,), dtype=torch.uint8)
    keep = ~(out <= 0)  # torch's threshold_backward passes the gradient where !(out <= 0)
    return out.relu_(), _pack_mask(keep, x)


def _masked(grad_out, x, mask):
    if mask is None:
        return grad_out
    return grad_out * _unpack_mask(mask, x)


def _backward_reduce(grad_out, x, mean, invstd, mask):
    """Per-channel ``(sum(dy'), sum(dy' * xhat))`` (bn_act_backward_reduce)."""
    sd = mean.dtype
    dy = _masked(grad_out, x, mask).to(sd)
    xhat = (x.to(sd) - _per_channel(mean)) * _per_channel(invstd)
    return dy.sum((0, 2, 3)), (dy * xhat).sum((0, 2, 3))


def _backward_elemt(grad_out, x, mean, invstd, weight, mask, sum_dy, sum_dy_xhat, count: int, grad_residual: bool):
    """``grad_x = weight * invstd * (dy' - sum_dy / count - xhat * sum_dy_xhat / count)``
    and, when asked, the residual gradient ``dy'`` (bn_act_backward_elemt)."""
    sd = mean.dtype
    dy = _masked(grad_out, x, mask)
    k = invstd if weight is None else invstd * weight
    xhat = (x.to(sd) - _per_channel(mean)) * _per_channel(invstd)
    gx = (dy.to(sd) - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count)) * _per_channel(k)
    gr = dy.to(x.dtype) if grad_residual else x.new_empty((0,))
    return gx.to(x.dtype), gr


# The phase implementations, looked up per call. A fused backend plugs in here: an
# object with the same four callables (skipfast.ops.bn_act's ``_OPS[backend]`` namespaces
# have exactly these names and signatures, and the same mask format).
TORCH_PHASES = types.SimpleNamespace(stats=_stats, apply=_apply, backward_reduce=_backward_reduce,
                                     backward_elemt=_backward_elemt)


def _phases(x: torch.Tensor) -> types.SimpleNamespace:
    # An empty x (a rank without samples) must always take these; so does float64 on a GPU,
    # whose fused kernels compute in float32.
    if x.numel() == 0 or bn_act._float64_on_gpu(x):
        return TORCH_PHASES
    return bn_act._OPS.get(_backend.select("bn_act", x.device), TORCH_PHASES)


# ---- communication ----


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _global_stats(x: torch.Tensor, group, phases):
    """Local stats -> one all-reduce of [sum, sum of squares, count] -> global (mean, var, count)."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    if n > 0:
        mean, var = phases.stats(x)
    else:  # an empty rank contributes zeros
        mean = var = torch.zeros(c, dtype=stat_dtype(x), device=x.device)
    # float64 on the wire: E[x^2] - E[x]^2 in float32 loses about eps32 * mean^2 / var
    # (1e-3 relative at |mean| = 100 std), and float32 counts are exact only to 2^24.
    mean, var = mean.double(), var.double()
    packed = torch.cat([mean * n, (var + mean * mean) * n, mean.new_full((1,), n)])
    _all_reduce(packed, group)
    count = int(packed[-1].item())
    total, total_sq = packed[:c], packed[c:2 * c]
    g_mean = total / max(count, 1)
    g_var = (total_sq / max(count, 1) - g_mean * g_mean).clamp_(min=0)
    return g_mean.to(stat_dtype(x)), g_var.to(stat_dtype(x)), count


class _SyncBatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, relu, group):
        with torch.autocast(x.device.type, enabled=False):
            return _SyncBatchNormActFunction._forward(ctx, x, weight, bias, residual, eps, relu, group)

    @staticmethod
    def _forward(ctx, x, weight, bias, residual, eps, relu, group):
        sd = stat_dtype(x)
        phases = _phases(x)
        mean, var, count = _global_stats(x, group, phases)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape} "
                             f"on this rank and 1 value per channel over the process group")
        invstd = torch.rsqrt(var + eps)
        w = None if weight is None else weight.detach().to(sd)
        b = None if bias is None else bias.detach().to(sd)
        out, mask = phases.apply(x, mean, invstd, w, b, residual, relu)
        ctx.save_for_backward(x, w, mean, invstd, mask if relu else None)
        ctx.relu, ctx.group, ctx.count = relu, group, count
        ctx.weight_dtype = None if weight is None else weight.dtype
        count_t = torch.tensor(count)
        ctx.mark_non_differentiable(mean, var, count_t)
        return out, mean, var, count_t

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gc):
        x, w, mean, invstd, mask = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous(memory_format=_layout.layout_of(x))
        phases = _phases(x)
        sum_dy, sum_dy_xhat = phases.backward_reduce(grad_out, x, mean, invstd, mask)
        # Weight and bias gradients are this rank's sums: DDP averages parameter gradients.
        gw = sum_dy_xhat.to(ctx.weight_dtype) if need_w else None
        gb = sum_dy.to(ctx.weight_dtype) if need_b else None
        gx = gr = None
        if need_x:
            c = sum_dy.numel()
            sums = _all_reduce(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            gx, gr = phases.backward_elemt(grad_out, x, mean, invstd, w, mask, sums[:c], sums[c:], max(ctx.count, 1),
                                           bool(need_r and ctx.relu))
        elif need_r and ctx.relu:
            gr = _masked(grad_out, x, mask)
        if need_r and not ctx.relu:
            gr = grad_out
        return gx, gw, gb, (gr if need_r else None), None, None, None


# ---- the module ----


class SyncBatchNormAct2d(nn.BatchNorm2d):
    """``activation(bn(x) + residual)`` with batch statistics synchronized over a process group.

    A subclass of ``nn.BatchNorm2d`` with ``nn.SyncBatchNorm``'s constructor arguments
    (plus ``activation``: ``"relu"`` or ``None``) and the same ``state_dict``.
    ``forward(x, residual=None)``; with ``activation=None`` and no residual it computes
    what ``nn.SyncBatchNorm`` computes. Unlike ``nn.SyncBatchNorm`` it accepts CPU tensors
    (gloo) as well as CUDA tensors (NCCL), ranks with different batch sizes and ranks
    with an empty batch.

    Training needs ``torch.distributed`` to be initialised: without it the forward raises
    (``nn.SyncBatchNorm`` silently falls back to local statistics; skipfast refuses, so a
    forgotten ``init_process_group`` is never mistaken for synchronized training; a
    1-process group works). Eval mode uses the running statistics and communicates
    nothing. The first training call of each module also checks, with one small
    all-reduce, that every rank has the same channel count and statistics dtype, so a
    mismatch raises a clear error instead of corrupting or hanging the statistics
    all-reduce.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None,
                 activation: str | None = "relu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{NAME}: activation must be 'relu' or None, got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.activation = activation
        self._ranks_checked = None  # (group id, statistics dtype) of the last cross-rank check

    def then_conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """``conv(self(x))``: what ``BatchNormAct2d.then_conv`` computes, so converted
        skipfast blocks keep working (without its recompute-in-backward saving)."""
        return conv(self(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def _check_input(self, x, residual) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{NAME}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{NAME}: x must be a 4-D tensor [N, C, H, W], got {x.dim()}-D of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{NAME}: x must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{NAME}: x must have {self.num_features} channels (dim 1), got {x.shape[1]} "
                             f"in shape {tuple(x.shape)}")
        if residual is None:
            return
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{NAME}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"{NAME}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{NAME}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{NAME}: residual must be on the device of x ({x.device}), got {residual.device}")

    def _group(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{NAME}: training needs an initialised torch.distributed process group, and "
                "torch.distributed.is_initialized() is False. Call torch.distributed.init_process_group() first "
                "(a 1-process group works for single-process runs), or use nn.BatchNorm2d / BatchNormAct2d, "
                "or switch the module to eval()")
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _check_ranks(self, x, group) -> None:
        """Once per module (and group, and statistics dtype): every rank must all-reduce
        tensors of the same length and dtype. MAX of (C, code, -C, -code) gives max and -min."""
        sd = stat_dtype(x)
        key = (id(group), sd)
        if self._ranks_checked == key or dist.get_world_size(group) == 1:
            return
        c, code = x.shape[1], int(sd == torch.float64)
        t = torch.tensor([c, code, -c, -code], dtype=torch.int64, device=x.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        cmax, codemax, cmin, codemin = t[0].item(), t[1].item(), -t[2].item(), -t[3].item()
        if cmax != cmin:
            raise RuntimeError(f"{NAME}: the ranks of the process group disagree on the number of channels: "
                               f"this rank has {c}, the ranks range from {cmin} to {cmax}. "
                               "Every rank must run the same model.")
        if codemax != codemin:
            raise RuntimeError(f"{NAME}: the ranks of the process group disagree on the statistics dtype: this rank "
                               f"has {sd} (x is {x.dtype}), another has "
                               f"{torch.float32 if code else torch.float64}. Give every rank inputs of one dtype.")
        self._ranks_checked = key

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, residual)
        x, residual = bn_act.autocast_promote(x, residual)
        if not self.training:
            return self._local(x, residual, bn_training=self.running_mean is None and self.running_var is None)
        group = self._group()
        self._check_ranks(x, group)
        out, mean, var, count = _SyncBatchNormActFunction.apply(
            x, self.weight, self.bias, residual, float(self.eps), self.activation == "relu", group)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self._update_running_stats(mean, var, int(count))
        return out

    def _local(self, x, residual, bn_training):
        """No communication: eval with running statistics, or eval without them (batch statistics)."""
        y = torch.nn.functional.batch_norm(x, self.running_mean if not bn_training else None,
                                           self.running_var if not bn_training else None,
                                           self.weight, self.bias, bn_training, 0.0, self.eps)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.activation == "relu" else y

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count: int) -> None:
        """As ``nn.BatchNorm2d`` over the global batch: an empty global batch only counts."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked)
        else:
            momentum = self.momentum
        if count == 0 or self.running_mean is None:
            return
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        unbiased = var * (count / (count - 1))
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside `model` (subclasses included, such as
    ``skipfast.nn.BatchNormAct2d``, whose ``activation`` is kept) with a
    :class:`SyncBatchNormAct2d` that shares its parameters and buffers (the same tensor
    objects) and its train/eval mode. Returns `model`, or the new module when `model`
    itself is a batch norm. Modules that already are ``SyncBatchNormAct2d`` are kept.
    """
    if isinstance(model, nn.BatchNorm2d) and not isinstance(model, SyncBatchNormAct2d):
        return _convert_one(model, process_group)
    for name, child in model.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(model, name, new)
    return model


def _convert_one(bn: nn.BatchNorm2d, process_group) -> SyncBatchNormAct2d:
    activation = getattr(bn, "activation", None)
    if activation not in ACTIVATIONS:
        raise ValueError(f"convert_sync_batchnorm: {type(bn).__name__}.activation must be 'relu' or None, "
                         f"got {activation!r}")
    return share_tensors(SyncBatchNormAct2d, bn, process_group=process_group, activation=activation)
