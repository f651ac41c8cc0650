import copy

import pytest
import torch

import skipfast
from skipfast.ops.bn_act import batch_norm_act, batch_norm_act_reference

from helpers import assert_close_fp32, assert_low_precision_ok, backend, saved_bytes

CL = torch.channels_last


def _params(C, dtype=torch.float64, affine=True):
    if not affine:
        return None, None
    return torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)


def _x(shape, dtype=torch.float64, cl=False, scale=1.0, offset=0.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + offset
    x = x.to(dtype)
    return x.to(memory_format=CL) if cl else x


def _run(fn, x, w, b, rm, rv, r, **kw):
    """Forward + backward through fn; returns output and gradients of (x, w, b, r)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    x_, w_, b_, r_ = leaves
    y = fn(x_, w_, b_, rm, rv, residual=r_, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(g.to(y.dtype))
    return y, [t.grad if t is not None else None for t in leaves], g


SHAPES = [(2, 3, 7, 7), (4, 16, 5, 5), (3, 10, 3, 3), (2, 20, 9, 9)]


def test_extension_is_loaded():
    assert skipfast._backend.has_extension(), skipfast._backend.EXTENSION_ERROR
    assert skipfast._backend.select("bn_act", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual, activation, affine", [(True, "relu", True), (False, "relu", True),
                                                          (True, None, False), (False, None, True)])
def test_training_forward_backward_fp32(shape, cl, residual, activation, affine):
    C = shape[1]
    x = _x(shape, cl=cl)
    r = _x(shape, cl=cl) if residual else None
    w, b = _params(C, affine=affine)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm32, rv32 = rm.float(), rv.float()
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    y, grads, g = _run(batch_norm_act, f32(x), f32(w), f32(b), rm32, rv32, f32(r), training=True,
                       activation=activation)
    y_ref, grads_ref, _ = _run(batch_norm_act_reference, x, w, b, rm, rv, r, training=True, activation=activation)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert_close_fp32(y, y_ref)
    torch.testing.assert_close(rm32.double(), rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv32.double(), rv, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref):
        if want is None:
            assert got is None
        else:
            assert_close_fp32(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (2, 10, 3, 3), (1, 20, 1, 1)])
def test_eval_forward_backward_fp32(shape, cl):
    C = shape[1]
    x, r = _x(shape, cl=cl), _x(shape, cl=cl)
    w, b = _params(C)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    y, grads, _ = _run(batch_norm_act, x.float(), w.float(), b.float(), rm.float(), rv.float(), r.float(),
                       training=False)
    y_ref, grads_ref, _ = _run(batch_norm_act_reference, x, w, b, rm, rv, r, training=False)
    assert_close_fp32(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert_close_fp32(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cl", [False, True])
def test_eval_without_grad_matches_reference(dtype, cl):
    """Eval with no gradient wanted runs one C++ call (invstd of the running variance, then
    the apply kernel below autograd): output against float64, low precision by the relative
    rule, float32 per-channel tensors for every input dtype but float64 (as under autocast)."""
    shape = (3, 12, 5, 7)
    x, r = _x(shape, cl=cl), _x(shape, cl=cl)
    w, b = _params(12)
    rm, rv = torch.randn(12, dtype=torch.float64), torch.rand(12, dtype=torch.float64) + 0.5
    y_ref = batch_norm_act_reference(x, w, b, rm, rv, training=False, residual=r)
    args = tuple(t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in (w, b, rm, rv))
    with torch.no_grad():
        y = batch_norm_act(x.to(dtype), *args, training=False, residual=r.to(dtype))
        y_eager = batch_norm_act_reference(x.to(dtype), *args, training=False, residual=r.to(dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    if dtype in (torch.float16, torch.bfloat16):
        assert_low_precision_ok(y, y_eager, y_ref)
    else:
        assert_close_fp32(y, y_ref)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cl", [False, True])
def test_gradcheck(training, cl):
    x = _x((2, 3, 4, 5), cl=cl).requires_grad_()
    r = _x((2, 3, 4, 5)).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(3))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x, w, b, r):
        return batch_norm_act(x, w, b, None if training else rm, None if training else rv, training=training,
                              residual=r)

    assert torch.autograd.gradcheck(fn, (x, w, b, r))


def test_apply_gradcheck_for_statistics():
    """bn_act_apply's backward also differentiates mean and invstd (a sync BN composes it)."""
    x = _x((2, 3, 4, 4)).requires_grad_()
    r = _x((2, 3, 4, 4)).requires_grad_()
    mean = torch.randn(3, dtype=torch.float64, requires_grad=True)
    invstd = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(3))

    def fn(x, mean, invstd, w, b, r):
        return torch.ops.skipfast.bn_act_apply(x, mean, invstd, w, b, r, True)[0]

    assert torch.autograd.gradcheck(fn, (x, mean, invstd, w, b, r))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("C", [12, 40])
def test_low_precision(dtype, cl, C):
    shape = (4, C, 6, 6)
    x, r = _x(shape, cl=cl), _x(shape, cl=cl)
    w, b = _params(C)
    y_ref, grads_ref, g = _run(batch_norm_act_reference, x, w, b, None, None, r, training=True)
    lo = lambda t: t.to(dtype)  # noqa: E731
    w32, b32 = w.float(), b.float()  # mixed precision: fp32 parameters, low-precision activations

    def run(fn):
        leaves = [lo(x).requires_grad_(), lo(r).requires_grad_()]
        ww, bb = w32.clone().requires_grad_(), b32.clone().requires_grad_()
        y = fn(leaves[0], ww, bb, None, None, training=True, residual=leaves[1])
        y.backward(lo(g))
        return y, [leaves[0].grad, ww.grad, bb.grad, leaves[1].grad]

    y, grads = run(batch_norm_act)
    y_eager, grads_eager = run(batch_norm_act_reference)
    assert y.dtype == dtype
    assert_low_precision_ok(y, y_eager, y_ref)
    for got, eager, want in zip(grads, grads_eager, grads_ref):
        assert_low_precision_ok(got, eager, want)


