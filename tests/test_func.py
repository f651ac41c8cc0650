"""torch.func transforms over skipfast modules: grad over functional_call (buffers passed
in, as nn.BatchNorm2d needs there), vmap, jacrev, nested and outer differentiation. Under
any transform every family runs its eager reference (skipfast/_backend.py)."""
import contextlib

import pytest
import torch
import torchvision
from torch.func import functional_call, grad, vmap

import skipfast
from skipfast import _backend

from helpers import backend


def _grads(module, x):
    """(parameter gradients, input gradient, updated buffers) of sum(module(x)^2) through
    torch.func.grad over functional_call."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    bufs = {k: v.clone() for k, v in module.named_buffers()}
    g_p, g_x = grad(lambda p, b, x: functional_call(module, (p, b), (x,)).square().sum(), argnums=(0, 2))(
        params, bufs, x)
    return g_p, g_x, bufs


def _randomize_bn(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("training", [True, False])
def test_grad_matches_torchvision(training):
    """A ResidualBlock (the residual tail, BN + ReLU + convolution, eval's apply) against
    torchvision's BasicBlock: gradients of the parameters and the input, running statistics."""
    torch.manual_seed(0)
    blk = skipfast.ResidualBlock(8).double()
    tv = torchvision.models.resnet.BasicBlock(8, 8).double()
    _randomize_bn(blk)
    tv.load_state_dict(blk.state_dict())
    blk.train(training), tv.train(training)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    g_p, g_x, bufs = _grads(blk, x)
    want_p, want_x, want_bufs = _grads(tv, x)
    torch.testing.assert_close(g_x, want_x)
    for k in want_p:
        torch.testing.assert_close(g_p[k], want_p[k])
    for k in want_bufs:
        torch.testing.assert_close(bufs[k], want_bufs[k])
    if training:
        assert int(bufs["bn1.num_batches_tracked"]) == 1


@pytest.mark.parametrize("forced", [None, "cpp"])
def test_transforms_run_the_reference(forced):
    """Under grad, vmap or jvp every family runs the reference, a forced backend too."""
    from torch.func import jvp

    seen = []
    x = torch.randn(2, 4, 3, 3)

    def probe(x):
        seen.append(_backend.select("bn_act", x.device))
        return x.sum()

    with backend(forced) if forced else contextlib.nullcontext():
        grad(probe)(x)
        vmap(probe)(x)
        jvp(probe, (x,), (x,))
    assert seen == ["reference"] * 3
    assert _backend.select("bn_act", x.device) == "cpp"  # outside the transforms


def test_vmap_and_per_sample_grads_in_eval():
    torch.manual_seed(0)
    blk = skipfast.ResidualBlock(8).double().eval()
    _randomize_bn(blk)
    tv = torchvision.models.resnet.BasicBlock(8, 8).double().eval()
    tv.load_state_dict(blk.state_dict())
    xs = torch.randn(4, 2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(vmap(blk)(xs), torch.stack([tv(x) for x in xs]))
    per_sample = vmap(grad(lambda x: blk(x).sum()))(xs)
    want = torch.stack([torch.autograd.grad(tv(x.requires_grad_()).sum(), x)[0] for x in xs.clone()])
    torch.testing.assert_close(per_sample, want)


@pytest.mark.parametrize("training", [True, False])
def test_second_derivatives_match_torch(training):
    """grad of grad runs the reference: torch's second derivatives of BN + add + ReLU."""
    torch.manual_seed(0)
    m = skipfast.BatchNormAct2d(4).double().train(training)
    ref = torch.nn.BatchNorm2d(4).double().train(training)
    _randomize_bn(m)
    ref.load_state_dict(m.state_dict())
    x, r = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)

    def hess_vec(fn, bufs):
        first = grad(lambda x, b: functional_call(fn, b, (x,), {"residual": r} if fn is m else {}).pow(3).sum())
        return grad(lambda x, b: first(x, b).square().sum())(x, bufs)

    class Ref(torch.nn.Module):  # relu(bn(x) + r), with bn's buffers under the same names
        def __init__(self):
            super().__init__()
            self.bn = ref

        def forward(self, x):
            return torch.relu(self.bn(x) + r)

    wrapped = Ref()
    got = hess_vec(m, {k: v.clone() for k, v in m.named_buffers()})
    want = hess_vec(wrapped, {k: v.clone() for k, v in wrapped.named_buffers()})
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want)


class _BnReluConv(torch.nn.Module):  # relu(bn(x)) into a convolution: then_conv in training
    def __init__(self, C, ref=False, track=True):
        super().__init__()
        bn = torch.nn.BatchNorm2d if ref else skipfast.BatchNormAct2d
        self.bn = bn(C, track_running_stats=track)
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.ref = ref

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x))) if self.ref else self.bn.then_conv(x, self.conv)


