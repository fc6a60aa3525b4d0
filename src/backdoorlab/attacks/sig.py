"""SIG (Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019).

A clean-label attack: a horizontal sinusoidal signal is added to images of the target class, whose
labels stay untouched; at test time the same signal on an image of any class should steer the
model to the target. The signal varies along the columns only, equal on every row and channel:

    v(i, j) = delta * sin(2 * pi * j * f / m),   x' = clip(x + v, 0, 1)

with ``j`` the column index and ``m`` the image width. ``delta`` and ``delta_test`` are grey levels
on the 0..255 scale, as the paper and BackdoorBench state them.

Defaults are BackdoorBench's (``config/attack/sig/default.yaml`` and
``utils/bd_img_transform/sig.py``): ``delta = 40``, ``f = 6``, the same signal at training and
test time, target 0, and ``rate = 0.1`` counted over the *whole* training set (BackdoorBench's
convention for clean-label attacks; at 10% on CIFAR-10 every target-class image carries the
signal). Barni et al. train their traffic-sign experiment with a weaker signal (``delta = 20``,
``f = 6``) and raise ``delta`` at test time; set ``delta`` / ``delta_test`` for that setting
(``delta_test: None`` uses ``delta``, BackdoorBench's choice).

A clean-label objective can only poison target-class images, so ``rate`` cannot exceed the target
class's share of the training set (one line naming both otherwise): on the GTSRB subset the largest
class holds 6.6% of the images, so SIG runs there with a smaller rate and a large target class.
Any other objective (``mode``) takes the same signal as its trigger.

Shapes: ``(N, C, H, W)`` float images in [0, 1] in and out.
"""

from __future__ import annotations

import math

import torch

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from ..errors import check
from .base import Attack, PoisonedSplit


def _grey_level(name: str, v: object) -> None:
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 255,
          f"sig: {name} must be a number of grey levels in (0, 255], got {v!r}")


class SIG(Attack):
    name = "sig"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "clean-label",
                 delta: float = 40.0, f: float = 6.0, delta_test: float | None = None,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        _grey_level("delta", delta)
        if delta_test is not None:
            _grey_level("delta_test", delta_test)
        check(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0,
              f"sig: f (the signal's frequency, periods across the image width) must be a positive number, got {f!r}")
        self.delta = float(delta)
        self.delta_test = float(delta if delta_test is None else delta_test)
        self.f = float(f)
        m = info.size
        j = torch.arange(m, dtype=torch.float64)
        # one row of the signal at unit amplitude, (W,); the same on every row and channel
        self.wave = torch.sin(2 * math.pi * j * self.f / m).float()
        self._amplitude = self.delta_test  # what apply() stamps: the test-time signal unless poisoning

    def signal(self, delta: float | None = None) -> torch.Tensor:
        """The additive signal ``(C, H, W)`` in [-delta/255, delta/255] (test-time ``delta`` by default)."""
        d = self.delta_test if delta is None else float(delta)
        c, s = self.info.channels, self.info.size
        return (d / 255.0 * self.wave).view(1, 1, s).expand(c, s, s).contiguous()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + (self._amplitude / 255.0) * self.wave.to(x).view(1, 1, 1, -1)).clamp(0, 1)

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """:meth:`Attack.poison` with the training signal (``delta``)."""
        self._amplitude = self.delta
        try:
            return super().poison(train, g)
        finally:
            self._amplitude = self.delta_test
