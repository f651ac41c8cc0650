"""Highway gate: eager PyTorch (sigmoid, mul, rsub, mul, add: five passes, five saved
tensors) against skipfast's one-pass op, forward and forward+backward.

    python -m pytest benchmarks/test_highway_bench.py --benchmark-group-by=param:shape,param:mode
"""
import pytest
import torch

import skipfast
from skipfast.ops.highway import highway_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(32, 64, 56, 56), (4096, 1024)] if DEVICE.type == "cuda" else [(8, 64, 56, 56), (1024, 1024)]
IMPLS = {"eager": highway_reference, "skipfast": skipfast.ops.highway}


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_highway(benchmark, impl, mode, dtype, shape):
    fn = IMPLS[impl]
    h, g, x = (torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=(mode != "fwd")) for _ in range(3))
    grad = torch.randn(shape, device=DEVICE, dtype=dtype)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(h, g, x)
        else:
            fn(h, g, x).backward(grad)
            h.grad = g.grad = x.grad = None
        _sync()

    benchmark.extra_info.update(device=str(DEVICE), threads=torch.get_num_threads())
    benchmark(run)
