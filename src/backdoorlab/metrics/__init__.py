"""Metrics: tensors in, floats out.

* CA: clean test accuracy.
* ASR (attack success rate): among test images the attack may flip (for all-to-one, those
  whose true label is not the target), the share classified as the attack's target once the
  trigger is applied.
* RA (robust accuracy): among the same triggered images, the share still classified as their
  true label.
"""

from __future__ import annotations

import torch


def _mean(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


def clean_acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return _mean(pred == y)


def asr(pred_triggered: torch.Tensor, target: torch.Tensor, counted: torch.Tensor | None = None) -> float:
    """``pred_triggered``: labels on triggered images; ``target``: the attack's target label per
    image; ``counted``: boolean mask of images that count (``None``: all)."""
    hit = pred_triggered == target
    return _mean(hit if counted is None else hit[counted])


def ra(pred_triggered: torch.Tensor, y: torch.Tensor, counted: torch.Tensor | None = None) -> float:
    ok = pred_triggered == y
    return _mean(ok if counted is None else ok[counted])


def der(ca_before: float, ca_after: float, asr_before: float, asr_after: float) -> float:
    """Defense effectiveness rating (Zhu et al., BackdoorBench, NeurIPS 2022 D&B):
    ``(max(0, dASR) - max(0, dCA) + 1) / 2`` with ``dX = before - after`` (in [0, 1])."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1) / 2


__all__ = ["asr", "clean_acc", "der", "ra"]
