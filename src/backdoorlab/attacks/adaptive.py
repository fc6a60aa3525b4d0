"""Adaptive-Blend and Adaptive-Patch (Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of
Latent Separability for Backdoor Defenses", ICLR 2023; code: github.com/Unispac/Circumventing-Backdoor-
Defenses and vtu81/backdoor-toolbox, ``poison_tool_box/adaptive_blend.py`` / ``adaptive_patch.py``).

Two poisoning attacks built to leave no separable cluster of poison samples in the model's latent
space, with two ingredients:

1. **Regularisation ("cover") samples**: besides the ``rate * N`` poison samples (trigger, label
   changed by the objective), ``cover_rate * N`` other training images get a trigger too but keep
   their correct label. This tempers the backdoor (the paper's conservatism) so that poison
   samples are not pulled into a cluster of their own.
2. **Asymmetric triggers**: at poisoning, each image receives a weak or partial trigger; at test
   time the full trigger, at a higher opacity, is applied.

* ``adaptive-blend``: a blend pattern ``p`` split into a ``sqrt(pieces) x sqrt(pieces)`` grid;
  each poison and cover image gets ``x + alpha * m * (p - x)`` with a mask ``m`` that keeps a
  random half of the pieces (``mask_rate`` of them dropped, drawn per image from the poison
  generator); :meth:`AdaptiveBlend.apply` blends the whole pattern at ``test_alpha``.
* ``adaptive-patch``: ``k = 4`` patch triggers, each with its own opacity; each poison or cover image
  gets one of them (an equal share each, at random); :meth:`AdaptivePatch.apply` stamps the
  ``test_triggers`` together at ``test_alpha``, ``x + a * m * (mark - x)`` for each.

Defaults are the authors' CIFAR-10 settings (the paper's main benchmark; config.py and README of
backdoor-toolbox), at 32x32 as published: target 0;

* Adaptive-Blend: ``rate=0.003``, ``cover_rate=0.003``, ``alpha=0.15`` at poisoning and
  ``test_alpha=0.2`` at test, ``pieces=16``, ``mask_rate=0.5`` (GTSRB: the same);
* Adaptive-Patch: ``rate=0.003``, ``cover_rate=0.006`` (GTSRB: 0.005 and 0.01), train opacities
  ``(0.5, 0.2, 0.5, 0.3)``, test triggers 1 and 3 at opacity 1 (the GTSRB set of test triggers;
  CIFAR-10's uses a stretched variant of trigger 0 with trigger 2).

Deviations, all stated:

* Trigger images. The authors blend a Hello Kitty picture (Adaptive-Blend) and stamp four image
  files (Adaptive-Patch). Adaptive-Blend here takes ``pattern="noise"`` (uniform noise from
  ``pattern_seed``, the same default as ``blended``) or the path of any image file. Adaptive-Patch
  draws four procedural triggers with the same places, sizes and opacities as the authors' files,
  at 32x32 (scaled with the image otherwise): 0, a 5x5 bright random-colour mark in the bottom-right
  corner (theirs: a phoenix logo); 1, a 13x13 anti-aliased two-tone disc at rows 1-13, columns
  18-30 (theirs: a Firefox logo); 2, a 3x3 black-and-white checker in each of the four corners
  (theirs: BadNets-style 3x3 corner patterns); 3, an 8x8 random-colour square at rows 21-28,
  columns 21-28 (theirs: the TrojanNN square). Random colours come from ``trigger_seed``.
* Which images are covered. The paper draws cover samples from classes "other than the target
  class"; the code draws them from any image. Here: images not poisoned whose label the objective's
  target differs from (all-to-one, clean-label: any class but the target; all-to-all: any image),
  and for a source-specific objective images outside the source classes (as TaCT's cover images).
  Poison images are drawn from the objective's candidates (the code also poisons target-class
  images, which are relabelled to what they were).
* Counts are ``round(rate * N)`` and ``round(cover_rate * N)`` (the code floors), as every attack here.

Record: :class:`CoveredSplit`. ``poison_idx`` holds the poison samples only (trigger and changed
label, ``round(rate * N)`` of them, as for every attack); ``cover_idx`` the cover samples (trigger,
label kept); ``is_poisoned``, the ground truth a data filter is scored against, marks both, since
every image the attacker changed is recorded as poisoned.

Shapes and ranges: :meth:`apply` takes and returns ``(N, C, H, W)`` float in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData, from_uint8_nhwc, to_uint8_nhwc
from ..errors import check
from .base import Attack, PoisonedSplit
from .blended import _load_pattern
from .shapes import coverage


@dataclass
class CoveredSplit(PoisonedSplit):
    """A :class:`PoisonedSplit` with cover samples: ``cover_idx``, sorted indices of images that
    carry a trigger and keep their label. ``poison_idx`` stays the relabelled images only;
    ``is_poisoned`` marks every changed image, poison and cover."""

    cover_idx: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def is_poisoned(self) -> torch.Tensor:
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_idx] = True
        mask[self.cover_idx] = True
        return mask


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Adaptive(Attack):
    """Poison + cover samples, each with a training-time trigger drawn per image (subclasses:
    :meth:`train_trigger`)."""

    def __init__(self, info: DatasetInfo, target: int, rate: float, mode: str, sources: list[int] | None,
                 cover_rate: float):
        super().__init__(info, target, rate, mode, sources)
        check(_is_num(cover_rate) and 0 <= cover_rate < 1,
              f"{self.name}: cover_rate must be in [0, 1), got {cover_rate!r}")
        self.cover_rate = float(cover_rate)

    def train_trigger(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The weak / partial trigger of poisoning, drawn per image from ``g``."""
        raise NotImplementedError

    def cover_candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Images that may be cover samples (before excluding the poisoned ones): the trigger must
        not move them (label not the objective's target for them; source-specific: outside the
        sources)."""
        ok = self.target_labels(y) != y
        if self.mode == "source-specific":
            ok &= ~self.in_scope(y)
        return ok

    def poison(self, train: TensorData, g: torch.Generator) -> CoveredSplit:
        data = train.as_uint8()
        n = len(data)
        cand = self.candidates(data.y)
        k = int(round(self.rate * n))
        check(k <= len(cand), f"{self.name}: rate {self.rate} asks for {k} poisoned images but only "
                              f"{len(cand)} training images can be poisoned")
        idx = torch.sort(cand[torch.randperm(len(cand), generator=g)[:k]]).values
        free = self.cover_candidates(data.y)
        free[idx] = False
        pool = torch.nonzero(free).flatten()
        kc = int(round(self.cover_rate * n))
        check(kc <= len(pool), f"{self.name}: cover_rate {self.cover_rate} asks for {kc} cover images but only "
                               f"{len(pool)} training images can be covered")
        cidx = torch.sort(pool[torch.randperm(len(pool), generator=g)[:kc]]).values
        x, y = data.x.clone(), data.y.clone()
        if k:
            x[idx] = to_uint8_nhwc(self.train_trigger(from_uint8_nhwc(x[idx]), g))
            y[idx] = self.target_labels(data.y[idx])
        if kc:
            x[cidx] = to_uint8_nhwc(self.train_trigger(from_uint8_nhwc(x[cidx]), g))
        return CoveredSplit(TensorData(x, y), idx, data.y.clone(), cidx)


def piece_masks(size: int, pieces: int, keep: torch.Tensor) -> torch.Tensor:
    """``(N, 1, size, size)`` masks from ``keep`` ``(N, pieces)`` bool: piece ``i`` is the grid cell
    at row ``i // k``, column ``i % k`` of a ``k x k`` grid (``k = sqrt(pieces)``), edges at
    ``round(j * size / k)``."""
    k = math.isqrt(pieces)
    edges = [round(j * size / k) for j in range(k + 1)]
    cell = torch.zeros(size, dtype=torch.long)
    for j in range(k):
        cell[edges[j]:edges[j + 1]] = j
    piece_of = (cell[:, None] * k + cell[None, :]).flatten()  # (size * size,)
    return keep[:, piece_of].view(-1, 1, size, size).float()


class AdaptiveBlend(_Adaptive):
    """Adaptive-Blend (Qi et al., ICLR 2023): a partial blend at poisoning, the full one at test."""

    name = "adaptive-blend"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.003, mode: str = "all-to-one",
                 cover_rate: float = 0.003, alpha: float = 0.15, test_alpha: float = 0.2, pieces: int = 16,
                 mask_rate: float = 0.5, pattern: str = "noise", pattern_seed: int = 0,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources, cover_rate)
        for nm, v in (("alpha", alpha), ("test_alpha", test_alpha)):
            check(_is_num(v) and 0 < v <= 1, f"adaptive-blend: {nm} must be in (0, 1], got {v!r}")
        check(_is_int(pieces) and pieces >= 1 and math.isqrt(pieces) ** 2 == pieces
              and math.isqrt(pieces) <= info.size,
              f"adaptive-blend: pieces must be a square number k*k with k <= {info.size} (the image side), "
              f"got {pieces!r}")
        check(_is_num(mask_rate) and 0 <= mask_rate < 1,
              f"adaptive-blend: mask_rate must be in [0, 1), got {mask_rate!r}")
        check(isinstance(pattern, str) and pattern != "",
              f"adaptive-blend: pattern must be 'noise' or the path of an image file, got {pattern!r}")
        check(_is_int(pattern_seed) and 0 <= pattern_seed < 2**63,
              f"adaptive-blend: pattern_seed must be an integer in [0, 2**63), got {pattern_seed!r}")
        self.alpha, self.test_alpha = float(alpha), float(test_alpha)
        self.pieces = pieces
        self.masked = int(round(mask_rate * pieces))
        self.pattern_path = None if pattern == "noise" else Path(pattern).expanduser()
        c, s = info.channels, info.size
        if self.pattern_path is None:
            self.pattern = torch.rand(c, s, s, generator=torch.Generator().manual_seed(int(pattern_seed)))
        else:
            self.pattern = _load_pattern(self.pattern_path, c, s)

    def files(self) -> dict[str, Path]:
        return {} if self.pattern_path is None else {"pattern": self.pattern_path}

    def train_trigger(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        order = torch.rand(n, self.pieces, generator=g).argsort(1)
        keep = torch.ones(n, self.pieces, dtype=torch.bool)
        keep.scatter_(1, order[:, :self.masked], False)  # drop ``masked`` random pieces per image
        m = piece_masks(x.shape[-1], self.pieces, keep).to(x)
        return x + self.alpha * m * (self.pattern.to(x) - x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.test_alpha * (self.pattern.to(x) - x)


def _grey(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    """``(3, H, W)`` -> ``(channels, H, W)`` (one channel: Rec.601 luma)."""
    if channels == 3:
        return rgb
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).unsqueeze(0)


def patch_triggers(size: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-Patch's four procedural triggers: marks ``(4, C, size, size)`` in [0, 1] and masks
    ``(4, 1, size, size)`` in [0, 1] (see the module docstring; geometry given at 32x32 and scaled)."""
    g = torch.Generator().manual_seed(int(seed))
    f = size / 32

    def box(r0: int, c0: int, side: int) -> tuple[int, int, int]:
        side_s = max(1, round(side * f))
        return min(round(r0 * f), size - side_s), min(round(c0 * f), size - side_s), side_s

    marks = torch.zeros(4, 3, size, size)
    masks = torch.zeros(4, 1, size, size)
    # 0: a bright random-colour 5x5 mark in the bottom-right corner
    r, c, s = box(27, 27, 5)
    marks[0, :, r:r + s, c:c + s] = 0.5 + 0.5 * torch.rand(3, s, s, generator=g)
    masks[0, :, r:r + s, c:c + s] = 1
    # 1: a 13x13 two-tone disc (orange ring, blue centre), anti-aliased, at rows 1-13, cols 18-30
    r, c, s = box(1, 18, 13)
    cy, cx, rad = r + s / 2, c + s / 2, s / 2

    def dist(rr: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((rr - cy) ** 2 + (cc - cx) ** 2)

    disc = coverage(lambda rr, cc: dist(rr, cc) <= rad, size, size).float()
    core = coverage(lambda rr, cc: dist(rr, cc) <= 0.55 * rad, size, size).float()
    orange, blue = torch.tensor([1.0, 0.55, 0.1]), torch.tensor([0.15, 0.3, 0.85])
    share = torch.where(disc > 0, core / disc.clamp_min(1e-12), torch.zeros_like(disc))
    marks[1] = orange.view(3, 1, 1) * (1 - share) + blue.view(3, 1, 1) * share
    masks[1, 0] = disc
    # 2: a 3x3 black-and-white checker in each corner
    s = max(1, round(3 * f))
    checker = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0).float()
    for r in (0, size - s):
        for c in (0, size - s):
            marks[2, :, r:r + s, c:c + s] = checker
            masks[2, :, r:r + s, c:c + s] = 1
    # 3: an 8x8 random-colour square at rows 21-28, cols 21-28
    r, c, s = box(21, 21, 8)
    marks[3, :, r:r + s, c:c + s] = torch.rand(3, s, s, generator=g)
    masks[3, :, r:r + s, c:c + s] = 1
    return torch.stack([_grey(m, channels) for m in marks]), masks


