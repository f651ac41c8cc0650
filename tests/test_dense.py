import pytest
import torch
import torchvision
from torchvision.models.densenet import _DenseBlock

import skipfast
from skipfast.kernels import dense as tk
from skipfast.ops import dense as D

from helpers import assert_close_fp32, assert_low_precision_ok, backend, saved_bytes

CL = torch.channels_last


def _prefix(n=2, c=7, extra=5, h=5, w=6, dtype=torch.float32):
    """A channel prefix of a channels_last buffer, as a dense layer reads it."""
    buf = torch.randn(n, c + extra, h, w, dtype=dtype).to(memory_format=CL)
    return buf[:, :c]


def _affine(c, cout, dtype=torch.float32):
    return torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype), torch.randn(cout, c, 1, 1, dtype=dtype)


def _randomize_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return module


def _pair(c0=6, k=4, layers=3, bn_size=2, drop_rate=0.0, dtype=torch.float64):
    tv = _randomize_bn(_DenseBlock(layers, c0, bn_size, k, drop_rate).to(dtype))
    sf = skipfast.DenseBlock(c0, k, layers, bn_size=bn_size, drop_rate=drop_rate).to(dtype)
    sf.load_state_dict(tv.state_dict(), strict=True)
    return tv, sf


def _compare_modules(tv, sf, x, *, rtol=1e-10, atol=1e-10):
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ya, yb = tv(xa), sf(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=rtol, atol=atol)
    for (na, pa), (nb, pb) in zip(tv.named_parameters(), sf.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pb.grad, pa.grad, rtol=rtol, atol=atol, msg=lambda m: f"{na}: {m}")
    for (na, ba), (nb, bb) in zip(tv.named_buffers(), sf.named_buffers(), strict=True):
        assert na == nb
        torch.testing.assert_close(bb, ba, rtol=rtol, atol=atol, msg=lambda m: f"{na}: {m}")


# ---------------------------------------------------------------- the fused op


def test_extension_is_loaded():
    assert skipfast._backend.has_extension(), skipfast._backend.EXTENSION_ERROR
    assert D._impl(torch.device("cpu"), torch.float32) == "cpp"


@pytest.mark.parametrize("make", [
    lambda: _prefix(),                                        # prefix of a channels_last buffer, read in place
    lambda: torch.randn(2, 7, 5, 6),                          # NCHW contiguous
    lambda: torch.randn(2, 7, 6, 5).transpose(2, 3),          # neither: copied
    lambda: _prefix(n=1, c=3, extra=2, h=7, w=7),             # odd sizes
    lambda: _prefix(n=3, c=40, extra=9, h=9, w=11),           # several tiles, vector + scalar tails
])
def test_bn_relu_conv1x1_matches_reference(make):
    x64 = make().double()
    sc, sh, w = _affine(x64.shape[1], 5, torch.float64)
    ref = D.bn_relu_conv1x1_reference(x64, sc, sh, w)
    x = make()
    x.copy_(x64)
    y = skipfast.ops.bn_relu_conv1x1(x, sc.float(), sh.float(), w.float())
    assert_close_fp32(y, ref)
    assert y.is_contiguous(memory_format=CL)
    y64 = skipfast.ops.bn_relu_conv1x1(x64, sc, sh, w)
    torch.testing.assert_close(y64, ref, rtol=1e-12, atol=1e-12)


def test_bn_relu_conv1x1_tiles_many_rows():
    x = _prefix(n=2, c=300, extra=3, h=31, w=33, dtype=torch.float64)  # 2046 rows > one tile
    sc, sh, w = _affine(300, 17, torch.float64)
    torch.testing.assert_close(skipfast.ops.bn_relu_conv1x1(x, sc, sh, w), D.bn_relu_conv1x1_reference(x, sc, sh, w))


def test_backward_accumulates_into_shared_buffer():
    buf = torch.randn(2, 12, 9, 7, dtype=torch.float64).to(memory_format=CL)
    gbuf = torch.randn_like(buf)
    x, gx = buf[:, :9], gbuf[:, :9]
    sc, sh, w = _affine(9, 6, torch.float64)
    gy = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    before = gbuf.clone()
    gscale, gshift, gw = torch.ops.skipfast.dense_bn_relu_conv1x1_backward_(gy, x, sc, sh, w, gx)
    gx_ref = before[:, :9].clone()
    rs, rb, rw = D.bn_relu_conv1x1_backward_reference_(gy, x, sc, sh, w, gx_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gbuf[:, 9:], before[:, 9:], rtol=0, atol=0)  # the rest untouched
    torch.testing.assert_close(gscale, rs)
    torch.testing.assert_close(gshift, rb)
    torch.testing.assert_close(gw, rw)