def _pair_of_modules(what):
    """(skipfast module, the torch function with the same weights, its buffers) for a what in
    _WHATS. Training without running statistics: transforms over a function that updates
    buffers it does not take as inputs are refused (by torch too)."""
    torch.manual_seed(0)
    training = what.startswith("train")
    if what.endswith("then_conv"):
        m, ref = _BnReluConv(4, track=not training).double(), _BnReluConv(4, ref=True, track=not training).double()
    else:
        m = skipfast.BatchNormAct2d(4, track_running_stats=not training).double()
        ref = torch.nn.BatchNorm2d(4, track_running_stats=not training).double()
    _randomize_bn(m)
    ref.load_state_dict(m.state_dict())
    m.train(training), ref.train(training)
    act = torch.relu if isinstance(ref, torch.nn.BatchNorm2d) else (lambda t: t)
    return m, (lambda x, b: act(functional_call(ref, b, (x,)))), {k: v.clone() for k, v in ref.named_buffers()}


_WHATS = ["train", "eval", "train-then_conv"]


@pytest.mark.parametrize("what", _WHATS)
def test_vjp_differentiated_later_matches_torch(what):
    """A vjp_fn taken under one grad level and differentiated afterwards (grad and jvp of it):
    torch's numbers (the kernels' backward would have given zeros here)."""
    from torch.func import jvp, vjp

    m, ref, ref_bufs = _pair_of_modules(what)
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    v, t = torch.randn_like(x), torch.randn_like(x)
    results = []
    for f, b in ((lambda x, b: functional_call(m, b, (x,)), bufs), (ref, ref_bufs)):
        _, vjp_fn = vjp(lambda x: f(x, b).pow(3), x)
        results.append((grad(lambda v: vjp_fn(v)[0].square().sum())(v), jvp(lambda v: vjp_fn(v)[0], (v,), (t,))[1]))
    for got, want in zip(*results):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("what", _WHATS)
def test_plain_autograd_over_torch_func_grad_matches_torch(what):
    """MAML-style: ordinary autograd through the gradient torch.func.grad returned."""
    m, ref, ref_bufs = _pair_of_modules(what)
    bufs = {k: v.clone() for k, v in m.named_buffers()}
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    results = []
    for f, b in ((lambda x, b: functional_call(m, b, (x,)), bufs), (ref, ref_bufs)):
        x = x0.clone().requires_grad_()
        g = grad(lambda x: f(x, b).pow(3).sum() + x.pow(3).sum())(x)
        results.append(torch.autograd.grad(g.square().sum(), x)[0])
    torch.testing.assert_close(*results)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make", [
    pytest.param(lambda: (skipfast.DenseBlock(8, 4, 3, bn_size=2), (2, 8, 6, 6)), id="dense"),
    pytest.param(lambda: (skipfast.Highway2d(8), (2, 8, 4, 4)), id="highway2d"),
    pytest.param(lambda: (skipfast.UNet(3, 2, base_channels=4, depth=2), (1, 3, 16, 16)), id="unet"),
    pytest.param(lambda: (skipfast.patch(torchvision.models.resnet18(num_classes=4)), (2, 3, 32, 32)),
                 id="patched-resnet18"),
])
def test_other_modules_under_grad_match_autograd(make, training):
    """torch.func.grad over the other skipfast modules and a patched torchvision model gives
    the gradients of plain autograd through the same module."""
    torch.manual_seed(0)
    module, shape = make()
    module = module.double().train(training)
    _randomize_bn(module)
    x = torch.randn(shape, dtype=torch.float64)
    g_p, g_x, _ = _grads(module, x)
    xr = x.clone().requires_grad_()
    module(xr).square().sum().backward()
    torch.testing.assert_close(g_x, xr.grad, rtol=1e-5, atol=1e-8)
    for k, p in module.named_parameters():
        torch.testing.assert_close(g_p[k], p.grad, rtol=1e-5, atol=1e-8)


def test_jacrev_matches_torch():
    from torch.func import jacrev

    torch.manual_seed(0)
    m, ref = skipfast.BatchNormAct2d(3).double(), torch.nn.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    got = jacrev(lambda x, b: functional_call(m, b, (x,)))(x, {k: v.clone() for k, v in m.named_buffers()})
    want = jacrev(lambda x, b: torch.relu(functional_call(ref, b, (x,))))(
        x, {k: v.clone() for k, v in ref.named_buffers()})
    torch.testing.assert_close(got, want)
