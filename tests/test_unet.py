import pytest
import torch
import torch.nn.functional as F

import skipfast
from skipfast.kernels import unet as tk
from skipfast.ops.unet import concat_conv2d_reference

from helpers import assert_close_fp32, assert_low_precision_ok, backend, saved_bytes


def _inputs(n=2, ca=5, ce=3, hw=(7, 9), cout=6, k=3, dtype=torch.float32, bias=True, cl=False, requires_grad=False):
    a = torch.randn(n, ca, *hw, dtype=dtype)
    e = torch.randn(n, ce, *hw, dtype=dtype)
    if cl:
        a, e = a.to(memory_format=torch.channels_last), e.to(memory_format=torch.channels_last)
    w = torch.randn(cout, ca + ce, k, k, dtype=dtype) / (k * (ca + ce) ** 0.5)
    b = torch.randn(cout, dtype=dtype) if bias else None
    ts = [a, e, w] + ([b] if bias else [])
    for t in ts:
        t.requires_grad_(requires_grad)
    return a, e, w, b


def _fp64_reference(a, e, w, b, padding):
    return concat_conv2d_reference(a.double(), e.double(), w.double(), None if b is None else b.double(), padding)


CASES = [dict(), dict(ca=4, ce=4, k=1), dict(n=1, ca=3, ce=7, hw=(5, 5), bias=False), dict(cl=True),
         dict(n=1, ca=17, ce=40, hw=(4, 6), cout=33)]
PADS = [1, 0, 1, 1, 1]


@pytest.mark.parametrize("kw, padding", list(zip(CASES, PADS)))
def test_split_composition_matches_reference(kw, padding):
    a, e, w, b = _inputs(**kw, requires_grad=True)
    y = skipfast.ops.concat_conv2d(a, e, w, b, padding)
    assert_close_fp32(y, _fp64_reference(a, e, w, b, padding))
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (a, e, w, b)]
    _fp64_reference(*ref, padding).backward(grad.double())
    for got, exp in zip((a, e, w, b), ref):
        if got is not None:
            assert_close_fp32(got.grad, exp.grad)


def test_gradcheck():
    a, e, w, b = _inputs(n=1, ca=3, ce=2, hw=(4, 5), cout=3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: skipfast.ops.concat_conv2d(*t, 1), (a, e, w, b), fast_mode=True)


@pytest.mark.parametrize("bias", [True, False])
def test_triton_op_forward_backward(bias):
    """The triton_op and its registered autograd, run by the interpreter on CPU."""
    a, e, w, b = _inputs(n=1, ca=5, ce=3, hw=(6, 7), bias=bias, requires_grad=True)
    with backend("triton"):
        y = skipfast.ops.concat_conv2d(a, e, w, b, 1)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (a, e, w, b)]
    y_ref = _fp64_reference(*ref, 1)
    y_ref.backward(grad.double())
    assert_close_fp32(y, y_ref)
    for got, exp in zip((a, e, w, b), ref):
        if got is not None:
            assert_close_fp32(got.grad, exp.grad)


@pytest.mark.parametrize("kw, padding", list(zip(CASES, PADS)))
def test_triton_kernel_matches_conv2d_fp32(kw, padding):
    a, e, w, b = _inputs(**kw)
    y = tk.concat_conv2d(a, e, w, b, padding)
    assert_close_fp32(y, _fp64_reference(a, e, w, b, padding))
    assert y.is_contiguous(memory_format=torch.channels_last if kw.get("cl") else torch.contiguous_format)


def test_triton_kernel_reads_non_contiguous_sources():
    a = torch.randn(2, 9, 8, 6)[:, ::2].transpose(2, 3)  # 5 channels, strided, H/W swapped
    e = torch.randn(2, 6, 8, 3).permute(0, 3, 1, 2)  # channels_last-like strides, 3 channels
    w = torch.randn(4, 8, 3, 3)
    assert_close_fp32(tk.concat_conv2d(a, e, w, None, 1), _fp64_reference(a, e, w, None, 1))


def test_triton_kernel_fp16_relative_rule():
    a, e, w, b = _inputs(ca=16, ce=16, cout=16, hw=(6, 6), dtype=torch.float64)
    ref = concat_conv2d_reference(a, e, w, b, 1)
    lo = [t.half() for t in (a, e, w, b)]
    y = tk.concat_conv2d(*lo, 1)
    assert y.dtype == torch.float16
    assert_low_precision_ok(y, concat_conv2d_reference(*lo, 1), ref)