def test_gradcheck_op():
    x = _prefix(n=2, c=5, extra=2, h=3, w=4, dtype=torch.float64).detach().requires_grad_()
    sc, sh, w = (t.requires_grad_() for t in _affine(5, 3, torch.float64))
    assert torch.autograd.gradcheck(skipfast.ops.bn_relu_conv1x1, (x, sc, sh, w))


def test_opcheck():
    x = _prefix(c=6, extra=3).detach()
    sc, sh, w = _affine(6, 4)
    torch.library.opcheck(torch.ops.skipfast.dense_bn_relu_conv1x1.default, (x, sc, sh, w))
    torch.library.opcheck(torch.ops.skipfast.dense_bn_relu_conv1x1.default,
                          (torch.randn(1, 6, 3, 3, requires_grad=True), sc.requires_grad_(), sh, w))
    torch.library.opcheck(torch.ops.skipfast.dense_channel_stats.default, (x,))
    gy = torch.randn(2, 4, 5, 6)
    gx = torch.zeros(2, 6, 5, 6).to(memory_format=CL)
    torch.library.opcheck(torch.ops.skipfast.dense_bn_relu_conv1x1_backward_.default, (gy, x, sc, sh, w, gx))


def test_compile_fullgraph_op():
    torch._dynamo.reset()
    sc, sh, w = _affine(6, 4)
    fn = torch.compile(lambda a: skipfast.ops.bn_relu_conv1x1(a * 2, sc, sh, w), fullgraph=True)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    fn(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    D.bn_relu_conv1x1_reference(x2 * 2, sc, sh, w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [5, 37])  # 37: two blocks of 16 channels and a tail
def test_channel_stats(dtype, c):
    """As accurate as torch.var_mean in the same dtype (float64: within 32 ulps, the rounding
    of sums of 270 terms), on a channel prefix whose mean is large and whose first value in
    each channel lies 5 standard deviations from the mean."""
    buf = torch.randn(3, c + 4, 9, 10, dtype=dtype).mul_(3).add_(100).to(memory_format=CL)
    buf[0, :, 0, 0] += 15
    x = buf[:, :c]
    mean, var = D.channel_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    eager_var, eager_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    for what, got, eager, ref in (("mean", mean, eager_mean, ref_mean), ("var", var, eager_var, ref_var)):
        assert got.dtype == dtype
        err = ((got.double() - ref) / ref).abs().max().item()
        err_eager = ((eager.double() - ref) / ref).abs().max().item()
        ulps = 1 if dtype == torch.float32 else 32
        assert err <= 2 * err_eager + ulps * torch.finfo(dtype).eps, f"{what}: relative error {err:.3g}, torch's {err_eager:.3g}"


@pytest.mark.parametrize("make", [lambda: _prefix(n=2, c=37, extra=8, h=5, w=7), lambda: torch.randn(1, 3, 7, 7)])
def test_triton_launcher_matches_reference(make):
    x = make()
    sc, sh, w = _affine(x.shape[1], 19)
    y = tk.bn_relu_conv1x1(x, sc, sh, w)
    assert y.is_contiguous(memory_format=CL)
    assert_close_fp32(y, D.bn_relu_conv1x1_reference(x.double(), sc.double(), sh.double(), w.double()), rtol=1e-4, atol=1e-4)


def test_op_bad_inputs():
    x = torch.randn(2, 6, 4, 4)
    sc, sh, w = _affine(6, 3)
    with pytest.raises(ValueError, match="skipfast.bn_relu_conv1x1: scale must be a \\[6\\]"):
        skipfast.ops.bn_relu_conv1x1(x, sc[:5], sh, w)
    with pytest.raises(ValueError, match="skipfast.bn_relu_conv1x1: weight must be"):
        skipfast.ops.bn_relu_conv1x1(x, sc, sh, torch.randn(3, 6, 3, 3))
    with pytest.raises(ValueError, match="x must be 4-D"):
        skipfast.ops.bn_relu_conv1x1(x[0], sc, sh, w)
    with pytest.raises(RuntimeError, match="grad_x is accumulated in place"):
        torch.ops.skipfast.dense_bn_relu_conv1x1_backward_(torch.randn(2, 3, 4, 4), x, sc, sh, w, torch.zeros(2, 6, 4, 4))


# ---------------------------------------------------------------- the block vs torchvision


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cl", [False, True])
def test_block_matches_torchvision_fp64(train, cl):
    tv, sf = _pair()
    tv.train(train), sf.train(train)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    if cl:
        x = x.to(memory_format=CL)
    _compare_modules(tv, sf, x)
    if train:  # a second step: running stats and num_batches_tracked keep matching
        _compare_modules(tv, sf, torch.randn(2, 6, 5, 5, dtype=torch.float64))
        assert int(sf.denselayer2.norm1.num_batches_tracked) == 2


def test_block_matches_torchvision_fp32_densenet_widths():
    tv, sf = _pair(c0=64, k=32, layers=4, bn_size=4, dtype=torch.float32)
    _compare_modules(tv, sf, torch.randn(2, 64, 9, 9), rtol=1e-4, atol=1e-4)


def test_block_momentum_none_and_untracked_stats():
    tv, sf = _pair()
    for m in list(tv.modules()) + list(sf.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    for _ in range(2):
        _compare_modules(tv, sf, torch.randn(3, 6, 4, 4, dtype=torch.float64))
    tv, sf = (skipfast.DenseBlock(5, 3, 2, bn_size=2).double() for _ in range(2))
    for blk in (tv, sf):
        for m in blk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    sf.load_state_dict(tv.state_dict())
    for train in (True, False):  # without running stats, eval uses batch statistics too
        tv.train(train), sf.train(train)
        x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with backend("reference"):
            ya = tv(xa)
            ya.backward(ya.detach())
        yb = sf(xb)
        yb.backward(yb.detach())
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)


def test_tutorial_layers_bn_size_none():
    tv = _randomize_bn(skipfast.DenseBlock(5, 3, 3, bn_size=None).double())
    sf = skipfast.DenseBlock(5, 3, 3, bn_size=None).double()
    sf.load_state_dict(tv.state_dict())
    for train in (True, False):
        tv.train(train), sf.train(train)
        x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
        with backend("reference"):
            xa = x.clone().requires_grad_()
            ya = tv(xa)
            ya.backward(torch.ones_like(ya) * torch.arange(ya.shape[1], dtype=ya.dtype).view(1, -1, 1, 1))
        xb = x.clone().requires_grad_()
        yb = sf(xb)
        yb.backward(torch.ones_like(yb) * torch.arange(yb.shape[1], dtype=yb.dtype).view(1, -1, 1, 1))
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)
        for (n, pa), pb in zip(tv.named_parameters(), sf.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, msg=n)
        for ba, bb in zip(tv.buffers(), sf.buffers()):
            torch.testing.assert_close(bb, ba)
        tv.zero_grad(), sf.zero_grad()


