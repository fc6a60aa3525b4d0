"""MobileNetV2, CIFAR variant (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018).

The ImageNet architecture (t, c, n, s) = (1,16,1,1), (6,24,2,1*), (6,32,3,2), (6,64,4,2),
(6,96,3,1), (6,160,3,2), (6,320,1,1) with the stem stride and the second stage's stride set to
1 for 32x32 inputs (*), as in the common CIFAR ports used by BackdoorBench. ~2.2M parameters.
Input ``(N, C, H, W)`` float in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import check
from .common import ImageClassifier, Normalize
from .small import _fit

CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
       (6, 160, 3, 2), (6, 320, 1, 1))


def _cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = _cbr(cin, hidden, 1) if expand != 1 else []
        layers += _cbr(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res else out


def check_params(width_mult: float = 1.0) -> None:
    """Values of the user settings (their types are checked from the signature by the registry)."""
    check(isinstance(width_mult, (int, float)) and not isinstance(width_mult, bool) and 0 < width_mult <= 4,
          f"model 'mobilenetv2' width_mult must be a number in (0, 4], got {width_mult!r}")


def mobilenetv2(
    num_classes: int, in_channels: int = 3, mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,), width_mult: float = 1.0,
) -> ImageClassifier:
    """``width_mult``: channel multiplier of every layer (a user setting; 1.0 is the paper's)."""
    check_params(width_mult=width_mult)

    def ch(c: int) -> int:
        return max(8, int(c * width_mult + 4) // 8 * 8)

    cin = ch(32)
    layers: list[nn.Module] = _cbr(in_channels, cin, 3, 1)
    for t, c, n, s in CFG:
        cout = ch(c)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = ch(1280) if width_mult > 1.0 else 1280
    layers += _cbr(cin, last, 1) + [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return ImageClassifier(Normalize(_fit(mean, in_channels), _fit(std, in_channels)),
                           nn.Sequential(*layers), nn.Linear(last, num_classes))
