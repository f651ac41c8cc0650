"""The degradation problem: deeper plain networks train worse; residual ones do not.

Trains four CIFAR-style networks (He et al. 2016, section 4.2: 6n+2 weight layers,
three stages of widths w, 2w, 4w) for the same number of steps on a synthetic
10-class image set generated here: plain-20, plain-56, residual-20 and residual-56.
The residual networks are built from ``skipfast.ResidualBlock`` (last BN of each block
initialised to zero, so every block starts as the identity); the plain ones are the same
blocks without the shortcut. Prints the four final training losses and plots the
curves.

    python examples/degradation.py            # default: a few minutes on a 2-core CPU
    python examples/degradation.py --quick    # under a minute, tiny sizes
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import skipfast


class PlainBlock(nn.Sequential):
    """ResidualBlock without its shortcut: conv-BN-ReLU-conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def cifar_net(depth: int, residual: bool, width: int, classes: int = 10) -> nn.Sequential:
    """6n+2 layers: a 3x3 stem, 3 stages of n two-conv blocks (strides 1, 2, 2), a linear head."""
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    block = skipfast.ResidualBlock if residual else PlainBlock
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            layers.append(block(cin, cout, 2 if stage > 0 and i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if residual:  # each block starts as the identity (Goyal et al. 2017; torchvision's zero_init_residual)
        for m in net.modules():
            if isinstance(m, skipfast.ResidualBlock):
                nn.init.zeros_(m.get_parameter("bn2.weight"))
    return net


def synthetic_images(n: int, size: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is a smooth random colour pattern; a sample is its class pattern shifted
    by a random offset (circularly), scaled in contrast, with pixel noise on top."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, 3, size // 4, size // 4, generator=g), size=(size, size),
                              mode="bicubic", align_corners=False)
    templates = (templates - templates.mean((1, 2, 3), keepdim=True)) / templates.std((1, 2, 3), keepdim=True)
    labels = torch.randint(0, classes, (n,), generator=g)
    shifts = torch.randint(-size // 4, size // 4 + 1, (n, 2), generator=g)
    x = torch.empty(n, 3, size, size)
    for i in range(n):
        x[i] = torch.roll(templates[labels[i]], (int(shifts[i, 0]), int(shifts[i, 1])), (1, 2))
    x *= torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
    x += 0.8 * torch.randn(x.shape, generator=g)
    return x, labels


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          desc: str) -> list[float]:
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def smooth(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: under a minute on 2 CPU cores")
    p.add_argument("--steps", type=int, help="training steps per network (default 300, quick 40)")
    p.add_argument("--width", type=int, help="first-stage channels (default 8, quick 4)")
    p.add_argument("--size", type=int, help="image size (default 16, quick 8)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, help="training set size (default 4096, quick 1024)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 300)
    width = args.width or (4 if args.quick else 8)
    size = args.size or (8 if args.quick else 16)
    samples = args.samples or (1024 if args.quick else 4096)

    x, y = synthetic_images(samples, size, seed=args.seed)
    print(f"synthetic set: {samples} images 3x{size}x{size}, 10 classes; {steps} steps of batch {args.batch}, "
          f"SGD lr {args.lr}, width {width}, threads {torch.get_num_threads()}")
    curves, final = {}, {}
    window = max(steps // 10, 1)
    for residual in (False, True):
        for depth in (20, 56):
            name = f"{'residual' if residual else 'plain'}-{depth}"
            torch.manual_seed(args.seed)
            net = cifar_net(depth, residual, width)
            t0 = time.perf_counter()
            losses = train(net, x, y, steps, args.batch, args.lr, args.seed, name)
            curves[name] = smooth(losses, window)
            final[name] = sum(losses[-window:]) / window
            print(f"{name:<12} final training loss {final[name]:.4f} (mean of the last {window} steps)  "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    if any(not math.isfinite(v) for v in final.values()):
        print("warning: a loss is not finite")
    print(f"plain: 56 layers {'worse' if final['plain-56'] > final['plain-20'] else 'NOT worse'} than 20 "
          f"({final['plain-56']:.4f} vs {final['plain-20']:.4f}); residual: 56 layers "
          f"{'at or below' if final['residual-56'] <= final['residual-20'] else 'ABOVE'} 20 "
          f"({final['residual-56']:.4f} vs {final['residual-20']:.4f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot(curve, label=name, linestyle="-" if name.startswith("residual") else "--")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean over {window} steps)")
    ax.set_title("Degradation: plain vs residual, 20 vs 56 layers")
    ax.legend()
    path = os.path.join(args.out, "degradation.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
    return final


if __name__ == "__main__":
    main()
