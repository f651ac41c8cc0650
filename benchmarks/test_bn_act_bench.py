"""Residual tail in training: eager bn -> add -> relu, torch.compile of that sequence, and
skipfast.BatchNormAct2d (fused), forward / backward / forward+backward, NCHW and
channels_last, at ResNet shapes.

    pytest benchmarks/test_bn_act_bench.py --benchmark-only \
        --benchmark-group-by=param:shape,param:layout,param:mode --benchmark-columns=min,median,rounds

Gradients of x and the residual are reset before each timed forward+backward, as a
training step's are (no accumulation pass). SKIPFAST_BENCH_ROUNDS sets the rounds (15).
"""
import os

import pytest
import torch

import skipfast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(16, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7)]
ROUNDS = int(os.environ.get("SKIPFAST_BENCH_ROUNDS", 15))
_compiled = {}
# Every case compiles the same function `eager` for its own shape, layout and grad mode (18
# graphs): past dynamo's recompile limit (8) a compiled call would silently run eagerly.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _tail(provider, C, layout, mode):
    if provider == "skipfast":
        m = skipfast.BatchNormAct2d(C).to(DEVICE)
        return lambda x, r: m(x, r)
    bn = torch.nn.BatchNorm2d(C).to(DEVICE)

    def eager(x, r):
        return torch.relu(bn(x) + r)

    if provider == "eager":
        return eager
    key = (C, layout, mode)  # one compiled function per case: recompiles stay out of the timing
    if key not in _compiled:
        _compiled[key] = torch.compile(eager, dynamic=False)
    return _compiled[key]


def case_inputs(shape, layout, mode):
    """x, residual and grad_out of one case (seeded)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt).requires_grad_(mode != "fwd")
    r = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt).requires_grad_(mode != "fwd")
    g = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt)
    return x, r, g


def checked_tail(provider, shape, layout, mode, x, r):
    """The provider's tail for one case, checked against eager on (x, r) first (which also
    warms it up and compiles it)."""
    fn = _tail(provider, shape[1], layout, mode)
    ref = torch.relu(torch.nn.functional.batch_norm(x.detach(), None, None, training=True) + r.detach())
    torch.testing.assert_close(fn(x, r).detach(), ref, rtol=1e-4, atol=1e-4)
    return fn


@pytest.mark.parametrize("provider", ["eager", "compile", "skipfast"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_add_relu_training(benchmark, shape, layout, mode, provider):
    x, r, g = case_inputs(shape, layout, mode)
    fn = checked_tail(provider, shape, layout, mode, x, r)
    benchmark.extra_info.update(device=DEVICE, dtype="float32", threads=torch.get_num_threads())

    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x, r)
            _sync()

        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    elif mode == "fwd+bwd":
        def fresh_grads():  # as in training: gradients are written, not accumulated
            x.grad = r.grad = None

        def run():
            fn(x, r).backward(g)
            _sync()

        benchmark.pedantic(run, setup=fresh_grads, rounds=ROUNDS, warmup_rounds=1)
    else:
        def setup():
            x.grad = r.grad = None
            return (fn(x, r),), {}

        def run(y):
            y.backward(g)
            _sync()

        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1)