def test_block_dropout_matches_torchvision():
    tv, sf = _pair(drop_rate=0.3)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.manual_seed(1)
    xa = x.clone().requires_grad_()
    ya = tv(xa)
    torch.manual_seed(1)
    xb = x.clone().requires_grad_()
    yb = sf(xb)
    torch.testing.assert_close(yb, ya)
    assert (yb[:, 6:] == 0).any()  # dropout did drop
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(sf.denselayer1.conv1.weight.grad, tv.denselayer1.conv1.weight.grad)
    tv.eval(), sf.eval()  # no dropout in eval
    torch.testing.assert_close(sf(x), tv(x))


def test_block_gradcheck_input():
    sf = _randomize_bn(skipfast.DenseBlock(3, 2, 2, bn_size=2).double())
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sf, (x,), fast_mode=True)


def test_block_no_grad_and_out_buffer():
    tv, sf = _pair()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    tv.eval(), sf.eval()
    with torch.no_grad():
        ref = tv(x)
        torch.testing.assert_close(sf(x), ref)
        out = torch.zeros(2, 20, 5, 5, dtype=torch.float64).to(memory_format=CL)  # 2 spare channels
        y = sf(x, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:, :18], ref)
    assert (out[:, 18:] == 0).all()


def test_reference_backend_is_forced_by_env():
    tv, sf = _pair()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with backend("reference"):
        assert skipfast._backend.select("dense", x.device) == "reference"
        y = sf(x)
        assert y.is_contiguous()  # eager torch.cat path
    torch.testing.assert_close(y, tv(x))


# ---------------------------------------------------------------- models


