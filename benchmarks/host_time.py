"""Host time per call of the residual tail and a residual block, at a shape so small that
the kernels take a few microseconds: what a call costs in Python, dispatch and autograd
before any memory traffic (on a GPU, the time that leaves a small layer host-bound).

    python benchmarks/host_time.py [--rounds 7] [--calls 1000] [--json out.json]

Pairs, each measured side by side in one process, rounds interleaved (round k times every
case once, in turn): skipfast.BatchNormAct2d(x, residual) against BatchNorm2d + add + relu,
and skipfast's ResidualBlock against torchvision's BasicBlock (same weights), in eval
without grad, training forward without grad, training forward with grad, and training
forward + backward. Per case the best round (us per call) is reported: host time has a
floor, and noise only adds to it. Runs on the CPU.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

import skipfast

SHAPE = (2, 8, 4, 4)
MODES = ("eval", "train fwd (no grad)", "train fwd", "train fwd+bwd")


def _tails():
    C = SHAPE[1]
    bn = torch.nn.BatchNorm2d(C)
    fused = skipfast.BatchNormAct2d(C)
    fused.load_state_dict(bn.state_dict())
    return {"eager": (bn, lambda x, r: torch.relu(bn(x) + r)), "skipfast": (fused, lambda x, r: fused(x, r))}


def _blocks():
    C = SHAPE[1]
    tv = torchvision.models.resnet.BasicBlock(C, C)
    sf = skipfast.ResidualBlock(C, C)
    sf.load_state_dict(tv.state_dict())
    return {"eager": (tv, lambda x, r: tv(x)), "skipfast": (sf, lambda x, r: sf(x))}


def _call(module, fn, mode, x, r, g):
    module.train(mode != "eval")
    if mode == "train fwd+bwd":
        def run():
            x.grad = r.grad = None
            fn(x, r).backward(g)
    elif mode == "train fwd":
        def run():
            fn(x, r)
    else:
        def run():
            with torch.no_grad():
                fn(x, r)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=1000, help="calls per round and case")
    ap.add_argument("--json", help="write the per-round times (us per call) here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(SHAPE, requires_grad=True)
    r = torch.randn(SHAPE, requires_grad=True)
    g = torch.randn(SHAPE)
    cases = []
    for name, pair in (("BN + add + relu", _tails()), ("residual block", _blocks())):
        for mode in MODES:
            for provider, (module, fn) in pair.items():
                cases.append(((name, mode, provider), module, _call(module, fn, mode, x, r, g)))
    times = {key: [] for key, _, _ in cases}
    for k in range(args.rounds + 1):  # round 0 warms up
        for key, module, run in cases:
            module.train(key[1] != "eval")
            t0 = time.perf_counter()
            for _ in range(args.calls):
                run()
            if k:
                times[key].append((time.perf_counter() - t0) / args.calls * 1e6)
        print(f"round {k}/{args.rounds}", flush=True)
    print(f"\nhost time per call, us (best of {args.rounds} rounds x {args.calls} calls), shape {list(SHAPE)}, "
          f"{torch.get_num_threads()} threads\n")
    print("| what | mode | eager | skipfast | skipfast / eager |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for (name, mode, provider), v in times.items():
        if provider != "eager":
            continue
        e, s = min(v), min(times[(name, mode, "skipfast")])
        rows.append(dict(what=name, mode=mode, eager_us=e, skipfast_us=s))
        print(f"| {name} | {mode} | {e:.1f} | {s:.1f} | {s / e:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=list(SHAPE), rounds=args.rounds, calls=args.calls, threads=torch.get_num_threads(),
                           torch=torch.__version__, rows=rows,
                           times_us={" / ".join(k): v for k, v in times.items()}), f, indent=1)


if __name__ == "__main__":
    main()
