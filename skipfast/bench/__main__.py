"""Minimal comparison table: each case runs the eager PyTorch reference and skipfast
on the same inputs, forward and forward+backward, and reports median times."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import skipfast
from skipfast import _backend


def _median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cases(quick: bool):
    n, hw = (8, 28) if quick else (16, 56)
    yield "ResidualBlock", lambda: torchvision.models.resnet.BasicBlock(64, 64), lambda: skipfast.ResidualBlock(64), (n, 64, hw, hw)
    yield ("BottleneckBlock",
           lambda: torchvision.models.resnet.Bottleneck(256, 64), lambda: skipfast.BottleneckBlock(256, 64), (n, 256, hw, hw))
    yield ("DenseBlock",
           lambda: torchvision.models.densenet._DenseBlock(6, 64, 4, 32, 0.0), lambda: skipfast.DenseBlock(64, 32, 6, bn_size=4),
           (n // 2, 64, hw, hw))
    yield "resnet18", torchvision.models.resnet18, skipfast.models.resnet18, (n // 2, 3, 4 * hw, 4 * hw)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m skipfast.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (under a minute on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    warmup, reps = (1, 3) if args.quick else (3, 10)
    print(f"skipfast {skipfast.__version__} | torch {torch.__version__} | device {device} | "
          f"extension {'loaded' if _backend.has_extension() else 'missing'} | threads {torch.get_num_threads()}")
    print(f"{'case':<16}{'mode':<10}{'eager ms':>10}{'skipfast ms':>13}{'speedup':>9}")
    for name, make_ref, make_sf, shape in cases(args.quick):
        ref = make_ref().to(device)
        sf = make_sf().to(device)
        sf.load_state_dict(ref.state_dict())
        x = torch.randn(shape, device=device)
        for mode in ("fwd", "fwd+bwd"):
            def run(model, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        model(x)
                else:
                    model.zero_grad(set_to_none=True)
                    model(x).sum().backward()
            t_ref = _median_ms(lambda: run(ref), warmup, reps)
            t_sf = _median_ms(lambda: run(sf), warmup, reps)
            print(f"{name:<16}{mode:<10}{t_ref:>10.2f}{t_sf:>13.2f}{t_ref / t_sf:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
