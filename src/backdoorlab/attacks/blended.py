"""Blended injection (Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", arXiv 1712.05526, 2017).

The trigger is a whole-image pattern mixed into the input: ``x' = (1 - alpha) * x + alpha * p``.
Defaults follow Chen et al. / BackdoorBench: blend ratio ``alpha = 0.2`` at training and test
time, all-to-one with target 0, 10% poisoning. ``pattern``: ``"noise"`` (uniform random
pattern drawn with ``pattern_seed``, Chen et al.'s random-pattern key) or a path to an image
file (Chen et al. used a Hello Kitty picture), resized to the dataset's image size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.datasets import DatasetInfo
from ..errors import BackdoorLabError, check
from .base import Attack


class Blended(Attack):
    name = "blended"

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 alpha: float = 0.2, pattern: str = "noise", pattern_seed: int = 0):
        super().__init__(info, target, rate, mode)
        check(isinstance(alpha, (int, float)) and 0 < alpha <= 1,
              f"blended: alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        c, s = info.channels, info.size
        if pattern == "noise":
            g = torch.Generator().manual_seed(int(pattern_seed))
            self.pattern = torch.rand(c, s, s, generator=g)
        else:
            self.pattern = _load_pattern(Path(pattern), c, s)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x)


def _load_pattern(path: Path, channels: int, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise BackdoorLabError(f"blended: pattern must be 'noise' or an image file; {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise BackdoorLabError(f"blended: cannot read pattern image {path}: {exc}") from None
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t[None]
