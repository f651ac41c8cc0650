"""The deepest DenseNet-BC (k=12, three blocks, 32x32 inputs) whose training step fits a
memory budget, skipfast's concat-free blocks vs eager concatenation (torch.cat, as
torchvision's memory_efficient=False).

Memory here is the bytes saved for backward by one training forward (each storage
counted once, parameters excluded): it does not depend on the device, so the table holds
for any machine. A depth fits when its saved bytes are within the budget.

    python benchmarks/dense_depth_budget.py --budget-mib 512 --batch 16
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from skipfast import _backend
from skipfast.models.densenet import DenseNet

DEPTHS = [40, 64, 100, 148, 190, 250, 310]


def saved_mib(depth: int, batch: int, eager: bool) -> float:
    n = (depth - 4) // 6
    torch.manual_seed(0)
    model = DenseNet(12, (n, n, n), 24, num_classes=10, imagenet_stem=False).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with _backend.forced("reference") if eager else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(batch, 3, 32, 32))
    return sum(seen.values()) / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-mib", type=float, default=512.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--depths", type=int, nargs="*", default=DEPTHS)
    args = p.parse_args(argv)
    print(f"DenseNet-BC k=12, batch {args.batch}, 32x32, training: bytes saved for backward (MiB); "
          f"budget {args.budget_mib:.0f} MiB")
    print(f"{'depth':>6}{'eager':>10}{'skipfast':>10}{'ratio':>8}")
    deepest = {"eager": None, "skipfast": None}
    for depth in args.depths:
        e, s = saved_mib(depth, args.batch, True), saved_mib(depth, args.batch, False)
        print(f"{depth:>6}{e:>10.1f}{s:>10.1f}{s / e:>8.2f}", flush=True)
        for name, v in (("eager", e), ("skipfast", s)):
            if v <= args.budget_mib:
                deepest[name] = depth
    def say(depth):
        if depth is None:
            return "none tried"
        return f"{depth} or more (the deepest tried)" if depth == args.depths[-1] else str(depth)

    print(f"deepest within {args.budget_mib:.0f} MiB: eager {say(deepest['eager'])}, skipfast {say(deepest['skipfast'])}")


if __name__ == "__main__":
    main()
