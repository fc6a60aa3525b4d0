"""The default model: a small, fast CNN sized for CPU training.

A VGG-style stack in the spirit of airbench (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds",
2024): a stem conv, then blocks of two 3x3 conv-BN-ReLU layers of widening channels with
max-pooling between blocks, and a global max-pool. It pools right after the stem so that every
later conv is a wide matmul (what CPUs run near peak): ~0.58M parameters, ~40 MFLOPs per 32x32
image. Input ``(N, C, H, W)`` float in [0, 1], any ``H, W >= 8``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import check
from .common import ImageClassifier, Normalize


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.25,),
    widths: tuple[int, int, int, int] = (32, 64, 128, 256),
) -> ImageClassifier:
    """``widths``: output channels of the stem and of the three blocks (a user setting)."""
    check_params(widths=widths)
    w0, w1, w2, w3 = widths
    body = nn.Sequential(
        *_conv_bn(in_channels, w0), nn.MaxPool2d(2),
        *_conv_bn(w0, w1), *_conv_bn(w1, w1), nn.MaxPool2d(2),
        *_conv_bn(w1, w2), *_conv_bn(w2, w2), nn.MaxPool2d(2),
        *_conv_bn(w2, w3), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    return ImageClassifier(Normalize(_fit(mean, in_channels), _fit(std, in_channels)), body,
                           nn.Linear(w3, num_classes))


def check_params(widths: Sequence[int] = (32, 64, 128, 256)) -> None:
    """Values of the user settings (their types are checked from the signature by the registry)."""
    check(len(widths) == 4 and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 4096 for w in widths),
          f"model 'small-cnn' widths must be 4 integers in [1, 4096], got {widths!r}")


def _fit(v: Sequence[float], c: int) -> list[float]:
    v = list(v)
    return v * c if len(v) == 1 else v