class AdaptivePatch(_Adaptive):
    """Adaptive-Patch (Qi et al., ICLR 2023): one of k faint patches at poisoning, several strong
    ones together at test."""

    name = "adaptive-patch"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.003, mode: str = "all-to-one",
                 cover_rate: float = 0.006, alphas: list[float] = [0.5, 0.2, 0.5, 0.3],  # noqa: B006 - the config copies it
                 test_triggers: list[int] = [1, 3], test_alpha: float = 1.0, trigger_seed: int = 0,  # noqa: B006
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources, cover_rate)
        check(isinstance(alphas, (list, tuple)) and len(alphas) == 4 and all(_is_num(a) and 0 < a <= 1 for a in alphas),
              f"adaptive-patch: alphas must be 4 opacities in (0, 1], one per trigger, got {alphas!r}")
        check(isinstance(test_triggers, (list, tuple)) and len(test_triggers) > 0
              and all(_is_int(t) and 0 <= t < 4 for t in test_triggers)
              and len(set(test_triggers)) == len(test_triggers),
              f"adaptive-patch: test_triggers must be distinct trigger numbers in [0, 3], got {test_triggers!r}")
        check(_is_num(test_alpha) and 0 < test_alpha <= 1,
              f"adaptive-patch: test_alpha must be in (0, 1], got {test_alpha!r}")
        check(_is_int(trigger_seed) and 0 <= trigger_seed < 2**63,
              f"adaptive-patch: trigger_seed must be an integer in [0, 2**63), got {trigger_seed!r}")
        self.alphas = torch.tensor([float(a) for a in alphas])
        self.test_triggers = tuple(int(t) for t in test_triggers)
        self.test_alpha = float(test_alpha)
        self.marks, self.masks = patch_triggers(info.size, info.channels, trigger_seed)

    def train_trigger(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        k = self.marks.shape[0]
        which = torch.randperm(x.shape[0], generator=g) % k  # an equal share of images per trigger
        a = (self.alphas[which].view(-1, 1, 1, 1) * self.masks[which]).to(x)
        return x + a * (self.marks[which].to(x) - x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for t in self.test_triggers:
            a = (self.test_alpha * self.masks[t]).to(x)
            out = out + a * (self.marks[t].to(x) - out)
        return out