def test_large_mean_small_std_is_stable():
    """Per-channel mean 1e4, std 1e-2: the statistics match float64 (a sum-of-squares
    variance would be all rounding error) and the output is as good as eager fp32."""
    for cl in (False, True):
        x32 = _x((4, 8, 10, 10), dtype=torch.float32, cl=cl, scale=1e-2, offset=1e4)
        x64 = x32.double()
        mean, var = torch.ops.skipfast.bn_act_stats(x32)
        torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-7, atol=0)
        torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
        ref = batch_norm_act_reference(x64, None, None, None, None, training=True)
        y = batch_norm_act(x32, None, None, None, None, training=True)
        eager = batch_norm_act_reference(x32, None, None, None, None, training=True)
        assert_low_precision_ok(y, eager, ref)


def _cuda_param(shape):
    return pytest.param("cuda", shape, marks=pytest.mark.gpu)


# CUDA shapes: NCHW with one block per channel (7x7) or split over blocks (56x56, 61x61 in
# scalar loads), channels_last split over row blocks (7x7, 56x56) or in one (4x4), C = 3
# and 3721 rows in scalar loads
@pytest.mark.parametrize("impl, shape", [("cpu", (8, 64, 4, 4)), ("cpu", (32, 128, 8, 8)), ("cpu", (32, 512, 7, 7)),
                                         ("cpu", (5, 2048, 3, 3)),
                                         ("cpu", (4, 20, 40, 40)), ("triton", (8, 64, 4, 4)),
                                         ("triton", (4, 20, 40, 40)), _cuda_param((8, 64, 4, 4)),
                                         _cuda_param((32, 512, 7, 7)), _cuda_param((32, 64, 56, 56)),
                                         _cuda_param((6, 3, 61, 61))])
@pytest.mark.parametrize("cl", [False, True])
def test_statistics_as_accurate_as_torch(impl, shape, cl, device):
    """float32 mean and variance within 8 ulps (relative) of float64's, also where the first
    value of every channel in memory lies 5 standard deviations from the channel's mean.
    (Measured: at most 4.5 ulps for the CPU kernels, 1.9 for Triton; eager BatchNorm2d's own
    statistics up to 11 ulps on channels_last. The sums are shifted by a mean of each
    channel's first values: shifted by the first value alone they were off by up to 190
    ulps here.) Triton runs on the GPU when there is one, else under the interpreter."""
    if impl == "triton" and not skipfast._backend.has_triton():
        pytest.skip("triton is not installed")
    if impl == "cuda" and not skipfast._backend.has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    x = _x(shape, dtype=torch.float32, offset=2.0)
    x[0, :, 0, 0] += 5
    x = x.contiguous(memory_format=CL) if cl else x
    if impl == "cpu":
        mean, var = torch.ops.skipfast.bn_act_stats(x)
    elif impl == "cuda":
        mean, var = (t.cpu() for t in torch.ops.skipfast.bn_act_stats(x.cuda()))
    else:
        from skipfast.kernels import bn_act as tk

        mean, var = (t.cpu() for t in tk.stats(x.to(device)))
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    ulp = torch.finfo(torch.float32).eps
    for what, got, ref in (("mean", mean, ref_mean), ("var", var, ref_var)):
        err = ((got.double() - ref) / ref).abs().max().item()
        assert err <= 8 * ulp, f"{what}: relative error {err:.3g} ({err / ulp:.1f} ulps)"


def test_non_contiguous_inputs():
    x = _x((2, 6, 8, 10), dtype=torch.float32)[:, ::2, :, 1:9]
    r = _x((2, 3, 8, 8), dtype=torch.float32).transpose(2, 3)
    w, b = (t.float() for t in _params(3))
    w_nc = torch.stack([w, w], 1)[:, 0]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL) and not w_nc.is_contiguous()
    for training in (True, False):
        rm, rv = torch.zeros(3), torch.ones(3)
        y = batch_norm_act(x, w_nc, b, rm.clone(), rv.clone(), training=training, residual=r)
        y_ref = batch_norm_act_reference(x.double(), w.double(), b.double(), rm.double(), rv.double(),
                                         training=training, residual=r.double())
        assert_close_fp32(y, y_ref)


def test_mask_is_bit_packed():
    for cl in (False, True):
        x = _x((3, 5, 3, 3), dtype=torch.float32, cl=cl)
        out, mean, var, invstd, mask = torch.ops.skipfast.bn_act_train(x, None, None, None, 1e-5, True)
        assert mask.dtype == torch.uint8 and mask.numel() == (x.numel() + 7) // 8
        z = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        flat = (z > 0).permute(0, 2, 3, 1).reshape(-1) if cl else (z > 0).reshape(-1)
        bits = torch.stack([(mask >> k) & 1 for k in range(8)], 1).reshape(-1)[: x.numel()].bool()
        assert torch.equal(bits, flat)
        assert torch.equal(out, torch.relu(z).to(memory_format=CL if cl else torch.contiguous_format))
        _, no_mask = torch.ops.skipfast.bn_act_apply(x, mean, invstd, None, None, None, False)
        assert no_mask.numel() == 0


@pytest.mark.parametrize("shape", [(6, 3, 61, 61), (5, 13, 2, 3), (40, 11, 1, 1), (4, 20, 25, 25), (3, 40, 29, 31),
                                   (3, 1032, 3, 5)])
