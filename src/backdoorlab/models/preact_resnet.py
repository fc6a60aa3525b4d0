"""PreAct-ResNet18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

The CIFAR variant used across the backdoor literature (BackdoorBench's default): a 3x3 stem,
four stages of two pre-activation basic blocks (64, 128, 256, 512 channels, strides 1,2,2,2),
BN-ReLU, global average pooling. ~11.2M parameters. Input ``(N, C, H, W)`` float in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import nn

from .common import ImageClassifier, Normalize
from .small import _fit


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


def preact_resnet18(
    num_classes: int, in_channels: int = 3, mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,),
) -> ImageClassifier:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.BatchNorm2d(512), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return ImageClassifier(Normalize(_fit(mean, in_channels), _fit(std, in_channels)),
                           nn.Sequential(*layers), nn.Linear(512, num_classes))
