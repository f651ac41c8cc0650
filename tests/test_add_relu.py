import pytest
import torch

import skipfast
from skipfast.kernels import add_relu as tk
from skipfast.ops.add_relu import add_relu_reference

from helpers import assert_low_precision_ok, backend


def _inputs(shape=(2, 3, 7, 7), dtype=torch.float32, cl=False, requires_grad=False):
    x = torch.randn(shape, dtype=dtype)
    r = torch.randn(shape, dtype=dtype)
    if cl:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad), r.requires_grad_(requires_grad)


def test_extension_is_loaded():
    assert skipfast._backend.has_extension(), skipfast._backend.EXTENSION_ERROR
    assert skipfast._backend.select("add_relu", torch.device("cpu")) == "cpp"


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 5, 1, 3), (4, 16, 9, 9)])
def test_forward_matches_reference(shape, cl):
    x, r = _inputs(shape, cl=cl)
    y = torch.ops.skipfast.add_relu(x, r)
    torch.testing.assert_close(y, add_relu_reference(x, r), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_non_contiguous_inputs():
    x = torch.randn(2, 6, 8, 10)[:, ::2, :, 1:9]
    r = torch.randn(2, 3, 8, 8).transpose(2, 3)
    torch.testing.assert_close(skipfast.ops.add_relu(x, r), add_relu_reference(x, r), rtol=0, atol=0)


def test_nan_propagates_like_torch_relu():
    x = torch.tensor([float("nan"), -1.0, 2.0]).view(1, 3, 1, 1)
    r = torch.zeros_like(x)
    torch.testing.assert_close(skipfast.ops.add_relu(x, r), torch.relu(x), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    x, r = _inputs((2, 8, 5, 5), dtype=torch.float64)
    ref = add_relu_reference(x, r)
    xl, rl = x.to(dtype), r.to(dtype)
    assert_low_precision_ok(skipfast.ops.add_relu(xl, rl), add_relu_reference(xl, rl), ref)


def test_gradcheck():
    x, r = _inputs((2, 3, 4, 5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(skipfast.ops.add_relu, (x, r))


def test_opcheck():
    for cl in (False, True):
        x, r = _inputs((2, 3, 5, 5), cl=cl, requires_grad=True)
        torch.library.opcheck(torch.ops.skipfast.add_relu.default, (x, r))
        g, y = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
        torch.library.opcheck(torch.ops.skipfast.add_relu_backward.default, (g, y))


def test_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: skipfast.ops.add_relu(a * 2, b), fullgraph=True)
    x, r = _inputs((2, 4, 6, 6), requires_grad=True)
    y = fn(x, r)
    y.sum().backward()
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    add_relu_reference(x2 * 2, r2).sum().backward()
    torch.testing.assert_close(y, add_relu_reference(x.detach() * 2, r.detach()))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(r.grad, r2.grad)


@pytest.mark.parametrize("cl", [False, True])
def test_triton_launchers_match_reference(cl):
    x, r = _inputs((2, 5, 7, 7), cl=cl)
    y = tk.add_relu(x, r)
    torch.testing.assert_close(y, add_relu_reference(x, r))
    g = torch.randn_like(y)
    torch.testing.assert_close(tk.relu_backward(g, y), g * (y > 0))


def test_reference_backend_is_forced_by_env():
    x, r = _inputs()
    with backend("reference"):
        assert skipfast._backend.select("add_relu", x.device) == "reference"
        torch.testing.assert_close(skipfast.ops.add_relu(x, r), add_relu_reference(x, r))
    with backend("bogus"), pytest.raises(ValueError, match="SKIPFAST_BACKEND"):
        skipfast.ops.add_relu(x, r)


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
def test_backend_choice_traces_under_compile(name, monkeypatch):
    """select() runs inside every op a compiled model calls: it must trace with fullgraph=True
    (no lookup dynamo refuses, such as importlib's find_spec), for each forced backend."""
    if name == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def chosen(x):
        return x + (1.0 if skipfast._backend.select("add_relu", x.device) == name else 2.0)

    with backend(name):
        assert chosen(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_backend_memo_does_not_recompile(monkeypatch):
    """select()'s eager-mode memo is not read while tracing: filling it later does not
    invalidate a compiled graph (no recompile)."""
    monkeypatch.delenv("SKIPFAST_BACKEND", raising=False)
    monkeypatch.setattr(skipfast._backend, "_CHOSEN", {})
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def chosen(x):
        return x + (1.0 if skipfast._backend.select("add_relu", x.device) == "cpp" else 2.0)

    assert chosen(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert skipfast._backend.select("add_relu", torch.device("cpu")) == "cpp"  # eager: fills the memo
    assert ("add_relu", "cpu") in skipfast._backend._CHOSEN
    with torch.compiler.set_stance("fail_on_recompile"):
        assert chosen(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "x, r, err, match",
    [
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), ValueError, "residual must have the shape"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).double(), TypeError, "residual must have the dtype"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError, "x must be a floating"),
        (torch.randn(2, 3, 4, 4), "r", TypeError, "residual must be a torch.Tensor"),
    ],
)
def test_bad_inputs(x, r, err, match):
    with pytest.raises(err, match=f"skipfast.add_relu: {match}"):
        skipfast.ops.add_relu(x, r)


def test_cpp_kernel_rejects_bad_input_itself():
    with pytest.raises(RuntimeError, match="residual must have shape"):
        torch.ops.skipfast.add_relu(torch.randn(2, 3), torch.randn(3, 2))


@pytest.mark.gpu
def test_cuda_backends_agree():
    x, r = (t.cuda() for t in _inputs((4, 32, 17, 17)))
    ref = add_relu_reference(x, r)
    for name in ("cpp", "triton"):
        with backend(name):
            torch.testing.assert_close(skipfast.ops.add_relu(x, r), ref)
