"""The residual-tail benchmark of test_bn_act_bench.py, interleaved: every round times
eager, torch.compile and skipfast in turn on each (shape, layout, mode), so a slow phase
of a shared machine falls on all three alike (pytest-benchmark times each provider's
rounds back to back). Same modules, inputs, correctness check and modes (fwd, fwd+bwd).

    python benchmarks/bn_act_rounds.py [--rounds 30] [--json out.json]

Prints a markdown table of medians (ms) and ratios. The heap is held in the steady state
of benchmarks/conftest.py (SKIPFAST_BENCH_MALLOC=default leaves glibc's settings).

Each round also times a copy of x into a preallocated tensor of its shape and layout (one
read, one write): the memory ceiling of that round. The "% of copy" column is the fewest
bytes the fused op must move (forward: x, residual, output and a 1-bit mask; backward adds
grad_out, x and the mask read, the x and residual gradients written) over skipfast's median
time, against the copy's bytes over its median time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import conftest  # noqa: F401  (heap settings)
from test_bn_act_bench import DEVICE, SHAPES, _sync, case_inputs, checked_tail

PROVIDERS = ("eager", "compile", "skipfast")
MODES = ("fwd", "fwd+bwd")


def _case(shape, layout, mode):
    """(provider -> (setup, run)) for one case, each checked against eager first."""
    x, r, g = case_inputs(shape, layout, mode)  # shared by the providers

    def fresh():
        x.grad = r.grad = None

    runs = {}
    for p in PROVIDERS:
        fn = checked_tail(p, shape, layout, mode, x, r)

        if mode == "fwd":
            def run(fn=fn):
                with torch.no_grad():
                    fn(x, r)
                _sync()
        else:
            def run(fn=fn):
                fn(x, r).backward(g)
                _sync()
        runs[p] = (fresh, run)
    out = torch.empty_like(x)

    def copy():
        with torch.no_grad():
            out.copy_(x)
        _sync()

    runs["copy"] = (lambda: None, copy)
    return runs


def min_bytes(shape, mode):
    """Fewest bytes the fused op moves (float32): see the module docstring."""
    n = math.prod(shape)
    fwd = 3 * 4 * n + n // 8
    return fwd if mode == "fwd" else fwd + 4 * 4 * n + n // 8


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", help="write the per-round times (ms) here")
    args = ap.parse_args(argv)
    results = []
    cases = [(s, lay, m) for s in SHAPES for lay in ("nchw", "channels_last") for m in MODES]
    for i, (shape, layout, mode) in enumerate(cases, 1):
        runs = _case(shape, layout, mode)
        times = {p: [] for p in runs}
        for k in range(args.rounds + 1):  # round 0 warms up
            for p, (setup, run) in runs.items():
                setup()
                t0 = time.perf_counter()
                run()
                if k:
                    times[p].append((time.perf_counter() - t0) * 1e3)
        med = {p: statistics.median(v) for p, v in times.items()}
        results.append(dict(shape=list(shape), layout=layout, mode=mode, rounds=args.rounds, median_ms=med,
                            times_ms=times, threads=torch.get_num_threads(), device=str(DEVICE)))
        print(f"[{i}/{len(cases)}] {shape} {layout} {mode}: " +
              ", ".join(f"{p} {med[p]:.3f}" for p in PROVIDERS), flush=True)
    print("\n| shape | layout | mode | eager | compile | skipfast | vs eager | vs compile | % of copy |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["median_ms"]
        copy_rate = 2 * 4 * math.prod(r["shape"]) / m["copy"]
        r["skipfast_share_of_copy"] = min_bytes(r["shape"], r["mode"]) / m["skipfast"] / copy_rate
        print(f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['mode']} | {m['eager']:.2f} | "
              f"{m['compile']:.2f} | {m['skipfast']:.2f} | {m['eager'] / m['skipfast']:.2f}x | "
              f"{m['compile'] / m['skipfast']:.2f}x | {100 * r['skipfast_share_of_copy']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
