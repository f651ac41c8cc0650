import pytest
import torch

import skipfast
from skipfast.kernels import highway as tk
from skipfast.ops.highway import highway_reference

from helpers import assert_close_fp32, assert_low_precision_ok, backend, saved_bytes


def _inputs(shape=(2, 3, 7, 7), dtype=torch.float32, cl=False, requires_grad=False):
    ts = [torch.randn(shape, dtype=dtype) for _ in range(3)]
    ts[1] = ts[1] * 3  # gate logits across the sigmoid's whole range
    if cl:
        ts = [t.to(memory_format=torch.channels_last) for t in ts]
    return [t.requires_grad_(requires_grad) for t in ts]


def _reference_grads(h, g, x, grad):
    h, g, x = (t.detach().double().requires_grad_() for t in (h, g, x))
    highway_reference(h, g, x).backward(grad.double())
    return h.grad, g.grad, x.grad


def test_cpp_backend_is_selected():
    assert skipfast._backend.has_extension(), skipfast._backend.EXTENSION_ERROR
    assert skipfast._backend.select("highway", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 5, 1, 3), (4, 16, 9, 9), (3, 37), (11,)])
def test_forward_backward_match_fp64_reference(shape, cl):
    if cl and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    h, g, x = _inputs(shape, cl=cl, requires_grad=True)
    y = skipfast.ops.highway(h, g, x)
    ref = highway_reference(h.double(), g.double(), x.double())
    assert_close_fp32(y, ref)
    want = torch.channels_last if cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=want)
    grad = torch.randn_like(y)
    y.backward(grad)
    for got, exp in zip((h.grad, g.grad, x.grad), _reference_grads(h, g, x, grad)):
        assert_close_fp32(got, exp)


def test_non_contiguous_inputs():
    x = torch.randn(2, 6, 8, 10)[:, ::2, :, 1:9]
    h = torch.randn(2, 3, 8, 8).transpose(2, 3)
    g = torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)
    assert_close_fp32(skipfast.ops.highway(h, g, x), highway_reference(h.double(), g.double(), x.double()))


