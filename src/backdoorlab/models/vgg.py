"""VGG-16 with BatchNorm (Simonyan & Zisserman, ICLR 2015; BN after Ioffe & Szegedy 2015).

CIFAR variant: the 13 conv layers of configuration "D" (64,64,M,128,128,M,256x3,M,512x3,M,
512x3,M) with BN-ReLU, then a single linear classifier on the 512-d pooled feature, as in
BackdoorBench. ~14.7M parameters. Input ``(N, C, H, W)`` float in [0, 1], ``H, W >= 32``
recommended (five 2x poolings; an adaptive pool makes smaller inputs work).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .common import ImageClassifier, Normalize
from .small import _fit

CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(
    num_classes: int, in_channels: int = 3, mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,),
) -> ImageClassifier:
    layers: list[nn.Module] = []
    cin = in_channels
    for v in CFG_D:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            cin = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return ImageClassifier(Normalize(_fit(mean, in_channels), _fit(std, in_channels)),
                           nn.Sequential(*layers), nn.Linear(512, num_classes))
