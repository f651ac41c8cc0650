"""torch.func transforms over skipfast modules: grad over functional_call (buffers passed
in, as nn.BatchNorm2d needs there), vmap, nested grad. Under a single grad level bn_act runs
its kernels; every other case runs the eager references (skipfast/_backend.py)."""
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
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", ["cpp", pytest.param("triton", marks=pytest.mark.skipif(
    not _backend.has_triton(), reason="triton is not installed"))])
@pytest.mark.parametrize("training", [True, False])
def test_grad_matches_torchvision(name, training):
    """A ResidualBlock (the residual tail, BN + ReLU + convolution, eval's apply) against
    torchvision's BasicBlock: gradients of the parameters and the input, running statistics."""
    torch.manual_seed(0)
    dt = torch.float64 if name == "cpp" else torch.float32  # the Triton kernels compute in float32
    tol = dict(rtol=1e-7, atol=1e-9) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    blk, tv = skipfast.ResidualBlock(8).to(dt), torchvision.models.resnet.BasicBlock(8, 8).to(dt)
    _randomize_bn(blk)
    tv.load_state_dict(blk.state_dict())
    blk.train(training), tv.train(training)
    x = torch.randn(3, 8, 5, 5, dtype=dt)
    with backend(name):
        g_p, g_x, bufs = _grads(blk, x)
    want_p, want_x, want_bufs = _grads(tv, x)
    torch.testing.assert_close(g_x, want_x, **tol)
    for k in want_p:
        torch.testing.assert_close(g_p[k], want_p[k], **tol)
    for k in want_bufs:
        torch.testing.assert_close(bufs[k], want_bufs[k], **tol)
    if training:
        assert int(bufs["bn1.num_batches_tracked"]) == 1


def test_single_grad_level_runs_the_kernels():
    """Under one grad level bn_act keeps its kernels (the fused backward phases run);
    under vmap or a second grad level it runs the reference."""
    seen = []
    real = _backend._kernels_under_transforms

    def spy(family):
        seen.append(real(family))
        return seen[-1]

    x = torch.randn(2, 4, 3, 3)
    m = skipfast.BatchNormAct2d(4, track_running_stats=False)
    _backend._kernels_under_transforms = spy
    try:
        grad(lambda x: m(x).sum())(x)
        assert seen and all(seen)
        seen.clear()
        vmap(grad(lambda x: m(x).sum()))(x[None].expand(2, -1, -1, -1, -1).clone())
        assert seen and not any(seen)
    finally:
        _backend._kernels_under_transforms = real
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


class _BnReluConv(torch.nn.Module):
    def __init__(self, C):
        super().__init__()
        self.bn, self.conv = skipfast.BatchNormAct2d(C), torch.nn.Conv2d(C, C, 3, padding=1, bias=False)

    def forward(self, x):
        return self.bn.then_conv(x, self.conv)


@pytest.mark.parametrize("what", ["train", "eval", "train-then_conv"])
def test_forced_kernels_refuse_second_derivatives(what):
    """With SKIPFAST_BACKEND=cpp the kernels run under nested grad too; their backward is not
    differentiable, so the outer grad is an error, not a wrong number (it came back as zeros)."""
    m = (_BnReluConv(4) if what.endswith("then_conv") else skipfast.BatchNormAct2d(4)).double()
    m.train(what.startswith("train"))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    bufs = {k: v.clone() for k, v in m.named_buffers()}

    def first(x, b):  # d(loss)/dx
        return grad(lambda x, b: functional_call(m, b, (x,)).square().sum())(x, b)

    with backend("cpp"), pytest.raises(RuntimeError, match="second derivatives are not supported"):
        grad(lambda x, b: first(x, b).square().sum())(x, bufs)


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


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the backward phases, vmapped by a loop
def test_jacrev_matches_torch():
    """jacrev: the forward under one grad level (the kernels), the backward vmapped over the
    output's basis."""
    from torch.func import jacrev

    torch.manual_seed(0)
    m, ref = skipfast.BatchNormAct2d(3).double(), torch.nn.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    got = jacrev(lambda x, b: functional_call(m, b, (x,)))(x, {k: v.clone() for k, v in m.named_buffers()})
    want = jacrev(lambda x, b: torch.relu(functional_call(ref, b, (x,))))(
        x, {k: v.clone() for k, v in ref.named_buffers()})
    torch.testing.assert_close(got, want)
