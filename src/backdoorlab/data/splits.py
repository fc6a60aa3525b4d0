"""The defender's clean holdout: a share of the training set that no attack may touch."""

from __future__ import annotations

import torch

from ..errors import check


def defender_split(n: int, frac: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into ``(train_idx, holdout_idx)``; ``holdout`` has ``round(frac*n)``.

    The holdout is drawn first, so the attack later poisons only ``train_idx``: the two are
    disjoint by construction. Both index tensors are sorted.
    """
    check(0.0 <= frac < 1.0, f"holdout fraction must be in [0, 1), got {frac}")
    k = int(round(frac * n))
    perm = torch.randperm(n, generator=g)
    return torch.sort(perm[k:]).values, torch.sort(perm[:k]).values
