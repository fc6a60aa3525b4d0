"""The clean baseline: no poisoning at all.

A clean model's ASR is still measured, with a *probe* trigger (default: BadNets with its
defaults), so a study can show what a trigger does to a model that never saw it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from .base import ATTACKS, Attack, PoisonedSplit


class NoAttack(Attack):
    name = "none"

    def __init__(self, info: DatasetInfo, probe: str | dict[str, Any] = "badnets"):
        self.probe: Attack = ATTACKS.build(probe, info=info)
        super().__init__(info, self.probe.target, self.probe.rate, self.probe.mode, list(self.probe.sources) or None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe.apply(x)

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        return self.probe.target_labels(y)

    def counted(self, y: torch.Tensor) -> torch.Tensor:
        return self.probe.counted(y)

    def assets(self) -> dict[str, Any]:
        return self.probe.assets()

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        self.probe.bind_assets(assets)

    def files(self) -> dict:
        return self.probe.files()

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        data = train.as_uint8()
        return PoisonedSplit(data, torch.empty(0, dtype=torch.long), data.y.clone())
