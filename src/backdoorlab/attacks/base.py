"""The attack interface: ``poison(train, g) -> PoisonedSplit``, ``apply(x)``, ``train_hook()``.

Every attack is built for a dataset (``info``: image size, channels, classes), so it can check
its settings (target label in range, rate in (0, 1]) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData, from_uint8_nhwc, to_uint8_nhwc
from ..errors import check
from ..registry import Registry
from ..train.fit import Hook, TrainConfig

MODES = ("all-to-one", "all-to-all")


@dataclass
class PoisonedSplit:
    """A training set after poisoning, with the record of what was changed.

    ``data``: the poisoned training set (uint8 NHWC); ``poison_idx``: sorted indices into it
    of the poisoned samples; ``original_labels``: the labels before poisoning.
    """

    data: TensorData
    poison_idx: torch.Tensor
    original_labels: torch.Tensor

    @property
    def is_poisoned(self) -> torch.Tensor:
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_idx] = True
        return mask


class Attack:
    """Base class of data-poisoning attacks.

    Subclasses implement :meth:`apply` (the trigger, on ``(N, C, H, W)`` float in [0, 1]) and
    may override :meth:`poison` and :meth:`train_hook`.
    """

    name = "attack"
    # bumped when a model-level attack's training algorithm changes, so that models it trained
    # before are not reused from the artifact cache (None: the key is the config alone)
    algo_version: int | None = None

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1,
                 mode: str = "all-to-one"):
        check(mode in MODES, f"{self.name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        check(isinstance(target, int) and 0 <= target < info.num_classes,
              f"{self.name}: target label must be an integer in [0, {info.num_classes - 1}] for "
              f"{info.name}, got {target!r}")
        check(isinstance(rate, (int, float)) and 0 < rate <= 1,
              f"{self.name}: poisoning rate must be in (0, 1], got {rate!r}")
        self.info = info
        self.target = int(target)
        self.rate = float(rate)
        self.mode = mode

    # --- labels -------------------------------------------------------------------------
    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for each triggered image."""
        if self.mode == "all-to-all":
            return (y + 1) % self.info.num_classes
        return torch.full_like(y, self.target)

    def counted(self, y: torch.Tensor) -> torch.Tensor:
        """Which test images count for ASR/RA: those whose label the trigger must change."""
        return self.target_labels(y) != y

    # --- trigger ------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the test-time trigger on ``(N, C, H, W)`` float images in [0, 1]."""
        raise NotImplementedError

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Indices that may be poisoned (for all-to-one: not already of the target class)."""
        return torch.nonzero(self.counted(y)).flatten()

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Poison ``round(rate * N)`` random training samples: trigger + target label."""
        data = train.as_uint8()
        cand = self.candidates(data.y)
        k = int(round(self.rate * len(data)))
        check(k <= len(cand), f"{self.name}: rate {self.rate} asks for {k} poisoned images but only "
                              f"{len(cand)} training images can be poisoned")
        idx = torch.sort(cand[torch.randperm(len(cand), generator=g)[:k]]).values
        x = data.x.clone()
        y = data.y.clone()
        if k:
            x[idx] = to_uint8_nhwc(self.apply(from_uint8_nhwc(x[idx])))
            y[idx] = self.target_labels(data.y[idx])
        return PoisonedSplit(TensorData(x, y), idx, data.y.clone())

    def files(self) -> dict[str, Path]:
        """Files this attack reads, by parameter name (e.g. Blended's ``pattern`` image). Their
        content fingerprints enter the cell's run id and cache keys, so a changed file is new work."""
        return {}

    def train_hook(self) -> Hook | None:
        """A :class:`~backdoorlab.train.fit.Hook` for attacks that change training; ``None`` here."""
        return None

    def init_from(self) -> str | dict | None:
        """Two-phase attacks: the attack spec whose model (trained with the same cell settings)
        this attack's training starts from, or ``None`` (train from scratch, the default)."""
        return None

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The training config of this attack's own phase, given the cell's (unchanged here)."""
        return base


ATTACKS: Registry[Attack] = Registry("attack")