@pytest.mark.parametrize("cl", [False, True])
def test_odd_shapes_across_parallel_chunks(shape, cl):
    """Shapes whose planes (NCHW) or rows (channels_last) are not multiples of 8 elements
    (mask bits at every offset, partial vector groups) and, for the larger ones, several
    parallel chunks: the mask bits, output and gradients against float64, fp32 and fp64.
    C = 40 channels_last: reductions in tiles of 32 + 8 channels over row blocks; C = 1032:
    tiles of 4 rows (a tile's minimum) over 45 rows, the last tile of one row."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x, r = _x(shape, dtype=dtype, cl=cl), _x(shape, dtype=dtype, cl=cl)
        w, b = (t.to(dtype) for t in _params(shape[1]))
        y, grads, g = _run(batch_norm_act, x, w, b, None, None, r, training=True)
        y_ref, grads_ref, _ = _run(batch_norm_act_reference, x.double(), w.double(), b.double(), None, None,
                                   r.double(), training=True)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        assert_close_fp32(y, y_ref, **tol)
        for got, want in zip(grads, grads_ref):
            assert_close_fp32(got, want, **tol)
        out, mean, var, invstd, mask = torch.ops.skipfast.bn_act_train(x, w, b, r, 1e-5, True)
        assert_close_fp32(out, y_ref, **tol)
        # bit i of the mask is element i of out (in memory order) being > 0
        flat = (out > 0).permute(0, 2, 3, 1).reshape(-1) if cl else (out > 0).reshape(-1)
        bits = torch.stack([(mask >> k) & 1 for k in range(8)], 1).reshape(-1)
        assert torch.equal(bits[: x.numel()].bool(), flat)
        assert not bits[x.numel():].any()


@pytest.mark.parametrize("C, cl", [(64, False), (64, True), (20, True)])
def test_large_passes_with_streaming_stores(C, cl):
    """float32 passes write with streaming stores (CPU) once they move 8 MiB (training) or
    32 MiB (the apply op); these shapes stream in every pass. NCHW,
    channels_last with 32-byte aligned rows (C = 64) and with rows that are not (C = 20,
    whose misaligned groups take ordinary stores). Output, mask and gradients against float64."""
    torch.manual_seed(0)
    shape = (3, C, 128, 128) if C == 64 else (3, C, 240, 240)  # 3 tensors of x's size >= 32 MiB
    x, r = _x(shape, dtype=torch.float32, cl=cl), _x(shape, dtype=torch.float32, cl=cl)
    w, b = (t.float() for t in _params(C))
    y, grads, _ = _run(batch_norm_act, x, w, b, None, None, r, training=True)
    y_ref, grads_ref, _ = _run(batch_norm_act_reference, x.double(), w.double(), b.double(), None, None,
                               r.double(), training=True)
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert_close_fp32(y, y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref):
        assert_close_fp32(got, want, rtol=1e-4, atol=1e-4)
    # eval: one apply pass
    rm, rv = torch.randn(C) * 0.1, torch.rand(C) + 0.5
    ye = batch_norm_act(x, w, b, rm, rv, training=False, residual=r)
    ye_ref = batch_norm_act_reference(x.double(), w.double(), b.double(), rm.double(), rv.double(), training=False,
                                      residual=r.double())
    assert_close_fp32(ye, ye_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(100, 24, 7, 7), (70, 10, 3, 5), (4, 3, 1, 9)])
def test_small_planes_sums_across_folds_and_tasks(shape):
    """NCHW planes under 128 elements: per-channel accumulators over channel ranges (several
    parallel tasks), folded into double mid-way when N * H * W passes 4096, partial groups
    when H * W % 8 != 0. Statistics and both backward sums against float64."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    dy = torch.randn(shape)
    mean, var = torch.ops.skipfast.bn_act_stats(x)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-6, atol=1e-6)
    invstd = (var + 1e-5).rsqrt()
    out, _, _, _, mask = torch.ops.skipfast.bn_act_train(x, None, None, None, 1e-5, True)
    sum_dy, sum_dy_xhat = torch.ops.skipfast.bn_act_backward_reduce(dy, x, mean, invstd, mask)
    g = dy.double() * (out > 0).double()
    xhat = (x.double() - mean.double()[:, None, None]) * invstd.double()[:, None, None]
    torch.testing.assert_close(sum_dy.double(), g.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_dy_xhat.double(), (g * xhat).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


def _sample_inputs():
    for cl in (False, True):
        for relu in (True, False):
            x = _x((2, 3, 5, 5), dtype=torch.float32, cl=cl)
            r = _x((2, 3, 5, 5), dtype=torch.float32, cl=cl)
            w, b = (t.float() for t in _params(3))
            yield cl, relu, x, r, w, b


def test_opcheck():
    for cl, relu, x, r, w, b in _sample_inputs():
        xg, rg, wg, bg = (t.clone().requires_grad_() for t in (x, r, w, b))
        ops = torch.ops.skipfast
        torch.library.opcheck(ops.bn_act_stats.default, (x,))
        torch.library.opcheck(ops.bn_act_train.default, (xg, wg, bg, rg, 1e-5, relu))
        torch.library.opcheck(ops.bn_act_train.default, (xg, None, None, None, 1e-3, relu))
        out, mean, var, invstd, mask = ops.bn_act_train(x, w, b, r, 1e-5, relu)
        torch.library.opcheck(ops.bn_act_apply.default, (xg, mean, invstd, wg, bg, rg, relu))
        torch.library.opcheck(ops.bn_act_apply.default, (xg, mean, invstd, None, None, None, relu))
        g = torch.randn_like(x)
        m = mask if relu else None
        torch.library.opcheck(ops.bn_act_backward_reduce.default, (g, x, mean, invstd, m))
        s1, s2 = ops.bn_act_backward_reduce(g, x, mean, invstd, m)
        torch.library.opcheck(ops.bn_act_backward_elemt.default, (g, x, mean, invstd, w, m, s1, s2, 50, relu))
        torch.library.opcheck(ops.bn_act_backward_elemt.default, (g, x, mean, invstd, None, m, None, None, 0, False))


def test_phases_compose_to_training_op():
    """stats -> apply -> backward_reduce -> backward_elemt (what a sync BN runs) equals bn_act_train."""
    ops = torch.ops.skipfast
    for cl, relu, x, r, w, b in _sample_inputs():
        out, mean, var, invstd, mask = ops.bn_act_train(x, w, b, r, 1e-5, relu)
        m2, v2 = ops.bn_act_stats(x)
        torch.testing.assert_close((m2, v2), (mean, var))
        out2, mask2 = ops.bn_act_apply(x, m2, torch.rsqrt(v2 + 1e-5), w, b, r, relu)
        torch.testing.assert_close(out2, out)
        assert torch.equal(mask2, mask)
        xd, wd, bd, rd = (t.double().requires_grad_() for t in (x, w, b, r))
        yd = batch_norm_act_reference(xd, wd, bd, None, None, training=True, residual=rd,
                                      activation="relu" if relu else None)
        g = torch.randn_like(x)
        yd.backward(g.double())
        s1, s2 = ops.bn_act_backward_reduce(g, x, mean, invstd, mask if relu else None)
        assert_close_fp32(s1, bd.grad, rtol=1e-4)
        assert_close_fp32(s2, wd.grad, rtol=1e-4)
        gx, gr = ops.bn_act_backward_elemt(g, x, mean, invstd, w, mask if relu else None, s1, s2, 50, relu)
        assert_close_fp32(gx, xd.grad, rtol=1e-4)
        if relu:
            assert_close_fp32(gr, rd.grad)


def test_compile_fullgraph_residual_block_training_step():
    torch._dynamo.reset()
    block = skipfast.ResidualBlock(8, 16, stride=2)
    eager = copy.deepcopy(block)
    x = torch.randn(2, 8, 10, 10)
    compiled = torch.compile(lambda m, x: m(x).square().mean(), fullgraph=True)
    loss = compiled(block, x)
    loss.backward()
    loss_eager = eager(x).square().mean()
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-4, atol=1e-6)
    for (n, p), p2 in zip(block.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-3, atol=1e-5, msg=n)
    for (n, bf), bf2 in zip(block.named_buffers(), eager.buffers()):
        torch.testing.assert_close(bf, bf2, rtol=1e-5, atol=1e-6, msg=n)
    assert int(block.bn1.num_batches_tracked) == 1


