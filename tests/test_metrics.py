"""The ranking metrics every detector and filter row carries (issue 27 §3)."""

from __future__ import annotations

import math

import torch

from backdoorlab.metrics import auroc, tpr_at_fpr


def test_tpr_at_fpr_lets_through_at_most_that_share_of_the_negatives():
    neg = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
    pos = torch.tensor([0.985, 0.995, 0.975, 0.5, 2.0])
    s, y = torch.cat([neg, pos]), torch.cat([torch.zeros(100), torch.ones(5)])
    # 1% of 100 negatives: one may score above the threshold (0.98), so 0.985, 0.995 and 2.0 count
    assert tpr_at_fpr(s, y, 0.01) == 3 / 5
    # 5%: five negatives above 0.94; 0.975 counts too, 0.5 never
    assert tpr_at_fpr(s, y, 0.05) == 4 / 5
    assert tpr_at_fpr(s, y, 0.6) == 5 / 5
    assert auroc(s, y) > 0.85  # 0.895: a high AUROC beside 40% missed at 1% FPR


def test_with_few_negatives_the_threshold_is_the_highest_negative():
    s, y = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.5, 0.95, 1.0]), torch.tensor([0, 0, 0, 0, 1, 1, 1])
    assert tpr_at_fpr(s, y, 0.01) == 2 / 3  # no negative may pass: only scores above 0.9
    assert tpr_at_fpr(s, y, 0.25) == 1.0  # one of four may: the threshold drops to 0.3
    assert math.isnan(tpr_at_fpr(s[:4], y[:4], 0.01)) and math.isnan(tpr_at_fpr(s[4:], y[4:], 0.01))