def test_compile_fullgraph():
    # aot_eager traces forward and backward through the op with fake tensors (what fullgraph
    # needs) without Inductor's C++ compilation of convolution graphs (a minute on 2 cores).
    torch._dynamo.reset()
    a, e, w, b = _inputs(requires_grad=True)
    fn = torch.compile(lambda a, e, w, b: torch.relu(skipfast.ops.concat_conv2d(a * 2, e, w, b, 1)),
                       fullgraph=True, backend="aot_eager")
    y = fn(a, e, w, b)
    y.sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (a, e, w, b)]
    torch.relu(concat_conv2d_reference(ref[0] * 2, *ref[1:], 1)).sum().backward()
    for got, exp in zip((a, e, w, b), ref):
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda a, e, w, b: (a, e[:, :, :5], w, b), ValueError, "e must have the batch size and spatial size of a"),
        (lambda a, e, w, b: (a, e, w[:, :7], b), ValueError, "weight must have 8 input channels"),
        (lambda a, e, w, b: (a, e.double(), w, b), TypeError, "e must have the dtype and device of a"),
        (lambda a, e, w, b: (a, e, w, b[:3]), ValueError, r"bias must have shape \(6,\)"),
        (lambda a, e, w, b: (a[0], e, w, b), ValueError, "a must be 4-D"),
        (lambda a, e, w, b: (a[..., :1, :1], e[..., :1, :1], w.repeat(1, 1, 2, 2), b), ValueError, "the 6x6 kernel does not fit"),
    ],
)
def test_bad_inputs(mutate, err, match):
    with pytest.raises(err, match=f"skipfast.concat_conv2d: {match}"):
        skipfast.ops.concat_conv2d(*mutate(*_inputs()), 1)


def test_bad_padding():
    with pytest.raises(ValueError, match="skipfast.concat_conv2d: padding must be a non-negative int, got -1"):
        skipfast.ops.concat_conv2d(*_inputs(), -1)


def _unet(**kw):
    torch.manual_seed(0)
    return skipfast.UNet(**{"in_channels": 2, "out_channels": 3, "base_channels": 4, "depth": 2, **kw})


def test_unet_state_dict_keys_and_shapes_unchanged():
    m = _unet()
    sd = m.state_dict()
    assert tuple(sd["up.0.conv.0.weight"].shape) == (8, 16, 3, 3)  # one weight over both sources
    assert tuple(sd["up.1.conv.0.weight"].shape) == (4, 8, 3, 3)
    assert "up.0.up.weight" in sd and "up.1.conv.4.running_var" in sd
    other = _unet()
    other.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("hw", [(16, 16), (13, 10)])
def test_unet_matches_eager_concat(hw):
    m = _unet().double()
    x = torch.randn(2, 2, *hw, dtype=torch.float64)
    y = m(x)
    y.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    with backend("reference"):
        m2 = _unet().double()  # same init, same first batch: the same running stats too
        y2 = m2(x)
        y2.square().sum().backward()
    assert y.shape == (2, 3, *hw)
    torch.testing.assert_close(y, y2)
    for k, p in m2.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, msg=k)
    for k, v in m2.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, msg=k)


def test_unet_training_step_saves_less_than_eager_concat():
    m = _unet(base_channels=8, depth=3)
    x = torch.randn(2, 2, 32, 32)
    skips = []
    hooks = [up.register_forward_pre_hook(lambda mod, args: skips.append(args[1].nbytes)) for up in m.up]

    def step():
        return F.binary_cross_entropy_with_logits(m(x), torch.zeros(2, 3, 32, 32))

    ours, _ = saved_bytes(step)
    with backend("reference"):
        eager, _ = saved_bytes(step)
    for h in hooks:
        h.remove()
    skip_bytes = sum(skips[: len(m.up)])
    # eager keeps cat([up(b), skip]) for each decoder conv; skipfast keeps up(b) and the
    # skip tensor it already keeps for the encoder: one skip-sized tensor less per level.
    assert ours == eager - skip_bytes, (ours, eager, skip_bytes)
    assert ours < eager


def test_unet_under_triton_backend_matches():
    m = _unet(base_channels=4, depth=1)
    x = torch.randn(1, 2, 8, 8)
    ref = m(x)
    with backend("triton"):
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_triton_matches_reference():
    a, e, w, b = (t.cuda() for t in _inputs(n=4, ca=64, ce=64, cout=64, hw=(33, 31), cl=True))
    ref = _fp64_reference(a, e, w, b, 1)
    with backend("triton"):
        assert_close_fp32(skipfast.ops.concat_conv2d(a, e, w, b, 1), ref)
    lo = [t.half() for t in (a, e, w, b)]
    assert_low_precision_ok(tk.concat_conv2d(*lo, 1), concat_conv2d_reference(*lo, 1), ref)


def test_unet_under_cpu_autocast_matches_eager_concat():
    m = _unet()
    x = torch.randn(2, 2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        with backend("reference"):
            y_ref = m(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.05, atol=0.05)


def test_up_block_with_pruned_first_conv_reads_its_current_weight():
    """The first convolution of an Up block, pruned, is called as a module (its pruning
    pre-hook computes the weight), also after its weight changes."""
    from torch.nn.utils import prune
    from skipfast.nn.unet import Up
    torch.manual_seed(0)
    up = Up(8, 4)
    prune.l1_unstructured(up.conv[0], "weight", amount=0.5)
    with torch.no_grad():
        up.conv[0].weight_orig.mul_(-1.5)
    x, skip = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(up(x, skip), up.conv(torch.cat([up.up(x), skip], 1)))
