"""Measured ceilings of this device: device-to-device copy bandwidth and matmul rates.

``python -m skipfast.bench.ceilings --out ceilings.json`` (CUDA; ``--device cpu`` works
for testing the code path with small sizes). Fused elementwise kernels are judged
against the copy bandwidth (bytes a perfect kernel must move / time), convolution-heavy
cases against the matmul rate of their dtype."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, device: torch.device, reps: int = 20) -> float:
    fn()  # warm-up (cuBLAS handles, allocator)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> dict:
    """GB/s of ``dst.copy_(src)``, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return {"bytes": nbytes, "ms": ms, "GBps": 2 * nbytes / (ms * 1e-3) / 1e9}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, allow_tf32: bool = False) -> dict:
    """TFLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        ms = _median_ms(lambda: a @ b, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tf32": allow_tf32, "ms": ms,
            "TFLOPs": 2 * n**3 / (ms * 1e-3) / 1e12}


def measure(device: torch.device, copy_bytes: int = 1 << 30, n: int = 8192) -> dict:
    out = {"device": str(device), "copy": copy_bandwidth(device, copy_bytes),
           "matmul_bf16": matmul_rate(device, n, torch.bfloat16)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["matmul_tf32"] = matmul_rate(device, n, torch.float32, allow_tf32=True)
        out["matmul_fp32"] = matmul_rate(device, n, torch.float32, allow_tf32=False)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m skipfast.bench.ceilings", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--n", type=int, default=8192, help="matmul size")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    res = measure(torch.device(args.device), args.copy_mib << 20, args.n)
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
