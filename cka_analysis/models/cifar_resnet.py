"""CIFAR ResNets (He et al. 2016, section 4.2) with the parameter-free option-A shortcut.

The layout and module names (``conv1, bn1, layer1..3, linear``) match the widely used public CIFAR-10 checkpoints
(akamaster/pytorch_resnet_cifar10), so their state dicts load with strict key matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OptionAShortcut(nn.Module):
    """Stride-2 spatial subsampling plus zero channel padding: the parameter-free downsampling shortcut."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class CifarBasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut((planes - in_planes) // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv → three stages of ``blocks_per_stage`` basic blocks (widths w, 2w, 4w) → global pool → linear."""

    def __init__(
        self, blocks_per_stage: int, num_classes: int = 10, *, in_channels: int = 3, width: int = 16
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = width
        self.layer1 = self._stage(planes, width, blocks_per_stage, 1)
        self.layer2 = self._stage(width, 2 * width, blocks_per_stage, 2)
        self.layer3 = self._stage(2 * width, 4 * width, blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [CifarBasicBlock(in_planes, planes, stride)]
        blocks += [CifarBasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))