@pytest.mark.parametrize("momentum, track, affine", [(0.1, True, True), (None, True, True), (0.3, False, True),
                                                      (0.1, True, False)])
def test_running_stats_parity_50_steps(momentum, track, affine):
    ref = torch.nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track, affine=affine)
    mod = skipfast.BatchNormAct2d(6, momentum=momentum, track_running_stats=track, affine=affine, activation=None)
    mod.load_state_dict(ref.state_dict())
    assert mod.state_dict().keys() == ref.state_dict().keys()
    for step in range(50):
        x = torch.randn(3, 6, 4, 4) * (1 + step % 3) + step % 5
        torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(mod.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    mod.eval(), ref.eval()
    x = torch.randn(1, 6, 3, 3)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)


def test_module_matches_bn_relu_add_with_residual():
    ref_bn = torch.nn.BatchNorm2d(5)
    mod = skipfast.BatchNormAct2d(5)
    x, r = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 6)
    torch.testing.assert_close(mod(x, r), torch.relu(ref_bn(x) + r), rtol=1e-5, atol=1e-5)
    assert "activation='relu'" in repr(mod)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, True)])
@pytest.mark.parametrize("relu", [True, False])
def test_eager_training_op_gradients_for_any_subset_of_inputs(wants, relu):
    """The eager training op's C++ autograd node: gradients of exactly the inputs that want
    one (x, residual, the affine parameters), against float64, and the running statistics
    updated in place (version counters bumped, as torch's in-place update does)."""
    torch.manual_seed(0)
    want_x, want_r, want_p = wants
    x, r = _x((3, 8, 5, 5)), _x((3, 8, 5, 5))
    ref = torch.nn.BatchNorm2d(8).double()
    mod = skipfast.BatchNormAct2d(8, activation="relu" if relu else None)
    ref.weight.data.uniform_(0.5, 1.5), ref.bias.data.normal_()
    mod.load_state_dict(ref.float().state_dict()), ref.double()
    for p in (*ref.parameters(), *mod.parameters()):
        p.requires_grad_(want_p)
    xs = [x.clone().requires_grad_(want_x), x.float().requires_grad_(want_x)]
    rs = [r.clone().requires_grad_(want_r), r.float().requires_grad_(want_r)]
    version = mod.running_mean._version
    y_ref = ref(xs[0]) + rs[0]
    y_ref = torch.relu(y_ref) if relu else y_ref
    y = mod(xs[1], rs[1])
    assert mod.running_mean._version > version
    assert_close_fp32(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.running_var.double(), ref.running_var, rtol=1e-6, atol=1e-7)
    g = torch.randn(y.shape, dtype=torch.float64)
    y_ref.backward(g), y.backward(g.float())
    for got, want in ((xs[1].grad, xs[0].grad), (rs[1].grad, rs[0].grad), (mod.weight.grad, ref.weight.grad),
                      (mod.bias.grad, ref.bias.grad)):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close_fp32(got, want, rtol=1e-4, atol=1e-4)


def test_half_module_trains_through_converted_parameters():
    """A module in float16 (parameters and running statistics too): the op takes float32
    copies of weight and bias, whose gradients flow back to the float16 parameters."""
    torch.manual_seed(0)
    x, r = _x((4, 8, 6, 6)), _x((4, 8, 6, 6))
    ref = torch.nn.BatchNorm2d(8).double()
    mod = skipfast.BatchNormAct2d(8).half()
    xh, rh = x.half().requires_grad_(), r.half()
    x64 = x.half().double().requires_grad_()
    y, y_ref = mod(xh, rh), torch.relu(ref(x64) + rh.double())
    assert y.dtype == torch.float16 and mod.running_mean.dtype == torch.float16
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.half()), y_ref.backward(g)
    tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(xh.grad.double(), x64.grad, **tol)
    assert mod.weight.grad.dtype == torch.float16
    torch.testing.assert_close(mod.weight.grad.double(), ref.weight.grad, **tol)
    torch.testing.assert_close(mod.running_var.double(), ref.running_var, **tol)


