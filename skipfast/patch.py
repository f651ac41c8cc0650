"""``skipfast.patch(model)``: run an existing model through skipfast's fused paths.

Two ways, tried in this order:

1. Graph pass (torch.fx): trace the model and rewrite every
   ``conv -> BN (-> + residual) (-> ReLU)`` and ``BN (-> + residual) -> ReLU`` chain into
   one skipfast call, whatever the classes are named and however the model writes the add
   (``out += identity``, ``out = out + identity``, ``torch.add``) and the ReLU (``nn.ReLU``,
   ``F.relu``, ``torch.relu``, ``.relu()``). An in-place add into the other tensor
   (``identity += out``) is left to the model, and so, at run time, is a residual that
   broadcasts or has another dtype or device than the BN's output. The result is a
   ``torch.fx.GraphModule`` that shares the model's parameters and buffers under the same
   state_dict keys.
2. Class swap, for models fx cannot trace: torchvision ``BasicBlock`` / ``Bottleneck`` are
   replaced in place by skipfast's ``ResidualBlock`` / ``BottleneckBlock`` holding the same
   parameter and buffer tensors.

In eval mode (no grad needed) a fused conv+BN runs with BN folded into the convolution
(``conv2d_bias_act``: bias, residual and ReLU in the convolution's epilogue); in training
it runs the convolution and skipfast's fused batch norm (+ residual) + ReLU.
Everything not recognised is left untouched and listed in the report, and so is a BN (or
block) with module hooks or a parametrization, such as one pruned with
``torch.nn.utils.prune``: their tensors are only valid through their own forward.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._layout import conv_output_shape
from .fold import FoldedConvBN, can_fold, reads_directly
from .nn.batchnorm import BatchNormAct2d

log = logging.getLogger("skipfast")


@dataclasses.dataclass
class PatchReport:
    path: str  # "fx", "classes" or "none"
    replaced: list[str] = dataclasses.field(default_factory=list)
    untouched: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""

    def __str__(self) -> str:
        lines = [f"skipfast.patch: {len(self.replaced)} replaced via the {self.path} path" +
                 (f" ({self.reason})" if self.reason else "")]
        lines += [f"  replaced  {r}" for r in self.replaced]
        lines += [f"  untouched {u}" for u in self.untouched]
        return "\n".join(lines)


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)) + residual)`` over a conv and a BN owned by the patched model.
    They are referenced, not registered, so the state_dict keeps the model's keys. The
    batch norm runs as a ``BatchNormAct2d`` over the BN's own tensors, refreshed on each
    call (``.to()`` replaces buffer tensors; ``.train()`` flips the BN's mode). A BN given
    module hooks or a parametrization (``torch.nn.utils.prune``, ``parametrize``) after
    patching runs as itself, unfused; a conv with them is called, not folded. (patch leaves
    a BN that has them at patch time unfused.)"""

    def __init__(self, conv: nn.Conv2d | None, bn: nn.BatchNorm2d, activation: str | None, add_inplace: bool = False):
        super().__init__()
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "bn", bn)
        object.__setattr__(self, "_bn_act", BatchNormAct2d.shared_from(bn, activation))
        self.activation = activation
        self.add_inplace = add_inplace  # the model's add was `out += residual`
        self._fold = FoldedConvBN()

    def _fused_bn(self) -> BatchNormAct2d:
        view, bn = self._bn_act, self.bn
        view.training = bn.training
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            t = getattr(bn, name)
            if getattr(view, name) is t:
                continue
            if name in bn._parameters or name in bn._buffers:
                # into the view's dicts: torch.func.functional_call puts plain tensors in the
                # BN's dicts where the view registers parameters
                (view._parameters if name in view._parameters else view._buffers)[name] = t
            else:  # set on the BN by hand, outside its dicts
                setattr(view, name, t)
        return view

    def _unfused(self, y: torch.Tensor, residual) -> torch.Tensor:
        """The model's own ops on the conv's output y."""
        y = self.bn(y)
        if residual is not None:
            y = y.add_(residual) if self.add_inplace else y + residual
        return torch.relu(y) if self.activation == "relu" else y

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not reads_directly(self.bn):  # e.g. pruned or parametrized after patching
            return self._unfused(x if self.conv is None else self.conv(x), residual)
        if self.conv is None:
            return self._fused_bn()(x, residual) if _fits(residual, x, x.shape) else self._unfused(x, residual)
        conv = self.conv
        if can_fold(conv, self.bn, x) and (residual is None or _fits(
                residual, x, conv_output_shape(x.shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation))):
            return self._fold(conv, self.bn, x, residual, self.activation)
        y = conv(x)
        return self._fused_bn()(y, residual) if _fits(residual, y, y.shape) else self._unfused(y, residual)

    def extra_repr(self) -> str:
        return f"conv={self.conv is not None}, activation={self.activation!r}"


def _fits(residual, y: torch.Tensor, shape) -> bool:
    """Whether the fused ops take `residual` for an output `y` of `shape`: none, or a tensor
    of that shape with y's dtype and device. Any other (one that broadcasts or promotes, a
    number) runs the model's own add."""
    return residual is None or (isinstance(residual, torch.Tensor) and residual.shape == shape
                                and residual.dtype == y.dtype and residual.device == y.device)


# ---------------------------------------------------------------- fx path

_RELU_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu_}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def _module(gm, node, types):
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if type(m) in types else None


