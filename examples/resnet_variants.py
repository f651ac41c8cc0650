"""ResNet-50 and ResNet-101 built from ``skipfast.BottleneckBlock`` (the tutorial's
exercise 2).

Builds both networks from bottleneck blocks (stages of 3-4-6-3 and 3-4-23-3 blocks,
widths 64-128-256-512, expansion 4), checks that torchvision's weights load into them
with ``strict=True``, prints parameter counts (25.6M and 44.5M, as torchvision) and
multiply-accumulates per 224x224 image, and times a forward/backward pass against
torchvision's eager model.

    python examples/resnet_variants.py            # timing at batch 8, 3x224x224
    python examples/resnet_variants.py --quick    # timing at batch 2, 3x64x64
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from skipfast import BottleneckBlock


class BottleneckResNet(nn.Module):
    """ResNet v1.5 from bottleneck blocks, with torchvision's module names."""

    def __init__(self, blocks_per_stage: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            blocks = []
            for i in range(n):
                blocks.append(BottleneckBlock(channels, width, stride=2 if stage > 0 and i == 0 else 1))
                channels = width * BottleneckBlock.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


VARIANTS = {"ResNet-50": ([3, 4, 6, 3], torchvision.models.resnet50),
            "ResNet-101": ([3, 4, 23, 3], torchvision.models.resnet101)}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = 224) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and matrix
    products, counted by torch's FlopCounterMode: 2 FLOPs per MAC). skipfast's fused
    convolution registers its own formula, so the eval-mode fused path is counted too."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def fwd_bwd_ms(model: nn.Module, x: torch.Tensor, warmup: int, reps: int) -> float:
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small timing input, one repetition")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, size, warmup, reps = (2, 64, 1, 1) if args.quick else (8, 224, 1, 3)

    counts, models = {}, {}
    print(f"{'model':<12}{'params':>14}{'':>8}{'MACs/image':>14}{'torchvision params':>20}")
    for name, (stages, tv_builder) in VARIANTS.items():
        torch.manual_seed(0)
        ours, tv = BottleneckResNet(stages), tv_builder()
        ours.load_state_dict(tv.state_dict(), strict=True)  # same names, same shapes
        models[name] = ours, tv
        counts[name] = count_params(ours)
        print(f"{name:<12}{counts[name]:>14,}{counts[name] / 1e6:>7.1f}M{count_macs(ours) / 1e9:>13.2f}G"
              f"{count_params(tv):>20,}", flush=True)
    print(f"\nforward+backward, batch {batch} of 3x{size}x{size}, median of {reps}, {torch.get_num_threads()} threads")
    print(f"{'model':<12}{'torchvision ms':>16}{'skipfast ms':>14}{'speedup':>9}")
    x = torch.randn(batch, 3, size, size)
    for name, (ours, tv) in models.items():
        t_tv = fwd_bwd_ms(tv, x, warmup, reps)
        t_sf = fwd_bwd_ms(ours, x, warmup, reps)
        print(f"{name:<12}{t_tv:>16.1f}{t_sf:>14.1f}{t_tv / t_sf:>8.2f}x", flush=True)
    return counts


if __name__ == "__main__":
    main()
