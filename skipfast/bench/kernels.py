"""Device time of the fused kernels alone, without the host's launch overhead.

``python -m skipfast.bench.kernels --out kernels.json`` (CUDA). Each op runs under
torch.profiler; the time is the sum of the GPU kernels (and memsets/copies) one call
launches, averaged over the calls. Elementwise phases are reported as bandwidth (the
fewest bytes a kernel must move over that time) against the measured device-to-device
copy bandwidth; convolutions as TFLOP/s. Providers: ``eager`` (the PyTorch sequence the op
replaces), ``cpp`` (CUDA C++) and ``triton`` (skipfast's Triton kernels), each forced
through SKIPFAST_BACKEND.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .. import _backend
from . import ceilings

CL = torch.channels_last


def device_us(fn, calls: int = 20, per_kernel: dict | None = None) -> float:
    """Mean GPU time per call of fn (µs), kernels only. Where per_kernel is a dict, it gets
    each kernel's mean time per call, by name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if per_kernel is not None:
        for e in gpu:
            name = e.name.replace("(anonymous namespace)::", "").removeprefix("void ")
            name = name.split("(")[0].split("<")[0].split("::")[-1]
            per_kernel[name] = per_kernel.get(name, 0.0) + e.time_range.elapsed_us() / calls
    return sum(e.time_range.elapsed_us() for e in gpu) / calls


def _bn_cases(shape, fmt):
    import skipfast
    from skipfast.ops.bn_act import batch_norm_act

    c = shape[1]
    x = torch.randn(shape, device="cuda").contiguous(memory_format=fmt)
    r = torch.randn(shape, device="cuda").contiguous(memory_format=fmt)
    w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    n = x.numel()
    e = x.element_size()
    dst = torch.empty_like(x)

    def eager_train():
        return torch.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5) + r)

    def fused_train():
        return batch_norm_act(x, w, b, None, None, training=True, residual=r)

    def eager_eval():
        return torch.relu(F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5) + r)

    def fused_eval():
        return batch_norm_act(x, w, b, rm, rv, training=False, residual=r)

    xg, rg = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    wg, bg = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    dy = torch.randn_like(x)

    def bwd(fwd):
        def run():
            y = fwd(xg, wg, bg, rg)
            y.backward(dy)
            xg.grad = rg.grad = wg.grad = bg.grad = None
        return run

    def eager_fb(xx, ww, bb, rr):
        return torch.relu(F.batch_norm(xx, None, None, ww, bb, True, 0.1, 1e-5) + rr)

    def fused_fb(xx, ww, bb, rr):
        return skipfast.ops.batch_norm_act(xx, ww, bb, None, None, training=True, residual=rr)

    def copy():
        dst.copy_(x)

    return (copy, 2 * n * e), [
        # (name, eager fn, fused fn, minimum bytes)
        ("bn_act train fwd", eager_train, fused_train, 3 * n * e),
        ("bn_act eval fwd", eager_eval, fused_eval, 3 * n * e),
        ("bn_act train fwd+bwd", bwd(eager_fb), bwd(fused_fb), 7 * n * e + n // 8),
    ]


def _conv_cases(n, c, k, hw, r, stride, dtype):
    from skipfast.ops.conv import conv2d_bias_act

    x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=CL)
    w = (torch.randn(k, c, r, r, device="cuda") / (c * r * r) ** 0.5).to(dtype)
    b = torch.randn(k, device="cuda", dtype=dtype)
    pad = r // 2
    out = F.conv2d(x, w, None, stride, pad)
    res = torch.randn_like(out)
    flops = 2 * out.numel() * c * r * r

    def eager():
        with torch.no_grad():
            return torch.relu(F.conv2d(x, w, b, stride, pad) + res)

    def fused():
        with torch.no_grad():
            return conv2d_bias_act(x, w, b, stride=stride, padding=pad, residual=res)

    return [(f"conv {c}->{k} {r}x{r}/{stride} at {hw}x{hw}, batch {n}", eager, fused, flops)]


BN_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7))
FAMILIES = ("bn_act", "conv")


def measure(calls: int = 20, families=FAMILIES) -> dict:
    copy = ceilings.copy_bandwidth(torch.device("cuda"), 1 << 30)
    rows = []
    for shape in BN_SHAPES if "bn_act" in families else ():
        for fmt, fname in ((torch.contiguous_format, "NCHW"), (CL, "NHWC")):
            (copy_x, copy_bytes), cases = _bn_cases(shape, fmt)
            # the copy of x at this size: its rate is the ceiling a kernel of this size meets
            copy_us = device_us(copy_x, calls)
            for name, eager, fused, nbytes in cases:
                row = {"case": f"{name} {list(shape)} {fname}", "min_bytes": nbytes, "us": {},
                       "copy_us": copy_us, "copy_at_size_GBps": copy_bytes / copy_us / 1e3, "cpp_kernels": {}}
                row["us"]["eager"] = device_us(eager, calls)
                for backend in ("cpp", "triton"):
                    with _backend.forced(backend):
                        row["us"][backend] = device_us(fused, calls, row["cpp_kernels"] if backend == "cpp" else None)
                rows.append(row)
    conv_shapes = ((64, 64, 64, 56, 3, 1), (64, 256, 64, 56, 1, 1), (64, 128, 128, 28, 3, 1), (64, 3, 64, 224, 7, 2))
    for args in conv_shapes if "conv" in families else ():
        for name, eager, fused, flops in _conv_cases(*args, torch.bfloat16):
            row = {"case": f"{name} bf16 NHWC", "flops": flops, "us": {"eager": device_us(eager, calls)}}
            for backend in ("cpp", "triton"):
                with _backend.forced(backend):
                    row["us"][backend] = device_us(fused, calls)
            rows.append(row)
    return {"device": torch.cuda.get_device_name(), "copy_GBps": copy["GBps"], "calls": calls, "rows": rows}


def table(doc: dict) -> str:
    lines = [f"GPU kernel time per call (torch.profiler, {doc['calls']} calls; host overhead excluded) on "
             f"{doc['device']}; copy ceiling {doc['copy_GBps']:.0f} GB/s",
             "| case | eager | cpp | triton | best fused vs eager | best fused achieved | of a copy of x's size |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in doc["rows"]:
        us = row["us"]
        best = min(us["cpp"], us["triton"])
        if "min_bytes" in row:
            gbps = row["min_bytes"] / best / 1e3
            ach = f"{gbps:.0f} GB/s ({gbps / doc['copy_GBps']:.0%} of copy)"
            at_size = f"{gbps / row['copy_at_size_GBps']:.0%} of {row['copy_at_size_GBps']:.0f} GB/s"
        else:
            ach = f"{row['flops'] / best / 1e6:.0f} TFLOP/s"
            at_size = ""
        lines.append(f"| {row['case']} | {us['eager']:.1f} us | {us['cpp']:.1f} us | {us['triton']:.1f} us | "
                     f"{us['eager'] / best:.2f}x | {ach} | {at_size} |")
    for row in doc["rows"]:
        if row.get("cpp_kernels"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["cpp_kernels"].items())
            lines.append(f"- cpp {row['case']}: {parts} us")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m skipfast.bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="kernels.json")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated op families to measure (default {','.join(FAMILIES)})")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        p.error(f"--families: expected a comma-separated subset of {', '.join(FAMILIES)}, got {args.families!r}")
    if not torch.cuda.is_available():
        raise SystemExit("python -m skipfast.bench.kernels: needs a CUDA device")
    doc = measure(args.calls, families)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(table(doc))
    return doc


if __name__ == "__main__":
    main()