def _is_relu(gm, node) -> bool:
    if _module(gm, node, (nn.ReLU,)) is not None:
        return True
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _residual_of(node, operand):
    """(the other operand, whether the add is in place) if `node` adds `operand` to another
    tensor, else None. An in-place add counts only where it writes into `operand`
    (``out += identity``): one into the other tensor (``identity += out``) changes a tensor
    the model may read again."""
    if node.op == "call_function" and node.target in _ADD_FUNCS and not node.kwargs.get("alpha"):
        inplace = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs.get("alpha"):
        inplace = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or node.kwargs.keys() - {"alpha"}:
        return None
    a, b = node.args
    other = b if a is operand else a if b is operand and not inplace else None
    return (other, inplace) if isinstance(other, fx.Node) and other is not operand else None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rewrite(gm: fx.GraphModule) -> list[str]:
    replaced = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node, (nn.BatchNorm2d,))  # exact type: not a subclass with its own forward
        if bn is None or not reads_directly(bn):
            continue
        src = node.args[0]
        conv = _module(gm, src, (nn.Conv2d,)) if isinstance(src, fx.Node) else None
        if conv is not None and (len(src.users) != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            conv = None
        chain, last, residual, act, inplace = [node], node, None, None, False
        user = _only_user(last)
        if user is not None and (found := _residual_of(user, last)) is not None:
            chain.append(user)
            last, (residual, inplace) = user, found
            user = _only_user(last)
        if user is not None and _is_relu(gm, user):
            chain.append(user)
            last, act = user, "relu"
        if conv is None and act is None:
            continue
        name = f"skipfast_fused_{len(replaced)}"
        gm.add_submodule(name, ConvBNAct(conv, bn, act, inplace))
        with gm.graph.inserting_before(last):
            x = src.args[0] if conv is not None else src
            new = gm.graph.call_module(name, (x, residual) if residual is not None else (x,))
        last.replace_all_uses_with(new)
        for n in reversed(([src] if conv is not None else []) + chain):
            gm.graph.erase_node(n)
        parts = ([src.target] if conv is not None else []) + [node.target] + (["+ residual"] if residual is not None else []) + (["relu"] if act else [])
        replaced.append(" -> ".join(parts))
    gm.graph.lint()
    gm.recompile()
    return replaced


# ---------------------------------------------------------------- class path

def _swap_blocks(model: nn.Module, dense_blocks: bool = True, residual_blocks: bool = True) -> list[tuple]:
    """Plan the class swap without touching the model: (parent, attribute, new module,
    qualified name, old class name)."""
    from torchvision.models.densenet import _DenseBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from .nn.blocks import BottleneckBlock, ResidualBlock
    from .nn.dense import DenseBlock

    plan = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if not residual_blocks and type(child) is not _DenseBlock:
                continue
            if not all(reads_directly(m) for m in child.modules()):  # e.g. a pruned BN
                continue
            if type(child) is BasicBlock and child.conv1.groups == 1 and child.conv1.dilation == (1, 1):
                new = ResidualBlock.shared_from(child)
            elif type(child) is Bottleneck and child.conv2.groups == 1 and child.conv2.dilation == (1, 1) \
                    and child.conv1.out_channels * 4 == child.conv3.out_channels:
                new = BottleneckBlock.shared_from(child)
            elif type(child) is _DenseBlock and dense_blocks and child.denselayer1.drop_rate == 0:
                new = DenseBlock.shared_from(child)
            else:
                continue
            plan.append((mod, child_name, new, full, child))
    return plan


def _untouched_bns(model: nn.Module, covered: set[int]) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in covered]


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, with skipfast's own modules kept whole (already fused)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("skipfast.") or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def _apply(plan) -> None:
    for parent, attr, new, _, _ in plan:
        setattr(parent, attr, new)


def _undo(plan) -> None:
    for parent, attr, _, _, old in plan:
        setattr(parent, attr, old)


def _describe(plan) -> list[str]:
    return [f"{full} ({type(old).__name__} -> {type(new).__name__})" for _, _, new, full, old in plan]


def patch(model: nn.Module, *, inplace: bool = True, report: bool = False, use_fx: bool = True):
    """Route ``model``'s conv/BN/add/ReLU chains through skipfast. Returns the patched model
    (a GraphModule on the fx path), or ``(model, PatchReport)`` with ``report=True``.

    torchvision DenseNet blocks are always swapped in place for skipfast's concat-free
    ``DenseBlock`` (no graph rewrite can remove the concatenation)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"skipfast.patch: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    dense = _swap_blocks(model, dense_blocks=True, residual_blocks=False)
    _apply(dense)
    result, rep, reason = model, None, "fx disabled by the caller"
    try:
        if use_fx:
            try:
                gm = _trace(model)
            except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the class path
                reason = f"fx could not trace {type(model).__name__}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            else:
                gm.train(model.training)
                replaced = _rewrite(gm)
                covered = {id(m.bn) for m in gm.modules() if isinstance(m, ConvBNAct)}
                covered |= {id(m) for _, _, new, _, _ in dense for m in new.modules()}
                rep = PatchReport("fx", _describe(dense) + replaced, _untouched_bns(gm, covered))
                result = gm if replaced else model
        if rep is None:
            plan = _swap_blocks(model, dense_blocks=False)
            _apply(plan)
            covered = {id(m) for _, _, new, _, _ in dense + plan for m in new.modules()}
            rep = PatchReport("classes", _describe(dense + plan), _untouched_bns(model, covered), reason)
    except BaseException:
        _undo(dense)  # nothing half-patched after an error
        raise
    if not rep.replaced:
        rep.path = "none"
        log.warning("skipfast.patch: nothing recognised in %s; the model is unchanged", type(model).__name__)
    else:
        log.info("%s", rep)
    return (result, rep) if report else result
