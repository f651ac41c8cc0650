"""The degradation problem: deeper plain networks train worse; residual ones do not.

Trains four CIFAR-style networks (He et al. 2016, section 4.2: 6n+2 weight layers,
three stages of widths w, 2w, 4w) for the same number of steps on a synthetic
10-class image set generated here: plain-20, plain-56, residual-20 and residual-56.
The residual networks are built from ``skipfast.ResidualBlock`` (last BN of each block
initialised to zero, so every block starts as the identity); the plain ones are the same
blocks without the shortcut. The set is made hard enough that no network reaches zero
loss in the step budget (each class is several unrelated patterns), so capacity shows.
The final training loss of each network is one pass over the whole training set in eval
mode after training (no minibatch noise). Prints the four and plots the curves.

    python examples/degradation.py            # default: 3-6 minutes on a (shared) 2-core CPU
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


def synthetic_images(n: int, size: int, classes: int = 10, patterns: int = 4, noise: float = 1.0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is ``patterns`` unrelated smooth random colour patterns; a sample is one
    pattern of its class shifted by a random offset (circularly), scaled in contrast, with
    pixel noise on top. The network must learn classes*patterns shapes, each under any shift,
    and group them: a 20-layer net does not finish that in the default step budget."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes * patterns, 3, size // 4, size // 4, generator=g),
                              size=(size, size), mode="bicubic", align_corners=False)
    templates = (templates - templates.mean((1, 2, 3), keepdim=True)) / templates.std((1, 2, 3), keepdim=True)
    which = torch.randint(0, classes * patterns, (n,), generator=g)
    shifts = torch.randint(-size // 4, size // 4 + 1, (n, 2), generator=g)
    x = torch.empty(n, 3, size, size)
    for i in range(n):
        x[i] = torch.roll(templates[which[i]], (int(shifts[i, 0]), int(shifts[i, 1])), (1, 2))
    x *= torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
    x += noise * torch.randn(x.shape, generator=g)
    return x, which // patterns


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          desc: str) -> list[float]:
    """SGD with momentum; learning rate warmed up linearly over the first 5% of the steps, then
    cosine-annealed to zero, so the final weights (and BN running statistics) settle."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def training_set_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Mean cross-entropy over the whole training set, in eval mode (BN running statistics)."""
    net.eval()
    total = sum(F.cross_entropy(net(x[i:i + batch]), y[i:i + batch], reduction="sum").item()
                for i in range(0, x.shape[0], batch))
    net.train()
    return total / x.shape[0]


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
    p.add_argument("--steps", type=int, help="training steps per network (default 400, quick 40)")
    p.add_argument("--width", type=int, help="first-stage channels (default 8, quick 4)")
    p.add_argument("--size", type=int, help="image size (default 16, quick 8)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, help="training set size (default 8192, quick 1024)")
    p.add_argument("--patterns", type=int, default=4, help="unrelated patterns per class (task difficulty)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (warmup, then cosine to zero)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data set, the weights and the batches")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these small nets run fastest on one, above all on a busy machine)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 400)
    width = args.width or (4 if args.quick else 8)
    size = args.size or (8 if args.quick else 16)
    samples = args.samples or (1024 if args.quick else 8192)

    x, y = synthetic_images(samples, size, patterns=args.patterns, seed=args.seed)
    print(f"synthetic set: {samples} images 3x{size}x{size}, 10 classes of {args.patterns} patterns each; "
          f"{steps} steps of batch {args.batch}, SGD lr {args.lr} (warmup + cosine), width {width}, "
          f"threads {torch.get_num_threads()}, seed {args.seed}")
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
            final[name] = training_set_loss(net, x, y)
            print(f"{name:<12} final training loss {final[name]:.4f} (eval-mode pass over the {samples} "
                  f"training images)  [{time.perf_counter() - t0:.0f}s]", flush=True)
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
        ax.plot(curve, label=f"{name} (final {final[name]:.3f})", linestyle="-" if name.startswith("residual") else "--")
    ax.set_xlabel("step")
    ax.set_ylabel(f"minibatch training loss (moving mean over {window} steps)")
    ax.set_title("Degradation: plain vs residual, 20 vs 56 layers")
    ax.legend()
    path = os.path.join(args.out, "degradation.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
    return final


if __name__ == "__main__":
    main()
