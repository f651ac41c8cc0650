"""ResNet-18..152 built from skipfast blocks, with torchvision's state_dict layout:
a torchvision ResNet's ``state_dict()`` loads with ``strict=True``."""
from __future__ import annotations

import torch
from torch import nn

from ..fold import FoldSet, can_fold
from ..nn.batchnorm import BatchNormAct2d
from ..nn.blocks import BottleneckBlock, ResidualBlock


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, zero_init_residual: bool = False,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNormAct2d(64)  # bn + relu, fused (torchvision: bn1, then relu)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._folds = FoldSet()
        channels = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blk = block(channels, width, stride)
                blocks.append(blk)
                channels = blk.out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BottleneckBlock):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, ResidualBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_fold(self.conv1, self.bn1, x):
            x = self._folds("stem", self.conv1, self.bn1, x, None, "relu")
        else:
            x = self.bn1(self.conv1(x))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, weights=None, progress=True, **kwargs) -> ResNet:
    if weights is not None:
        # A torchvision weights enum (e.g. ResNet50_Weights.DEFAULT): same keys, same layout.
        kwargs.setdefault("num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress), strict=True)
    return model


def resnet18(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(ResidualBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(ResidualBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(BottleneckBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(BottleneckBlock, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(BottleneckBlock, [3, 8, 36, 3], weights, progress, **kwargs)
