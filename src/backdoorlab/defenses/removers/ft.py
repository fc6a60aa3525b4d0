"""Plain fine-tuning (FT) on the defender's clean data: the baseline every removal paper compares
with (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018, its fine-tuning baseline; Wu et al., "BackdoorBench: A Comprehensive Benchmark of
Backdoor Learning", NeurIPS 2022 Datasets and Benchmarks, ``defense/ft.py``).

The backdoored FP32 model is trained further on the clean holdout ``ctx.clean`` with the task's
cross-entropy only; the hope is that the weights that carry the trigger drift away while the
clean task is kept. Liu et al. found that it often does not: the trigger's neurons are dormant on
clean data, so clean gradients hardly touch them.

Defaults follow BackdoorBench's ``config/defense/ft/config.yaml``: ``epochs=100``, ``batch_size=256``,
SGD (momentum 0.9, no Nesterov) at ``lr=0.01`` under a cosine schedule, ``weight_decay=5e-4``.
Training is the project's one :func:`~backdoorlab.train.fit.fit` (random-crop augmentation with
4-pixel padding, no flips; weight decay on conv / linear weights only,
not on BatchNorm and biases, as ``fit`` does everywhere). On the 300-image GTSRB holdout of the
tests that is 200 optimiser steps (about 45 s on 2 CPU cores). The repaired FP32 model is
deployed as the cell deploys (``ctx.redeploy``).

Measured there (small-cnn BadNets): clean accuracy 0.961 -> 0.946, ASR 0.936 -> 0.855 at FP32 and
the same at int8: fine-tuning alone keeps the backdoor, as Liu et al. found (50 epochs: ASR 0.858;
10 epochs: 0.795).

Images: ``(N, C, H, W)`` float in [0, 1] (uint8 NHWC holdouts are converted per batch by ``fit``).

This module also holds the small pieces the fine-tuning family (``ft-sam``, ``nad``) shares:
hyperparameter checks, the starting copy of the model and the deployment of the result.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from ...classifier import Classifier
from ...errors import check
from ...train.fit import TrainConfig, fit
from ..base import DEFENSES, DefenseContext, Remover


def check_int(who: str, name: str, v: Any, lo: int) -> None:
    """``v`` is an integer (not a bool) ``>= lo``, else a one-line error."""
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"{who}: {name} must be an integer >= {lo}, got {v!r}")


def check_number(who: str, name: str, v: Any, lo: float, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = True) -> None:
    """``v`` is a finite real number (not a bool) in the interval, else a one-line error."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    where = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi is None else \
        f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    check(ok, f"{who}: {name} must be a number {where}, got {v!r}")


def check_sgd(who: str, epochs: Any, lr: Any, batch_size: Any, weight_decay: Any, momentum: Any) -> None:
    """The SGD settings every member of the family takes."""
    check_int(who, "epochs", epochs, 1)
    check_number(who, "lr", lr, 0, lo_open=True)
    check_int(who, "batch_size", batch_size, 1)
    check_number(who, "weight_decay", weight_decay, 0)
    check_number(who, "momentum", momentum, 0, 1)


def start_model(ctx: DefenseContext, who: str) -> nn.Module:
    """A float32 copy of the FP32 model the artifact was deployed from, on ``ctx.device`` (the
    caller's model is never changed)."""
    check(ctx.model is not None, f"{who} needs the FP32 model the artifact was deployed from")
    check(len(ctx.clean) > 0, f"{who} needs clean holdout data")
    return copy.deepcopy(ctx.model).float().to(ctx.device)


@DEFENSES.register("ft")
class FineTuning(Remover):
    """Plain fine-tuning on the clean holdout (Liu et al., RAID 2018; BackdoorBench's ``ft``).

    ``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``momentum``: SGD on ``ctx.clean`` under
    a cosine schedule from ``lr`` to 0 (BackdoorBench: 100, 0.01, 256, 5e-4, 0.9).
    """

    name = "ft"

    def __init__(self, epochs: int = 100, lr: float = 0.01, batch_size: int = 256, weight_decay: float = 5e-4,
                 momentum: float = 0.9):
        check_sgd("ft", epochs, lr, batch_size, weight_decay, momentum)
        self.epochs, self.lr, self.batch_size = epochs, float(lr), batch_size
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           nesterov=False, weight_decay=self.weight_decay, schedule="cosine")

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        model = start_model(ctx, "ft")
        res = fit(model, ctx.clean, self.config(), generator=ctx.generator, device=ctx.device,
                  progress=ctx.progress)
        facts = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                 "holdout_size": len(ctx.clean), "steps": self.epochs * math.ceil(len(ctx.clean) / self.batch_size),
                 "final_train_acc": res.history[-1]["train_acc"]}
        return ctx.deploy(res.model), facts


__all__ = ["FineTuning", "check_int", "check_number", "check_sgd", "start_model"]
