"""Inference: torchvision ResNet eager (NCHW, channels_last), torch.compile, and
skipfast.patch (BN folded, bias + residual + ReLU in the convolution's epilogue).

    pytest benchmarks/test_patch_bench.py --benchmark-only --benchmark-group-by=param:name,param:batch

SKIPFAST_BENCH_ROUNDS sets the rounds at the larger batch (5; twice that at batch 1).
"""

import os

import pytest
import torch
import torchvision

import skipfast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = [1, 256] if DEVICE == "cuda" else [1, 8]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = int(os.environ.get("SKIPFAST_BENCH_ROUNDS", 5))
_compiled = {}


def _model(name, provider):
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)().eval().to(DEVICE, DTYPE)
    if provider != "eager":
        m = m.to(memory_format=torch.channels_last)
    if provider == "compile":
        key = (name,)
        if key not in _compiled:
            mode = "max-autotune-no-cudagraphs" if DEVICE == "cuda" else None
            _compiled[key] = torch.compile(m, mode=mode)
        return _compiled[key]
    if provider == "skipfast":
        m = skipfast.patch(m)
    return m


@pytest.mark.parametrize("provider", ["eager", "eager_channels_last", "compile", "skipfast"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_inference(benchmark, name, batch, provider):
    x = torch.randn(batch, 3, 224, 224, device=DEVICE, dtype=DTYPE)
    model = _model(name, provider)
    if provider != "eager":
        x = x.to(memory_format=torch.channels_last)
    ref = _model(name, "eager")
    with torch.inference_mode():
        expected = ref(x.contiguous())
        got = model(x)  # warm-up (and compilation) before timing
        tol = 1e-3 if DTYPE == torch.float32 else 5e-2
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())

        def run():
            model(x)
            if DEVICE == "cuda":
                torch.cuda.synchronize()

        benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE))
        benchmark.pedantic(run, rounds=ROUNDS if batch > 1 else 2 * ROUNDS, warmup_rounds=1)