def test_densenet121_matches_torchvision():
    """fp64: outputs, every gradient and running statistic, train then eval. fp32: the
    output's error against fp64 is within 2x of torchvision's own fp32 error."""
    torch.manual_seed(0)
    tv = _randomize_bn(torchvision.models.densenet121(num_classes=10)).double()
    sf = skipfast.models.densenet121(num_classes=10).double()
    sf.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # the last block sees 2x2 maps
    tv32 = torchvision.models.densenet121(num_classes=10)
    sf32 = skipfast.models.densenet121(num_classes=10)
    tv32.load_state_dict(tv.state_dict()), sf32.load_state_dict(tv.state_dict())
    assert_low_precision_ok(sf32(x.float()), tv32(x.float()), tv(x))  # train mode, fresh stats
    tv.load_state_dict(sf.state_dict())
    ya, yb = tv(x), sf(x)
    torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-9)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(tv.named_parameters(), sf.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-8, atol=1e-9, msg=lambda m: f"{n}: {m}")
    for (n, ba), bb in zip(tv.named_buffers(), sf.buffers()):
        torch.testing.assert_close(bb, ba, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    tv.eval(), sf.eval()
    with torch.no_grad():
        torch.testing.assert_close(sf(x), tv(x), rtol=1e-9, atol=1e-9)


def test_densenet_bc_100_trains():
    m = skipfast.models.densenet_bc_100(growth_rate=4)
    y = m(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


# ---------------------------------------------------------------- memory (device-independent)


def test_saved_bytes_quarter_of_eager_and_linear_growth():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 28, 28, requires_grad=True)
    eager, _ = saved_bytes(_DenseBlock(24, 64, 4, 32, 0.0), x)
    ours24, y = saved_bytes(skipfast.DenseBlock(64, 32, 24, bn_size=4), x)
    assert y.shape == (4, 64 + 24 * 32, 28, 28)
    ours48, _ = saved_bytes(skipfast.DenseBlock(64, 32, 48, bn_size=4), x)
    block_buffer = y.numel() * y.element_size()
    assert ours24 >= block_buffer  # the buffer itself is counted
    assert ours24 <= 0.25 * eager, f"{ours24 / 2**20:.1f} MiB vs eager {eager / 2**20:.1f} MiB"
    assert ours48 <= 2.2 * ours24, f"L=48 {ours48 / 2**20:.1f} MiB vs L=24 {ours24 / 2**20:.1f} MiB"


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=8, growth_rate=0, num_layers=2), "growth_rate must be a positive integer"),
    (dict(in_channels=8, growth_rate=-3, num_layers=2), "growth_rate must be a positive integer"),
    (dict(in_channels=8, growth_rate=4, num_layers=0), "num_layers must be a positive integer"),
])
def test_block_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=f"DenseBlock: {match}"):
        skipfast.DenseBlock(**kwargs)


def test_block_rejects_bad_inputs_and_keeps_state():
    blk = skipfast.DenseBlock(6, 4, 2, bn_size=2)
    state = {k: v.clone() for k, v in blk.state_dict().items()}
    with pytest.raises(ValueError, match="DenseBlock: x must have 6 channels, got 5"):
        blk(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="block buffer\\) is too small: 2 layers of growth 4 on 6 input channels "
                                         "need at least 14 channels, got 13"):
        blk(torch.randn(2, 6, 4, 4), out=torch.empty(2, 13, 4, 4).to(memory_format=CL))
    with pytest.raises(ValueError, match="out must be channels_last"):
        blk(torch.randn(2, 6, 4, 4), out=torch.empty(2, 14, 4, 4))
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor \\[2, >= 14, 4, 4\\]"):
        blk(torch.randn(2, 6, 4, 4), out=torch.empty(2, 14, 5, 4).to(memory_format=CL))
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        blk(torch.randn(1, 6, 1, 1))
    for k, v in blk.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_dense_block_op_rejects_mismatched_layers():
    blk = skipfast.DenseBlock(6, 4, 2, bn_size=2)
    with pytest.raises(ValueError, match="skipfast.dense_block: layer 1 must read 7 channels"):
        D.dense_block(blk.layers(), 4, torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match="skipfast.dense_block: growth_rate must be a positive integer, got 0"):
        D.dense_block(blk.layers(), 0, torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="layer 1 must produce growth_rate=5 channels, got 4"):
        D.dense_block(blk.layers(), 5, torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        D.dense_block([], 4, torch.randn(2, 6, 3, 3))
