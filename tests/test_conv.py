"""conv2d_bias_act (C++ CPU: oneDNN post-ops / epilogue pass; Triton under the
interpreter) and BN folding."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skipfast.fold import FoldedConvBN, fold_bn
from skipfast.kernels import conv as tk
from skipfast.ops.conv import Winograd, conv2d_bias_act, conv2d_bias_act_reference, prepack_weight

from helpers import assert_low_precision_ok

# (C, K, H, W, kernel, stride, padding, dilation, groups)
SHAPES = [
    (3, 8, 7, 7, 3, 1, 1, 1, 1),
    (5, 6, 9, 11, 3, 2, 1, 1, 1),
    (4, 8, 8, 8, 1, 1, 0, 1, 1),
    (4, 8, 9, 9, 1, 2, 0, 1, 1),
    (3, 8, 15, 15, 7, 2, 3, 1, 1),
    (6, 4, 8, 8, 3, 1, 2, 2, 1),
    (8, 8, 6, 6, 3, 1, 1, 1, 4),
]


def _case(shape, dtype=torch.float32, cl=False):
    c, k, h, w, r, stride, padding, dilation, groups = shape
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    weight = torch.randn(k, c // groups, r, r, dtype=torch.float64) / (c * r * r) ** 0.5
    bias = torch.randn(k, dtype=torch.float64)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = F.conv2d(x, weight, None, **kw)
    residual = torch.randn_like(out)
    ref = conv2d_bias_act_reference(x, weight, bias, residual=residual, **kw)
    cast = [t.to(dtype) for t in (x, weight, bias, residual)]
    if cl:
        cast[0] = cast[0].to(memory_format=torch.channels_last)
        cast[3] = cast[3].to(memory_format=torch.channels_last)
    return cast, kw, ref


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernel_matches_reference(shape, cl):
    (x, w, b, r), kw, ref = _case(shape, cl=cl)
    with torch.no_grad():
        y = conv2d_bias_act(x, w, b, residual=r, **kw)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        y2 = conv2d_bias_act(x, w, None, activation=None, **kw)
        torch.testing.assert_close(y2.double(), F.conv2d(x.double(), w.double(), None, **kw), rtol=1e-5, atol=1e-5)


def test_float64_takes_the_epilogue_path_exactly():
    (x, w, b, r), kw, ref = _case(SHAPES[1], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(conv2d_bias_act(x, w, b, residual=r, **kw), ref, rtol=1e-12, atol=1e-12)


def test_prepacked_weight():
    (x, w, b, r), kw, ref = _case(SHAPES[0])
    wp = prepack_weight(w, stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"], groups=1)
    with torch.no_grad():
        torch.testing.assert_close(conv2d_bias_act(x, wp, b, residual=r, **kw).double(), ref, rtol=1e-5, atol=1e-5)


# (N, C, K, H, W): odd and even sizes, a single pixel, several tile blocks per thread
WINOGRAD_SHAPES = [(2, 8, 16, 5, 7), (1, 16, 8, 1, 1), (3, 8, 8, 2, 9), (4, 32, 24, 17, 12)]


@pytest.mark.parametrize("shape", WINOGRAD_SHAPES)
@pytest.mark.parametrize("bias,residual,activation", [(True, True, "relu"), (False, False, None), (True, False, "relu")])
def test_winograd_matches_float64(shape, bias, residual, activation):
    """The Winograd 3x3 path against the float64 direct convolution: its error is of the
    size of float32 direct convolution's own (both measured here, Winograd's bounded by 4x)."""
    n, c, k, h, w = shape
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    wt = torch.randn(k, c, 3, 3, dtype=torch.float64) / (9 * c) ** 0.5
    b = torch.randn(k, dtype=torch.float64) if bias else None
    r = torch.randn(n, k, h, w, dtype=torch.float64) if residual else None
    ref = conv2d_bias_act_reference(x, wt, b, padding=1, residual=r, activation=activation)
    f32 = [None if t is None else t.float() for t in (x, wt, b, r)]
    x32, w32, b32, r32 = f32
    x32 = x32.to(memory_format=torch.channels_last)
    packed = prepack_weight(w32, stride=1, padding=1, dilation=1, groups=1)
    assert isinstance(packed, Winograd)
    with torch.no_grad():
        y = conv2d_bias_act(x32, packed, b32, padding=1, residual=r32, activation=activation)
        direct = conv2d_bias_act_reference(x32, w32, b32, padding=1, residual=r32, activation=activation)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    err, direct_err = (y.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()
    assert err <= max(4 * direct_err, 1e-6), (err, direct_err)


def test_winograd_takes_nchw_input_through_the_direct_path():
    (x, w, b, r), kw, ref = _case((8, 8, 6, 6, 3, 1, 1, 1, 1))
    packed = prepack_weight(w, **kw)
    assert isinstance(packed, Winograd)
    with torch.no_grad():
        y = conv2d_bias_act(x, packed, b, residual=r, **kw)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_winograd_weight_rejects_bad_residual_like_the_direct_path():
    x = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3)
    packed = prepack_weight(w, stride=1, padding=1, dilation=1, groups=1)
    assert isinstance(packed, Winograd)
    with torch.no_grad(), pytest.raises(TypeError, match="residual must have dtype torch.float32"):
        conv2d_bias_act(x, packed, None, padding=1, residual=torch.randn(1, 8, 4, 4, dtype=torch.float64))
    with torch.no_grad(), pytest.raises(ValueError, match="residual must have the output's shape"):
        conv2d_bias_act(x, packed, None, padding=1, residual=torch.randn(1, 8, 4, 5))


def test_winograd_only_where_it_applies(monkeypatch):
    w = torch.randn(8, 8, 3, 3)
    assert isinstance(prepack_weight(w, stride=1, padding=1, dilation=1, groups=1), Winograd)
    for kw in (dict(stride=2, padding=1, dilation=1, groups=1), dict(stride=1, padding=2, dilation=2, groups=1),
               dict(stride=1, padding=1, dilation=1, groups=2)):
        assert not isinstance(prepack_weight(w if kw["groups"] == 1 else w[:, :4], **kw), Winograd), kw
    assert not isinstance(prepack_weight(torch.randn(8, 3, 3, 3), stride=1, padding=1, dilation=1, groups=1), Winograd)
    assert not isinstance(prepack_weight(w.double(), stride=1, padding=1, dilation=1, groups=1), Winograd)
    few_tiles = [1, 8, 2 * torch.get_num_threads(), 8]  # 4 tiles per thread
    assert not isinstance(prepack_weight(w, stride=1, padding=1, dilation=1, groups=1, input_size=few_tiles), Winograd)
    enough = [1, 8, 2 * torch.get_num_threads(), 32]  # 16 tiles per thread
    assert isinstance(prepack_weight(w, stride=1, padding=1, dilation=1, groups=1, input_size=enough), Winograd)
    monkeypatch.setenv("SKIPFAST_WINOGRAD", "0")
    assert not isinstance(prepack_weight(w, stride=1, padding=1, dilation=1, groups=1), Winograd)


def test_winograd_kernel_rejects_bad_input():
    x = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
    u = Winograd(torch.randn(8, 8, 3, 3)).u
    with pytest.raises(RuntimeError, match="u must be the float32 \\[16, 8, K\\] transformed weight"):
        torch.ops.skipfast.conv3x3_winograd(x, u[:, :4], None, None, True)
    with pytest.raises(RuntimeError, match="channels must be multiples of 8"):
        torch.ops.skipfast.conv3x3_winograd(x[:, :4], Winograd(torch.randn(8, 4, 3, 3)).u, None, None, True)
    with pytest.raises(RuntimeError, match="residual must be float32 of the output's shape"):
        torch.ops.skipfast.conv3x3_winograd(x, u, None, torch.randn(1, 8, 4, 5), True)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.ops.skipfast.conv3x3_winograd(x, u, torch.randn(4), None, True)


def test_winograd_opcheck():
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    u = Winograd(torch.randn(16, 8, 3, 3)).u
    args = (x, u, torch.randn(16), torch.randn(2, 16, 5, 5).to(memory_format=torch.channels_last), True)
    torch.library.opcheck(torch.ops.skipfast.conv3x3_winograd.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision(dtype, cl):
    """bfloat16 takes oneDNN's fused path where this CPU has it, else convolution + the
    epilogue pass; float16 always the latter. Either way as good as eager in that dtype."""
    (x, w, b, r), kw, ref = _case(SHAPES[1], dtype=dtype, cl=cl)
    with torch.no_grad():
        y = conv2d_bias_act(x, w, b, residual=r, **kw)
        eager = conv2d_bias_act_reference(x, w, b, residual=r, **kw)
    assert y.dtype == dtype
    assert_low_precision_ok(y, eager, ref)
    wp = prepack_weight(w, stride=kw["stride"], padding=kw["padding"], dilation=kw["dilation"], groups=1)
    with torch.no_grad():
        assert_low_precision_ok(conv2d_bias_act(x, wp, b, residual=r, **kw), eager, ref)


def test_opcheck():
    (x, w, b, r), kw, _ = _case(SHAPES[1])
    args = (x, w, b, [kw["stride"]] * 2, [kw["padding"]] * 2, [kw["dilation"]] * 2, 1, r, "relu")
    torch.library.opcheck(torch.ops.skipfast.conv2d_bias_act.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    (x, w, b, r), kw, ref = _case(SHAPES[0])
    torch._dynamo.reset()
    fn = torch.compile(lambda x, r: conv2d_bias_act(x, w, b, residual=r, **kw), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, r).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] == 1][:5])
def test_triton_kernel_interpreter(shape, dtype):
    (x, w, b, r), kw, ref = _case(shape, dtype=dtype, cl=True)
    y = tk.conv2d_bias_act(x, w, b, [kw["stride"]] * 2, [kw["padding"]] * 2, [kw["dilation"]] * 2, r, True)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    else:
        eager = conv2d_bias_act_reference(x.float(), w.float(), b.float(), residual=r.float(), **kw).to(dtype)
        err = (y.double() - ref).abs().max()
        assert err <= 2 * (eager.double() - ref).abs().max() + 2e-3 * ref.abs().max()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(residual=torch.randn(2, 8, 6, 6)), "residual must have the output's shape"),
        (dict(groups=2), "x has 3 channels but weight"),
        (dict(activation="gelu"), "activation must be 'relu' or None"),
        (dict(bias=torch.randn(7)), r"bias must be \[8\]"),
    ],
)
def test_bad_inputs(kwargs, match):
    x, w = torch.randn(2, 3, 7, 7), torch.randn(8, 3, 3, 3)
    kw = dict(padding=1) | kwargs
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=f"skipfast.conv2d_bias_act: {match}"):
        conv2d_bias_act(x, w, **kw)


def test_dtype_mismatch_and_grad_rejected():
    x, w = torch.randn(2, 3, 7, 7), torch.randn(8, 3, 3, 3)
    with torch.no_grad(), pytest.raises(TypeError, match="weight must have the dtype of x"):
        conv2d_bias_act(x, w.double())
    with pytest.raises(RuntimeError, match="inference op"):
        conv2d_bias_act(x, w.requires_grad_())


def _conv_bn(c=4, k=6):
    conv, bn = nn.Conv2d(c, k, 3, padding=1, bias=True), nn.BatchNorm2d(k)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return conv.eval(), bn.eval()


def test_fold_bn_exact():
    conv, bn = _conv_bn()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    w, b = fold_bn(conv, bn)
    c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    ref = b64(c64(x))
    torch.testing.assert_close(F.conv2d(x, w.double(), b.double(), padding=1), ref, rtol=1e-6, atol=1e-6)
    assert w.dtype == torch.float32


def _folded_matches(fold, conv, bn, x):
    with torch.no_grad():
        torch.testing.assert_close(fold(conv, bn, x, None, "relu"), torch.relu(bn(conv(x))), rtol=1e-5, atol=1e-5)


def test_no_stale_fold():
    conv, bn = _conv_bn()
    fold = FoldedConvBN()
    x = torch.randn(2, 4, 8, 8)
    _folded_matches(fold, conv, bn, x)
    # load_state_dict
    other_conv, other_bn = _conv_bn()
    conv.load_state_dict(other_conv.state_dict())
    bn.load_state_dict(other_bn.state_dict())
    _folded_matches(fold, conv, bn, x)
    # a training step: weights and running stats change in place
    conv.train(), bn.train()
    opt = torch.optim.SGD(list(conv.parameters()) + list(bn.parameters()), lr=0.5)
    bn(conv(x)).square().mean().backward()
    opt.step()
    conv.eval(), bn.eval()
    _folded_matches(fold, conv, bn, x)
    # .to(dtype)
    conv.double(), bn.double()
    _folded_matches(fold, conv, bn, x.double())


def test_fold_bn_bad_inputs():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="no running statistics"):
        fold_bn(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="bn has 5 features but conv has 4"):
        fold_bn(conv, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="bn must be a BatchNorm"):
        fold_bn(conv, nn.ReLU())


def test_winograd_counts_as_the_direct_convolution_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        packed = prepack_weight(w, stride=1, padding=1, dilation=1, groups=1)  # the transform is not counted
        conv2d_bias_act(x, packed, None, padding=1)
    assert isinstance(packed, Winograd)
    assert counter.get_total_flops() == 2 * 2 * 16 * 6 * 6 * 8 * 9
