"""Pieces shared by every model: input normalisation lives inside the model (house rule 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``x`` is ``(N, C, H, W)`` float in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """``normalize -> features -> head``. ``features(x)`` gives the last hidden layer ``(N, D)``.

    Every registered model has this shape so that defenses can reach the penultimate
    representation (Activation Clustering, Spectral Signatures) and the last conv block
    (Fine-Pruning: ``last_conv``) by name.
    """

    def __init__(self, normalize: Normalize, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
