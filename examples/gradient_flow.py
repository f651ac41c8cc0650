"""Gradient flow in deep plain and residual networks (the tutorial's exercise 1).

Builds three 50-layer networks of the same width (a 3x3 stem, 48 3x3 convolutions, a
linear head) and runs one backward pass on a synthetic batch:

- plain:         conv-ReLU stack (PyTorch's default initialisation, no normalisation);
- plain + BN:    conv-BN-ReLU stack;
- residual:      24 ``skipfast.ResidualBlock``s.

``skipfast.diagnostics.gradient_norms`` gives each layer's weight-gradient norm. The
script prints, for each network, the ratio of the first layer's gradient norm to the last
layer's, and plots the norms per layer (log scale). Without shortcuts the gradient
reaching the first layers is orders of magnitude off: vanishing in the plain stack,
exploding once BatchNorm is added; with shortcuts it stays within one to two orders.

    python examples/gradient_flow.py            # batch 32 of 3x16x16
    python examples/gradient_flow.py --quick    # batch 8 of 3x8x8
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import skipfast
from skipfast.diagnostics import gradient_norms

DEPTH = 50  # stem + 48 body convolutions + linear head


def plain_net(width: int, batch_norm: bool, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(DEPTH - 2):
        layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def residual_net(width: int, classes: int = 10) -> nn.Sequential:
    blocks = [skipfast.ResidualBlock(width) for _ in range((DEPTH - 2) // 2)]
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def layer_norms(model: nn.Module, loss: torch.Tensor) -> list[float]:
    """Weight-gradient norms of the convolution and linear layers, in layer order."""
    norms = gradient_norms(model, loss)
    weights = {name for name, p in model.named_parameters() if p.dim() > 1}
    return [v for name, v in norms.items() if name in weights]


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller batch and images (seconds)")
    p.add_argument("--width", type=int, default=16, help="channels of every layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, size = (8, 8) if args.quick else (32, 16)

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    nets = {}
    torch.manual_seed(args.seed)
    nets["plain"] = plain_net(args.width, batch_norm=False)
    nets["plain + BN"] = plain_net(args.width, batch_norm=True)
    nets["residual"] = residual_net(args.width)

    print(f"{DEPTH}-layer networks, width {args.width}, batch {batch} of 3x{size}x{size}")
    norms, ratios = {}, {}
    for name, net in nets.items():
        norms[name] = layer_norms(net, F.cross_entropy(net(x), y))
        assert len(norms[name]) == DEPTH, (name, len(norms[name]))
        ratios[name] = norms[name][0] / norms[name][-1]
        print(f"{name:<11} gradient norm first/last layer: {ratios[name]:.3e}   "
              f"(first {norms[name][0]:.3e}, last {norms[name][-1]:.3e}, "
              f"min {min(norms[name]):.3e}, max {max(norms[name]):.3e})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in norms.items():
        ax.semilogy(range(1, DEPTH + 1), values, marker=".", label=f"{name} (first/last {ratios[name]:.1e})")
    ax.set_xlabel("layer (1 = first convolution, 50 = linear head)")
    ax.set_ylabel("weight-gradient L2 norm")
    ax.set_title(f"Gradient norms per layer, {DEPTH}-layer networks at initialisation")
    ax.legend()
    path = os.path.join(args.out, "gradient_flow.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
    return ratios


if __name__ == "__main__":
    main()