def test_autocast_residual_block():
    block = skipfast.ResidualBlock(8)
    import torchvision

    tv = torchvision.models.resnet.BasicBlock(8, 8)
    tv.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_tv = block(x), tv(x)
    assert y.dtype == y_tv.dtype == torch.bfloat16  # torchvision: out += identity keeps bn's bf16
    torch.testing.assert_close(y, y_tv, rtol=5e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, z_tv = block(x.bfloat16()), tv(x.bfloat16())
    assert z.dtype == z_tv.dtype == torch.bfloat16


def test_saved_bytes_tail_and_block():
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    bn, fused = torch.nn.BatchNorm2d(16), skipfast.BatchNormAct2d(16)
    eager_tail, _ = saved_bytes(lambda: torch.relu(bn(x) + r))
    fused_tail, _ = saved_bytes(lambda: fused(x, r))
    assert fused_tail <= 0.55 * eager_tail, (fused_tail, eager_tail)
    assert fused_tail >= x.numel() * x.element_size()  # x itself is kept (and seen by the hooks)

    import torchvision

    block = skipfast.ResidualBlock(16)
    tv = torchvision.models.resnet.BasicBlock(16, 16)
    tv.load_state_dict(block.state_dict())
    eager_block, _ = saved_bytes(tv, x)
    fused_block, _ = saved_bytes(block, x)
    assert fused_block <= 0.8 * eager_block, (fused_block, eager_block, fused_block / eager_block)


def _bad_cases():
    x = torch.randn(2, 3, 4, 4)
    yield dict(x=x, weight=torch.ones(4)), ValueError, "weight must have 3 values"
    yield dict(x=x, bias=torch.zeros(3, device="meta")), ValueError, "bias must be on the device of x"
    yield dict(x=x, running_mean=torch.zeros(2)), ValueError, "running_mean must have 3 values"
    yield dict(x=x, running_var=torch.ones(3, 1)), ValueError, "running_var must be 1-D"
    yield dict(x=x, residual=torch.randn(2, 3, 4, 5)), ValueError, "residual must have the shape"
    yield dict(x=x, residual=torch.randn(2, 3, 4, 4).double()), TypeError, "residual must have the dtype"
    yield dict(x=x, residual=torch.randn(2, 3, 4, 4, device="meta")), ValueError, "residual must be on the device"
    yield dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x must be a floating"
    yield dict(x=torch.randn(2, 3, 4)), ValueError, "x must be 4-D"
    yield dict(x=x, activation="gelu"), ValueError, "activation must be 'relu' or None"
    # per-channel dtypes torch's batch norm rejects too (float32 ones pass for a half x)
    yield dict(x=x.double()), TypeError, r"weight must have the dtype of x \(torch.float64\), as torch"
    yield dict(x=x, running_mean=torch.zeros(3, dtype=torch.float64)), TypeError, "running_mean must have the dtype"
    yield (dict(x=x.bfloat16(), weight=torch.ones(3, dtype=torch.float16)), TypeError,
           r"weight must have the dtype of x \(torch.bfloat16\) or float32")
    yield (dict(x=x.half(), bias=torch.zeros(3, dtype=torch.float16)), TypeError,
           "weight, bias, running_mean and running_var must share one dtype, as torch.s batch norm requires, got "
           "torch.float32 and torch.float16")


@pytest.mark.parametrize("case, err, match", list(_bad_cases()))
def test_bad_inputs_leave_state_unchanged(case, err, match):
    x = case.pop("x")
    args = dict(weight=torch.ones(3), bias=torch.zeros(3), running_mean=torch.zeros(3), running_var=torch.ones(3))
    args.update(case)
    activation = args.pop("activation", "relu")
    residual = args.pop("residual", None)
    before = [t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else None for t in args.values()]
    with pytest.raises(err, match=f"skipfast.batch_norm_act: {match}"):
        batch_norm_act(x, args["weight"], args["bias"], args["running_mean"], args["running_var"], training=True,
                       residual=residual, activation=activation)
    for t, old in zip(args.values(), before):
        if old is not None:
            assert torch.equal(t, old)


def test_module_bad_input_leaves_buffers_unchanged():
    mod = skipfast.BatchNormAct2d(3)
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(torch.float64\)"):
        mod(torch.randn(2, 3, 4, 4, dtype=torch.float64))  # torch: "mixed dtype (CPU)"
    with pytest.raises(ValueError, match="residual must have the shape"):
        mod(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mod(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="BatchNormAct2d: x must be a 4-D"):
        mod(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="activation must be"):
        skipfast.BatchNormAct2d(3, activation="tanh")
    for k, v in mod.state_dict().items():
        assert torch.equal(v, state[k]), k


def _stride_cases():
    """x of torch-ambiguous or non-dense strides, with the memory format torch's batch norm
    writes for it (its output strides are compared, not this name)."""
    cl = torch.channels_last
    yield "permuted, C innermost", torch.randn(5, 6, 2, 4).permute(2, 3, 0, 1)  # torch: contiguous
    yield "channels_last, every other channel", torch.randn(2, 8, 4, 5).contiguous(memory_format=cl)[:, ::2]
    yield "channels_last, every other row", torch.randn(2, 8, 4, 5).contiguous(memory_format=cl)[:, :, ::2]
    yield "channels_last, size-1 W", torch.randn(2, 4, 4, 3).contiguous(memory_format=cl)[..., :1]
    yield "H and W transposed", torch.randn(2, 3, 4, 5).transpose(2, 3)
    yield "N1HW", torch.randn(2, 1, 4, 4)
    yield "NC11 channels_last", torch.randn(2, 3, 1, 1).contiguous(memory_format=cl)
    yield "1C1W from a permute", torch.randn(1, 3, 5, 1).permute(0, 1, 3, 2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name, x", list(_stride_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_output_strides_match_torch(name, x, training):
    """The output has the strides torch's batch norm gives this x (its format rule: contiguous
    x, dense channels_last x, else suggest_memory_format), in eager and in the fake kernels
    a compiled graph is traced with; values as torch's."""
    torch.manual_seed(0)
    C = x.shape[1]
    ref_bn = torch.nn.BatchNorm2d(C).train(training)
    ref_bn.running_var.uniform_(0.5, 2)
    mod = skipfast.BatchNormAct2d(C).train(training)
    mod.load_state_dict(ref_bn.state_dict())
    want = torch.relu(ref_bn(x))
    got = mod(x)
    assert got.stride() == want.stride(), name
    assert_close_fp32(got, want, rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
        stats = (None, None) if training else (mod.running_mean, mod.running_var)
        out = skipfast.ops.batch_norm_act(fake, mod.weight, mod.bias, *stats, training=training)
        assert out.stride() == want.stride(), name


def test_module_with_pruned_weight_matches_torch():
    """Pruning replaces the weight parameter with an attribute (weight_orig * weight_mask): the
    module reads it as nn.BatchNorm2d does."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    bn, fused = torch.nn.BatchNorm2d(6), skipfast.BatchNormAct2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    fused.load_state_dict(bn.state_dict())
    for m in (bn, fused):
        prune.l1_unstructured(m, "weight", amount=0.5)
    assert "weight" not in fused._parameters
    x, r = torch.randn(3, 6, 4, 4), torch.randn(3, 6, 4, 4)
    for train in (True, False):
        bn.train(train), fused.train(train)
        torch.testing.assert_close(fused(x, r), torch.relu(bn(x) + r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_var, bn.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_module_under_fake_tensor_mode(training):
    """FakeTensorMode (shape propagation, export) takes the registered ops and their fake
    kernels, not the eager C++ entries, which read data."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    m = skipfast.BatchNormAct2d(4, track_running_stats=not training).train(training)
    x = torch.randn(2, 4, 3, 3).to(memory_format=CL)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = m(mode.from_tensor(x), mode.from_tensor(x))
    assert isinstance(y, FakeTensor) and y.shape == x.shape and y.is_contiguous(memory_format=CL)


def test_one_value_per_channel_raises_like_torch():
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        batch_norm_act(x, None, None, None, None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var must be defined in evaluation mode"):
        batch_norm_act(x, None, None, None, None, training=False)
    # eval with one value per channel is fine (N=1 inference)
    y = batch_norm_act(x, None, None, torch.zeros(4), torch.ones(4), training=False)
    assert_close_fp32(y, torch.relu(x / (1 + 1e-5) ** 0.5))


def test_cpp_kernels_reject_bad_input_themselves():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor of 3 values"):
        torch.ops.skipfast.bn_act_train(x, torch.ones(4), None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="mean must have dtype Float"):
        torch.ops.skipfast.bn_act_apply(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), None, None, None, True)
    with pytest.raises(RuntimeError, match="mask must be a 1-D uint8 tensor of 12 bytes"):
        torch.ops.skipfast.bn_act_backward_reduce(x, x, torch.zeros(3), torch.ones(3), torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        torch.ops.skipfast.bn_act_train(torch.randn(1, 3, 1, 1), None, None, None, 1e-5, True)
    # the eager-mode entries check the running statistics before any state changes
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    with pytest.raises(ValueError, match="running_var must have 3 values"):
        torch.ops.skipfast.bn_act_train_eager(x, None, None, None, rm, torch.ones(4), 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="running_mean and running_var must both be tensors or both be None"):
        torch.ops.skipfast.bn_act_train_eager(x, None, None, None, rm, None, 0.1, 1e-5, True)
    assert rm.eq(0).all() and rv.eq(1).all()
    with pytest.raises(ValueError, match="running_mean must have 3 values"):
        torch.ops.skipfast.bn_act_eval_eager(x, None, None, None, torch.zeros(2), rv, 1e-5, True)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.skipfast.bn_act_eval_eager(x, None, None, x[:1], rm, rv, 1e-5, True)
    with pytest.raises(ValueError, match="conv_weight must be a 4-D tensor of the dtype and device of x"):
        torch.ops.skipfast.bn_act_relu_conv2d_eager(x, None, None, rm, rv, nbt, torch.randn(4, 3, 3, 3).double(),
                                                    0.1, 1e-5, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="running_mean must have 3 values"):
        torch.ops.skipfast.bn_act_relu_conv2d_eager(x, None, None, torch.zeros(4), rv, nbt, torch.randn(4, 3, 3, 3),
                                                    0.1, 1e-5, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        torch.ops.skipfast.bn_act_forward_eager(x, None, None, x.double(), rm, rv, nbt, True, None, 1e-5, True)
    with pytest.raises(ValueError, match="running_mean and running_var must be defined in evaluation mode"):
        torch.ops.skipfast.bn_act_forward_eager(x, None, None, None, None, None, None, False, 0.1, 1e-5, True)
    assert int(nbt) == 0
    with pytest.raises(ValueError, match="count must be above 1"):
        torch.ops.skipfast.bn_act_update_running(rm, rv, torch.zeros(3), torch.ones(3), 0.1, 1)
    assert rm.eq(0).all() and rv.eq(1).all()


def test_reference_backend_is_forced_by_env():
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    with backend("reference"):
        assert skipfast._backend.select("bn_act", x.device) == "reference"
        y = batch_norm_act(x, None, None, rm, rv, training=True, residual=r)
    torch.testing.assert_close(y, batch_norm_act_reference(x, None, None, None, None, training=True, residual=r))
    assert not torch.equal(rm, torch.zeros(3))


def test_empty_batch_matches_torch():
    x = torch.randn(0, 3, 4, 4)
    y = batch_norm_act(x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), training=True)
    assert y.shape == x.shape


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("resnet50", 48)])
def test_resnet_matches_torchvision(name, size):
    """A torchvision state_dict loads strict; a training step gives torchvision's outputs,
    gradients and running statistics (relative rule against float64), then eval outputs.
    Sizes keep at least 8 values per channel in the last stage's batch norms: at 2 values
    (resnet18 at 32x32, batch 2) float32 gradients are chaotic for torchvision itself (its
    error against float64 ranged 0.015 to 0.27 over input seeds), no base for a 2x rule."""
    torchvision = pytest.importorskip("torchvision")
    tv = getattr(torchvision.models, name)()
    sf = getattr(skipfast.models, name)()
    sf.load_state_dict(tv.state_dict(), strict=True)
    tv64 = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, size, size)
    results = []
    for model, inp in ((tv64, x.double()), (tv, x), (sf, x)):
        y = model(inp)
        y.square().sum().backward()
        results.append((y, {n: p.grad for n, p in model.named_parameters()}))
    (y64, g64), (y_tv, g_tv), (y_sf, g_sf) = results
    assert_low_precision_ok(y_sf, y_tv, y64, floor=1e-5)
    # Relative rule in norm: skipfast fp32's gradient error against fp64 is at most 2x
    # torchvision fp32's, over all parameters together and for the worst parameter (one
    # parameter alone is too noisy: BN over 8 values per channel amplifies rounding
    # differences made many layers earlier). The running statistics likewise: the last
    # stage's carry the rounding of every layer before them (relative error against
    # float64 about 2e-4, torchvision's and skipfast's alike), so they are compared with
    # float64's, not with torchvision's float32 values.
    def assert_relative_rule(got, eager, ref):
        def rel(g, n):
            return ((g[n].double() - ref[n]).norm() / ref[n].norm()).item()

        flat = lambda g: torch.cat([g[n].double().flatten() for n in ref])  # noqa: E731
        total = lambda g: ((flat(g) - flat(ref)).norm() / flat(ref).norm()).item()  # noqa: E731
        assert total(got) <= 2 * total(eager) + 1e-6, (total(got), total(eager))
        worst, worst_eager = max(rel(got, n) for n in ref), max(rel(eager, n) for n in ref)
        assert worst <= 2 * worst_eager + 1e-6, (worst, worst_eager)

    assert_relative_rule(g_sf, g_tv, g64)
    stats = [{n: b for n, b in m.named_buffers() if b.is_floating_point()} for m in (tv64, tv, sf)]
    assert_relative_rule(stats[2], stats[1], stats[0])
    for (n, a), b in zip(sf.named_buffers(), tv.buffers()):
        if not a.is_floating_point():
            assert torch.equal(a, b), n  # num_batches_tracked
    with torch.no_grad():
        ys = [m.eval()(inp) for m, inp in ((tv64, x.double()), (tv, x), (sf, x))]
    assert_low_precision_ok(ys[2], ys[1], ys[0], floor=1e-5)


@pytest.mark.gpu
def test_cuda_backends_agree():
    x, r = torch.randn(4, 32, 17, 17, device="cuda"), torch.randn(4, 32, 17, 17, device="cuda")
    w, b = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
    ref = batch_norm_act_reference(x, w, b, None, None, training=True, residual=r)
    for name in ("cpp", "triton"):
        for fmt in (torch.contiguous_format, CL):
            with backend(name):
                y = batch_norm_act(x.contiguous(memory_format=fmt), w, b, None, None, training=True,
                                   residual=r.contiguous(memory_format=fmt))
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 10, 3, 3)])
def test_triton_launchers_match_reference(shape, cl):
    from skipfast.kernels import bn_act as tk

    C = shape[1]
    x, r = _x(shape, dtype=torch.float32, cl=cl), _x(shape, dtype=torch.float32, cl=cl)
    w, b = (t.float() for t in _params(C))
    ops = torch.ops.skipfast
    for relu in (True, False):
        want = ops.bn_act_train(x, w, b, r, 1e-5, relu)
        got = tk.train(x, w, b, r, 1e-5, relu)
        for a, e in zip(got[:4], want[:4]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        assert got[0].is_contiguous(memory_format=CL if cl else torch.contiguous_format)
        assert torch.equal(got[4], want[4])  # the same bit-packed mask
        out, mean, var, invstd, mask = want
        m = mask if relu else None
        g = torch.randn_like(x)
        s_want = ops.bn_act_backward_reduce(g, x, mean, invstd, m)
        s_got = tk.backward_reduce(g, x, mean, invstd, m)
        torch.testing.assert_close(s_got, s_want, rtol=1e-4, atol=1e-5)
        for sums, count in ((s_want, x.numel() // C), ((None, None), 0)):
            e_want = ops.bn_act_backward_elemt(g, x, mean, invstd, w, m, *sums, count, relu)
            e_got = tk.backward_elemt(g, x, mean, invstd, w, m, *sums, count, relu)
            torch.testing.assert_close(e_got, e_want, rtol=1e-4, atol=1e-5)
    # large mean, small std: shifted sums keep the variance
    xs = _x((2, 4, 8, 8), dtype=torch.float32, cl=cl, scale=1e-2, offset=1e4)
    mean, var = tk.stats(xs)
    torch.testing.assert_close(var.double(), xs.double().var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True)])
def test_bn_relu_conv_gradients_for_any_subset_of_inputs(wants):
    """The eager BN + ReLU + convolution op's C++ autograd node: gradients of exactly the
    inputs that want one (x, the BN parameters, the convolution weight), against float64."""
    torch.manual_seed(0)
    want_x, want_bn, want_cw = wants
    bn, conv = torch.nn.BatchNorm2d(6).double(), torch.nn.Conv2d(6, 5, 3, padding=1, bias=False).double()
    fused, fconv = skipfast.BatchNormAct2d(6), torch.nn.Conv2d(6, 5, 3, padding=1, bias=False)
    fused.load_state_dict(bn.state_dict()), fconv.load_state_dict(conv.state_dict())
    for p in (*bn.parameters(), *fused.parameters()):
        p.requires_grad_(want_bn)
    for p in (conv.weight, fconv.weight):
        p.requires_grad_(want_cw)
    x = _x((4, 6, 5, 5))
    x1, x2 = x.clone().requires_grad_(want_x), x.float().requires_grad_(want_x)
    y_ref, y = conv(torch.relu(bn(x1))), fused.then_conv(x2, fconv)
    g = torch.randn(y.shape, dtype=torch.float64)
    y_ref.backward(g), y.backward(g.float())
    for got, want in ((x2.grad, x1.grad), (fused.weight.grad, bn.weight.grad), (fused.bias.grad, bn.bias.grad),
                      (fconv.weight.grad, conv.weight.grad)):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close_fp32(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.running_var.double(), bn.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cl", [False, True])
def test_bn_relu_conv_recompute_matches_eager(cl):
    """BatchNormAct2d.then_conv: the activation is recomputed in backward, not saved."""
    torch.manual_seed(0)
    bn, conv = torch.nn.BatchNorm2d(6), torch.nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    fused = skipfast.BatchNormAct2d(6)
    fused.load_state_dict(bn.state_dict())
    fconv = copy.deepcopy(conv)
    x = _x((3, 6, 7, 7), dtype=torch.float32, cl=cl)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):
        y_ref = conv(torch.relu(bn(x1)))
        saved_fused, y = saved_bytes(lambda: fused.then_conv(x2, fconv))
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(y_ref)
        y_ref.backward(g), y.backward(g)
    assert saved_fused <= x.numel() * 4 + fconv.weight.numel() * 4 + 4096  # x, conv weight, statistics
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for a, b in ((fused.weight, bn.weight), (fused.bias, bn.bias), (fconv.weight, conv.weight)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.buffers(), bn.buffers()):
        torch.testing.assert_close(a, b)
    fused.eval(), bn.eval()
    torch.testing.assert_close(fused.then_conv(x, fconv), conv(torch.relu(bn(x))), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("case, err, match", [(c, e, m) for c, e, m in _bad_cases()
                                              if c["x"].dim() == 4 and "activation" not in c])
def test_module_checks_match_the_functional_api(case, err, match):
    """BatchNormAct2d's eager C++ entry checks what the functional API checks in Python, with
    the same exception type and message, and leaves every buffer (num_batches_tracked too)
    unchanged. (The module checks x's dimensions and the activation itself.)"""
    x = case.pop("x")
    mod = skipfast.BatchNormAct2d(3)
    residual = case.pop("residual", None)
    for name, t in case.items():  # a pruned or parametrized module holds such tensors as attributes
        if name in mod._parameters:
            del mod._parameters[name]
        else:
            del mod._buffers[name]
        setattr(mod, name, t)
    state = {k: v.clone() for k, v in mod.state_dict().items() if v.device.type == "cpu"}
    args = dict(weight=mod.weight, bias=mod.bias, running_mean=mod.running_mean, running_var=mod.running_var)
    with pytest.raises(err) as functional:
        batch_norm_act(x, **args, training=True, residual=residual)
    with pytest.raises(err, match=f"skipfast.batch_norm_act: {match}") as module:
        mod(x, residual)
    assert str(module.value) == str(functional.value)
    for k, v in state.items():
        assert torch.equal(mod.state_dict()[k], v), k


@pytest.mark.parametrize("device, name", [("cpu", "cpp"), pytest.param("cuda", "cpp", marks=pytest.mark.gpu),
                                          pytest.param("cuda", "triton", marks=pytest.mark.gpu)])
def test_module_eager_entry_counts_batches(device, name):
    """num_batches_tracked counted by the module's one-call entries (forward and then_conv):
    momentum None is the cumulative average, as nn.BatchNorm2d; no count in eval or without
    running stats, none for a rejected call."""
    torch.manual_seed(0)
    for momentum in (None, 0.3):
        bn = torch.nn.BatchNorm2d(4, momentum=momentum).to(device)
        fused = skipfast.BatchNormAct2d(4, momentum=momentum).to(device)
        conv = torch.nn.Conv2d(4, 2, 3, padding=1, bias=False).to(device)
        with backend(name):
            for step in range(4):
                x = torch.randn(3, 4, 5, 5, device=device, requires_grad=True)
                if step % 2:
                    got, want = fused.then_conv(x, conv), conv(torch.relu(bn(x)))
                else:
                    got, want = fused(x), torch.relu(bn(x))
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            with pytest.raises(ValueError, match="residual must be on the device of x"):
                fused(x, torch.randn(3, 4, 5, 5, device="meta"))
        for (key, a), b in zip(fused.named_buffers(), bn.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
        assert int(fused.num_batches_tracked) == 4
    fused.eval()
    fused(torch.randn(3, 4, 5, 5, device=device))
    assert int(fused.num_batches_tracked) == 4
    untracked = skipfast.BatchNormAct2d(4, track_running_stats=False).to(device)
    untracked(torch.randn(3, 4, 5, 5, device=device))
    assert untracked.num_batches_tracked is None and untracked.running_mean is None


@pytest.mark.parametrize("path", ["cpp", "cpp-then_conv", pytest.param("triton", marks=pytest.mark.skipif(
    not skipfast._backend.has_triton(), reason="triton is not installed"))])
def test_create_graph_is_refused_not_wrong(path):
    """The fused backward is not differentiable: create_graph=True through it is an error (a
    second derivative would silently miss the BN's terms); the reference backend gives torch's."""
    torch.manual_seed(0)
    dt = torch.float32 if path == "triton" else torch.float64
    m, conv = skipfast.BatchNormAct2d(4).to(dt), torch.nn.Conv2d(4, 3, 3, padding=1, bias=False).to(dt)
    x0 = torch.randn(2, 4, 5, 5, dtype=dt)

    def second(name):
        x = x0.clone().requires_grad_()
        with backend(name):
            y = m.then_conv(x, conv) if path.endswith("then_conv") else m(x)
            g, = torch.autograd.grad(y.pow(3).sum() + x.pow(3).sum(), x, create_graph=True)
            return torch.autograd.grad(g.square().sum(), x)[0]

    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        second(path.split("-")[0])
    ref = torch.nn.BatchNorm2d(4).to(dt)
    ref.load_state_dict(m.state_dict())
    x = x0.clone().requires_grad_()
    y = conv(torch.relu(ref(x))) if path.endswith("then_conv") else torch.relu(ref(x))
    g, = torch.autograd.grad(y.pow(3).sum() + x.pow(3).sum(), x, create_graph=True)
    torch.testing.assert_close(second("reference"), torch.autograd.grad(g.square().sum(), x)[0])


def test_module_rejections_before_any_state_change():
    """then_conv checks the convolution before counting num_batches_tracked; a residual that is
    not a tensor and an activation changed after construction get the functional API's errors."""
    m = skipfast.BatchNormAct2d(4)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for conv, match in ((torch.nn.Conv2d(5, 2, 3, bias=False), "cannot take the 4 channels of x"),
                        (torch.nn.Conv2d(4, 2, 7, bias=False), "is larger than x's padded input")):
        with pytest.raises(ValueError, match=match):
            m.then_conv(x, conv)
    with pytest.raises(TypeError, match="skipfast.batch_norm_act: residual must be a torch.Tensor, got float"):
        m(x, 1.0)
    m.activation = "gelu"
    with pytest.raises(ValueError, match="activation must be 'relu' or None"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
