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


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) for binary ``labels`` (1 =
    positive), by the Mann-Whitney U statistic with ties counted as one half. NaN if a class is
    empty."""
    s = scores.detach().double().flatten().cpu()
    y = labels.detach().flatten().cpu().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    if len(uniq) < len(s):  # average ranks over ties
        ends = torch.cumsum(counts, 0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[order] = avg[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float = 0.01) -> float:
    """True-positive rate of ``scores`` (higher = positive) for binary ``labels`` at the lowest
    threshold that puts at most ``fpr`` of the negatives above it: with ``n`` negatives, at most
    ``floor(fpr * n)`` of them score above the threshold (so with fewer than ``1 / fpr`` negatives,
    none: the threshold is the highest negative score), and a positive counts if it scores strictly
    above. NaN if a class is empty."""
    s = scores.detach().double().flatten().cpu()
    y = labels.detach().flatten().cpu().bool()
    if not y.any() or y.all():
        return float("nan")
    neg = torch.sort(s[~y], descending=True).values
    k = int(fpr * len(neg) + 1e-9)  # negatives allowed above the threshold
    if k >= len(neg):
        return 1.0
    return float((s[y] > neg[k]).double().mean())


__all__ = ["asr", "auroc", "clean_acc", "der", "ra", "tpr_at_fpr"]
