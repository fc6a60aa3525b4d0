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
                 alpha: float = 0.2, pattern: str = "noise", pattern_seed: int = 0,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        check(isinstance(alpha, (int, float)) and 0 < alpha <= 1,
              f"blended: alpha must be in (0, 1], got {alpha!r}")
        check(isinstance(pattern, str) and pattern != "",
              f"blended: pattern must be 'noise' or the path of an image file, got {pattern!r}")
        check(isinstance(pattern_seed, int) and not isinstance(pattern_seed, bool) and 0 <= pattern_seed < 2**63,
              f"blended: pattern_seed must be an integer in [0, 2**63), got {pattern_seed!r}")
        self.alpha = float(alpha)
        self.pattern_path = None if pattern == "noise" else Path(pattern).expanduser()
        c, s = info.channels, info.size
        if self.pattern_path is None:
            g = torch.Generator().manual_seed(int(pattern_seed))
            self.pattern = torch.rand(c, s, s, generator=g)
        else:
            self.pattern = _load_pattern(self.pattern_path, c, s)

    def files(self) -> dict[str, Path]:
        return {} if self.pattern_path is None else {"pattern": self.pattern_path}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x)


def _load_pattern(path: Path, channels: int, size: int) -> torch.Tensor:
    """The pattern image at ``path`` as ``(C, size, size)`` float in [0, 1]; read within the file
    and pixel caps of :mod:`backdoorlab.data.limits`, one line naming the file on any failure."""
    from ..data.readers import decode_image, read_file_capped

    if not path.is_file():
        raise BackdoorLabError(f"blended: pattern must be 'noise' or an image file; {path} does not exist")
    arr = decode_image(read_file_capped(path, "blended pattern image"), f"blended pattern {path}", size,
                       mode="RGB" if channels == 3 else "L")
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