def test_saturated_and_nan_gates_behave_like_eager():
    g = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("inf"), -float("inf"), float("nan")])
    h, x = torch.full_like(g, 2.0), torch.full_like(g, -3.0)
    torch.testing.assert_close(skipfast.ops.highway(h, g, x), highway_reference(h, g, x), equal_nan=True)
    grad = torch.ones_like(g)
    got = torch.ops.skipfast.highway_backward(grad, h, g, x)
    for a, b in zip(got, _reference_grads(h, g, x, grad)):
        torch.testing.assert_close(a.double(), b, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_relative_rule(dtype):
    h, g, x = _inputs((2, 8, 9, 9), dtype=torch.float64)  # 1296 elements: vector body and tail
    grad = torch.randn_like(x)
    ref_y = highway_reference(h, g, x)
    ref_grads = _reference_grads(h, g, x, grad)
    hl, gl, xl, rl = (t.to(dtype) for t in (h, g, x, grad))
    assert_low_precision_ok(skipfast.ops.highway(hl, gl, xl), highway_reference(hl, gl, xl), ref_y)
    eager = [t.detach().requires_grad_() for t in (hl, gl, xl)]
    highway_reference(*eager).backward(rl)
    ours = torch.ops.skipfast.highway_backward(rl, hl, gl, xl)
    for got, e, ref in zip(ours, eager, ref_grads):
        assert got.dtype == dtype
        assert_low_precision_ok(got, e.grad, ref)


def test_gradcheck():
    h, g, x = _inputs((2, 3, 4, 5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(skipfast.ops.highway, (h, g, x))
    assert torch.autograd.gradgradcheck(skipfast.ops.highway_reference, (h, g, x))


def test_opcheck():
    for cl in (False, True):
        h, g, x = _inputs((2, 3, 5, 5), cl=cl, requires_grad=True)
        torch.library.opcheck(torch.ops.skipfast.highway.default, (h, g, x))
        grad = torch.randn(2, 3, 5, 5)
        torch.library.opcheck(torch.ops.skipfast.highway_backward.default, (grad, h.detach(), g.detach(), x.detach()))


def test_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda h, g, x: skipfast.ops.highway(torch.relu(h), g * 2, x), fullgraph=True)
    h, g, x = _inputs((2, 4, 6, 6), requires_grad=True)
    y = fn(h, g, x)
    y.sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (h, g, x)]
    y_ref = highway_reference(torch.relu(ref[0]), ref[1] * 2, ref[2])
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip((h, g, x), ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_saves_only_the_inputs_for_backward():
    h, g, x = _inputs((4, 8, 16, 16), requires_grad=True)
    ours, _ = saved_bytes(skipfast.ops.highway, h, g, x)
    eager, _ = saved_bytes(highway_reference, h, g, x)
    assert ours == 3 * x.nbytes
    assert ours < eager, (ours, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_triton_launchers_match_reference(cl, dtype):
    h, g, x = _inputs((2, 5, 7, 7), cl=cl)
    grad = torch.randn_like(x)
    ref_y = highway_reference(h.double(), g.double(), x.double())
    ref_grads = _reference_grads(h, g, x, grad)
    hl, gl, xl, rl = (t.to(dtype) for t in (h, g, x, grad))
    y = tk.highway(hl, gl, xl)
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert_close_fp32(y, ref_y)
        for got, ref in zip(tk.highway_backward(rl, hl, gl, xl), ref_grads):
            assert_close_fp32(got, ref)
    else:
        assert_low_precision_ok(y, highway_reference(hl, gl, xl), ref_y)
        eager = [t.detach().requires_grad_() for t in (hl, gl, xl)]
        highway_reference(*eager).backward(rl)
        for got, e, ref in zip(tk.highway_backward(rl, hl, gl, xl), eager, ref_grads):
            assert_low_precision_ok(got, e.grad, ref)


def test_reference_backend_is_forced_by_env():
    h, g, x = _inputs()
    with backend("reference"):
        assert skipfast._backend.select("highway", x.device) == "reference"
        torch.testing.assert_close(skipfast.ops.highway(h, g, x), highway_reference(h, g, x))


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 2)), ValueError, "h must have the shape of x"),
        ((torch.randn(2, 3), torch.randn(2, 3).double(), torch.randn(2, 3)), TypeError, "gate must have the dtype of x"),
        ((torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64)), TypeError, "x must be a floating"),
        ((torch.randn(2, 3), None, torch.randn(2, 3)), TypeError, "gate must be a torch.Tensor"),
    ],
)
def test_bad_inputs(args, err, match):
    with pytest.raises(err, match=f"skipfast.highway: {match}"):
        skipfast.ops.highway(*args)


def test_cpp_kernel_rejects_bad_input_itself():
    with pytest.raises(RuntimeError, match="gate must have shape"):
        torch.ops.skipfast.highway(torch.randn(2, 3), torch.randn(3, 2), torch.randn(2, 3))


def _eager_highway(m, x):
    return highway_reference(torch.relu(m.transform(x)), m.gate(x), x)


@pytest.mark.parametrize("make, shape", [(lambda: skipfast.Highway(12), (5, 7, 12)),
                                          (lambda: skipfast.Highway2d(6), (2, 6, 7, 7))])
def test_modules_match_eager(make, shape):
    m = make().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    y_ref = _eager_highway(m, x)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, [p.grad for p in m.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b)
    assert sorted(m.state_dict()) == ["gate.bias", "gate.weight", "transform.bias", "transform.weight"]


def test_modules_reject_bad_input():
    with pytest.raises(ValueError, match=r"Highway: x must be a tensor \[\.\.\., 8\]"):
        skipfast.Highway(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="Highway2d: x must have 4 channels"):
        skipfast.Highway2d(4)(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="Highway2d: channels must be a positive integer"):
        skipfast.Highway2d(0)


@pytest.mark.gpu
def test_cuda_backends_agree():
    h, g, x = (t.cuda() for t in _inputs((4, 32, 17, 17)))
    ref = highway_reference(h, g, x)
    grad = torch.randn_like(x)
    ref_grads = torch.ops.skipfast.highway_backward(grad.cpu(), h.cpu(), g.cpu(), x.cpu())
    for name in ("cpp", "triton"):
        with backend(name):
            hh, gg, xx = (t.detach().clone().requires_grad_() for t in (h, g, x))
            y = skipfast.ops.highway(hh, gg, xx)
            torch.testing.assert_close(y, ref)
            y.backward(grad)
            for a, b in zip((hh.grad, gg.grad, xx.grad), ref_grads):
                torch.testing.assert_close(a.cpu(), b)
