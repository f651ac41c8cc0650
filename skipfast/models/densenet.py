"""DenseNet-121/161/169/201 (torchvision layout) and DenseNet-BC-100 for CIFAR."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dense import DenseBlock, Transition


class DenseNet(nn.Module):
    """DenseNet-BC. ``imagenet_stem=True``: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, as
    torchvision; ``False``: a single 3x3 conv (the CIFAR networks)."""

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16), num_init_features: int = 64,
                 bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000, compression: float = 0.5,
                 imagenet_stem: bool = True, in_channels: int = 3, memory_efficient: bool = False):
        super().__init__()
        # memory_efficient is accepted for torchvision signature compatibility: skipfast's
        # dense blocks are memory-lean by construction.
        if imagenet_stem:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
        else:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False))]
        self.features = nn.Sequential()
        for name, m in stem:
            self.features.add_module(name, m)
        channels = num_init_features
        for i, n in enumerate(block_config):
            block = DenseBlock(channels, growth_rate, n, bn_size=bn_size, drop_rate=drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.out_channels
            if i != len(block_config) - 1:
                out = int(channels * compression)
                self.features.add_module(f"transition{i + 1}", Transition(channels, out))
                channels = out
        self.features.add_module(f"norm{len(block_config) + 1}", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _densenet(growth_rate, block_config, num_init_features, weights=None, progress=True, **kwargs) -> DenseNet:
    if weights is not None:
        kwargs.setdefault("num_classes", len(weights.meta["categories"]))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress), strict=True)
    return model


def densenet121(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 24, 16), 64, weights, progress, **kwargs)


def densenet161(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    return _densenet(48, (6, 12, 36, 24), 96, weights, progress, **kwargs)


def densenet169(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 32, 32), 64, weights, progress, **kwargs)


def densenet201(*, weights=None, progress: bool = True, **kwargs) -> DenseNet:
    return _densenet(32, (6, 12, 48, 32), 64, weights, progress, **kwargs)


def densenet_bc_100(*, num_classes: int = 10, growth_rate: int = 12, **kwargs) -> DenseNet:
    """DenseNet-BC, depth 100, k=12, for 32x32 inputs (Huang et al. 2017): three blocks
    of 16 BC layers, compression 0.5, a 3x3 stem of 2k channels."""
    return DenseNet(growth_rate, (16, 16, 16), 2 * growth_rate, num_classes=num_classes,
                    imagenet_stem=False, **kwargs)
