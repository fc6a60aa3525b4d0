"""BadNets (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", arXiv 1708.06733, 2017).

A fixed patch is stamped on a share of the training images, which are relabelled to the
target. Defaults follow BackdoorBench's CIFAR/GTSRB setting: a 3x3 white square at the
bottom-right corner, all-to-one with target 0, 10% of the training set poisoned. The all-to-all
variant (Gu et al. Sec. 4) relabels ``y -> (y + 1) mod K``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.datasets import DatasetInfo
from ..errors import check
from .base import Attack

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
PATTERNS = ("solid", "checkerboard", "random")


class BadNets(Attack):
    name = "badnets"

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 patch_size: int = 3, position: str | Sequence[int] = "bottom-right", margin: int = 0,
                 color: float | Sequence[float] = 1.0, pattern: str = "solid", pattern_seed: int = 0,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        h = w = info.size
        check(isinstance(patch_size, int) and 1 <= patch_size <= min(h, w),
              f"badnets: patch_size must be an integer in [1, {min(h, w)}], got {patch_size!r}")
        check(pattern in PATTERNS, f"badnets: pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
        check(isinstance(margin, int) and not isinstance(margin, bool) and margin >= 0,
              f"badnets: margin must be an integer >= 0, got {margin!r}")
        check(_is_int(pattern_seed) and 0 <= pattern_seed < 2**63,
              f"badnets: pattern_seed must be an integer in [0, 2**63), got {pattern_seed!r}")
        s = patch_size
        if isinstance(position, str):
            check(position in POSITIONS,
                  f"badnets: position must be one of {', '.join(POSITIONS)} or [row, col], got {position!r}")
            top = {"t": margin, "b": h - s - margin, "c": (h - s) // 2}[position[0]]
            left = (w - s) // 2 if position == "center" else (margin if position.endswith("left") else w - s - margin)
        else:
            check(isinstance(position, (list, tuple)) and len(position) == 2 and all(map(_is_int, position)),
                  f"badnets: position must be one of {', '.join(POSITIONS)} or [row, col] integers, got {position!r}")
            top, left = int(position[0]), int(position[1])
        check(0 <= top <= h - s and 0 <= left <= w - s,
              f"badnets: a {s}x{s} patch at ({top}, {left}) does not fit a {h}x{w} image")
        c = info.channels
        check(_is_num(color) or (isinstance(color, (list, tuple)) and all(map(_is_num, color))),
              f"badnets: color must be one value or {c} values in [0, 1], got {color!r}")
        col = torch.tensor([float(color)] * c if isinstance(color, (int, float)) else [float(v) for v in color])
        check(col.numel() == c and bool(((col >= 0) & (col <= 1)).all()),
              f"badnets: color must be one value or {c} values in [0, 1], got {color!r}")
        if pattern == "solid":
            shape = torch.ones(s, s)
        elif pattern == "checkerboard":
            shape = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0).float()
        else:
            g = torch.Generator().manual_seed(int(pattern_seed))
            shape = (torch.rand(s, s, generator=g) < 0.5).float()
        # patch pixels: colour where the pattern is on, black where it is off
        self.patch = col.view(c, 1, 1) * shape.view(1, s, s)
        self.top, self.left, self.size = top, left, s

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        s = self.size
        out[:, :, self.top:self.top + s, self.left:self.left + s] = self.patch.to(x)
        return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
