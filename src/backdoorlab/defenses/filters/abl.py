"""ABL's backdoor isolation as a training-data filter (Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor
Learning: Training Clean Models on Poisoned Data", NeurIPS 2021, arXiv:2110.11571; reference code
github.com/bboylyg/ABL, ``backdoor_isolation.py``; BackdoorBench's ``defense/abl.py``).

ABL's observation: backdoor samples are learned much faster than clean ones (the trigger is an
easy, strong feature), so early in training their loss falls far below the clean samples'. The
isolation stage sharpens that gap with **local gradient ascent** (LGA): a fresh model is trained
on the received training set with the loss ``sign(L - gamma) * L``, ``L`` the batch's mean
cross-entropy: below ``gamma`` the step *raises* the loss again, so clean samples hover around
``gamma`` while the backdoor samples, whose loss drops far below it, stay low. After ``T_te``
epochs every training sample's loss is computed once (eval mode, no augmentation) and the lowest
``isolation_ratio`` of them are isolated as the likely poison.

Here:

* The model is a **re-initialised copy of ``ctx.model``** (its architecture only; the weights are
  drawn afresh from ``ctx.generator`` through each layer's own ``reset_parameters``, BatchNorm
  statistics reset): ABL trains from scratch, and the deployed artifact ``ctx.clf`` is never read.
  The filter's scores therefore do not depend on the precision a cell deploys at.
* Training is the project's one :func:`~backdoorlab.train.fit.fit`; LGA is its ``loss`` hook
  (:class:`LocalGradientAscent`), and a second hook (:class:`ConstantLR`) holds the learning rate
  constant, as the reference's isolation does (``fit`` has only one-cycle and cosine schedules;
  the hook re-sets the rate the schedule wrote, before each step). No augmentation (the reference
  and BackdoorBench isolate on plain ``ToTensor`` images).
* ``scores`` = minus each sample's cross-entropy loss under the isolation model (higher = lower
  loss = more suspicious); ``removed`` = the ``int(N * isolation_ratio)`` lowest-loss samples
  (the reference's ``losses_idx[:int(len * ratio)]``).
* Class verdict (**backdoorlab's rule; the paper makes none**): the class holding most of the
  isolated samples is flagged if its share of them exceeds its share of the training set;
  ``detected`` is whether a class is flagged. The isolated set is always the lowest-loss 1%, so
  on clean data its largest class, the easiest one, usually holds more than its share too: the
  verdict is weak evidence, the scores and the isolated set are the method's output.

Defaults are the paper's and the reference's: ``epochs=20`` (the paper's turning epoch
``T_te = 20``; BackdoorBench's ``tuning_epochs: 20``, the reference's ``config.py`` 10),
``gamma=0.5`` (CIFAR-10 / GTSRB), ``isolation_ratio=0.01``, SGD with Nesterov momentum 0.9 at a
constant ``lr=0.1``, ``weight_decay=1e-4``, ``batch_size=64``. ``fit`` leaves BatchNorm weights
and biases out of the weight decay (the reference decays them too).

Shapes: ``ctx.train`` images ``(N, C, H, W)`` float in [0, 1] (or uint8 NHWC), labels ``(N,)``;
``scores`` ``(N,)`` float (minus a cross-entropy: ``<= 0``), ``removed`` ``(N,)`` bool.

Measured on the tests' GTSRB BadNets training set (small-cnn, 5,700 images of which 570 poisoned,
all labelled 0; ``tests/defenses/test_abl.py``): see the numbers there and in :mod:`..removers.abl`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data.tensordata import TensorData
from ...errors import check
from ...train.fit import FitState, Hook, TrainConfig, fit
from ..base import DEFENSES, DefenseContext, Filter, FilterResult
from .common import seed_from, training_set


class LocalGradientAscent(Hook):
    """ABL's LGA loss: ``sign(L - gamma) * L`` for fit's batch loss ``L`` (mean cross-entropy):
    descent while the loss is above ``gamma``, ascent once it falls below."""

    def __init__(self, gamma: float):
        self.gamma = float(gamma)

    def loss(self, state: FitState, x, y, logits, loss):
        return torch.sign(loss - self.gamma) * loss


class ConstantLR(Hook):
    """Holds the learning rate at ``lr`` for every step (fit's schedule writes its own rate before
    the forward pass; this re-sets it before the optimiser steps)."""

    def __init__(self, lr: float):
        self.lr = float(lr)

    def loss(self, state: FitState, x, y, logits, loss):
        for group in state.optimizer.param_groups:
            group["lr"] = self.lr
        return loss


def fresh_copy(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """A float32 copy of ``model``'s architecture with every parameter drawn afresh (each layer's
    own ``reset_parameters``, BatchNorm statistics reset), seeded from ``generator``; ``model`` is
    not changed. Initialisation runs on the CPU inside a forked RNG, so the global RNG is untouched."""
    out = copy.deepcopy(model).float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_from(generator))
        for m in out.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return out


@torch.no_grad()
def sample_losses(model: nn.Module, data: TensorData, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """``(N,)`` float32 CPU cross-entropy of every sample of ``data`` under ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(data), batch_size):
        part = data.subset(torch.arange(s, min(s + batch_size, len(data))))
        logits = model(part.float().to(device))
        out.append(F.cross_entropy(logits.float(), part.y.to(device), reduction="none").cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class Isolation:
    """The outcome of ABL's isolation stage over ``N`` training samples.

    ``model``: the LGA-trained model (eval mode), where ABL's later stages start; ``losses``:
    ``(N,)`` per-sample cross-entropy under it; ``isolated``: ``(N,)`` bool, the lowest-loss
    ``isolation_ratio`` share; ``epochs``, ``seconds``: the stage's budget and wall time;
    ``history``: fit's per-epoch metrics (``train_loss`` is the LGA loss)."""

    model: nn.Module
    losses: torch.Tensor
    isolated: torch.Tensor
    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _check_params(who: str, epochs: Any, lr: Any, gamma: Any, isolation_ratio: Any, batch_size: Any,
                  weight_decay: Any, momentum: Any) -> None:
    """One-line errors for the isolation stage's settings (shared with the ``abl`` remover)."""
    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    check(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
          f"{who}: isolation epochs must be an integer >= 1, got {epochs!r}")
    check(real(lr) and lr > 0, f"{who}: lr must be a number > 0, got {lr!r}")
    check(real(gamma) and gamma > 0, f"{who}: gamma must be a number > 0, got {gamma!r}")
    check(real(isolation_ratio) and 0 < isolation_ratio < 1,
          f"{who}: isolation_ratio must be in (0, 1), got {isolation_ratio!r}")
    check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
          f"{who}: batch_size must be an integer >= 1, got {batch_size!r}")
    check(real(weight_decay) and weight_decay >= 0, f"{who}: weight_decay must be a number >= 0, got {weight_decay!r}")
    check(real(momentum) and 0 < momentum < 1, f"{who}: momentum must be in (0, 1) (Nesterov SGD), got {momentum!r}")


def isolate(ctx: DefenseContext, *, epochs: int, lr: float, gamma: float, isolation_ratio: float, batch_size: int,
            weight_decay: float, momentum: float, who: str) -> Isolation:
    """ABL's isolation stage on ``ctx.train`` (module docstring): a fresh copy of ``ctx.model``'s
    architecture trained ``epochs`` with LGA at a constant ``lr``, then every sample's loss."""
    train = training_set(ctx, who)
    check(ctx.model is not None, f"{who} needs the model's architecture (ctx.model) to train a fresh copy of it")
    assert ctx.model is not None
    k = int(len(train) * isolation_ratio)
    check(k >= 1, f"{who}: isolation_ratio {isolation_ratio:g} of {len(train)} training samples isolates none")
    start = time.perf_counter()
    model = fresh_copy(ctx.model, ctx.generator)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, nesterov=True,
                      weight_decay=weight_decay, schedule="cosine", augment=False)
    res = fit(model, train, cfg, generator=ctx.generator, hooks=[LocalGradientAscent(gamma), ConstantLR(lr)],
              device=ctx.device, progress=ctx.progress)
    losses = sample_losses(res.model, train, next(res.model.parameters()).device)
    order = torch.argsort(losses, stable=True)
    isolated = torch.zeros(len(train), dtype=torch.bool)
    isolated[order[:k]] = True
    return Isolation(res.model.eval(), losses, isolated, epochs, time.perf_counter() - start, res.history)


def class_verdict(y: torch.Tensor, isolated: torch.Tensor, num_classes: int) -> tuple[list[int], dict[str, Any]]:
    """backdoorlab's class rule: the class holding most isolated samples, flagged if its share of
    them exceeds its share of the training set (``y``: ``(N,)`` labels, ``isolated``: ``(N,)`` bool)."""
    y = y.cpu().long()
    counts = torch.bincount(y[isolated.cpu()], minlength=num_classes)
    top = int(counts.argmax())
    share = float(counts[top]) / max(1, int(counts.sum()))
    base = float((y == top).float().mean())
    flagged = [top] if share > base else []
    return flagged, {"abl_top_class": top, "abl_top_class_isolated_share": round(share, 4),
                     "abl_top_class_train_share": round(base, 4)}


@DEFENSES.register("abl-isolation")
class ABLIsolation(Filter):
    """ABL's backdoor isolation (Li et al., NeurIPS 2021) as a training-data filter.

    ``epochs``: LGA epochs (the paper's ``T_te``, 20); ``gamma``: LGA's loss floor (0.5);
    ``isolation_ratio``: share of the training set isolated (0.01); ``lr``, ``batch_size``,
    ``weight_decay``, ``momentum``: Nesterov SGD at a constant rate (0.1, 64, 1e-4, 0.9). Trains a
    fresh model of ``ctx.model``'s architecture on ``ctx.train``; reads nothing from the artifact.
    """

    name = "abl-isolation"

    def __init__(self, epochs: int = 20, gamma: float = 0.5, isolation_ratio: float = 0.01, lr: float = 0.1,
                 batch_size: int = 64, weight_decay: float = 1e-4, momentum: float = 0.9):
        _check_params("abl-isolation", epochs, lr, gamma, isolation_ratio, batch_size, weight_decay, momentum)
        self.epochs, self.gamma, self.isolation_ratio = epochs, float(gamma), float(isolation_ratio)
        self.lr, self.batch_size = float(lr), batch_size
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)

    def isolate(self, ctx: DefenseContext) -> Isolation:
        """The isolation stage with this filter's settings."""
        return isolate(ctx, epochs=self.epochs, lr=self.lr, gamma=self.gamma, isolation_ratio=self.isolation_ratio,
                       batch_size=self.batch_size, weight_decay=self.weight_decay, momentum=self.momentum,
                       who=self.name)

    def filter(self, ctx: DefenseContext) -> FilterResult:
        iso = self.isolate(ctx)
        train = training_set(ctx, self.name)
        flagged, verdict = class_verdict(train.y, iso.isolated, ctx.num_classes)
        isolated_losses = iso.losses[iso.isolated]
        return FilterResult(
            scores=-iso.losses.float(), removed=iso.isolated.clone(), flagged=flagged, detected=bool(flagged),
            metrics={"abl_isolation_epochs": iso.epochs, "abl_isolated": int(iso.isolated.sum()),
                     "abl_isolated_max_loss": float(isolated_losses.max()),
                     "abl_median_loss": float(iso.losses.median()),
                     "abl_final_lga_loss": iso.history[-1]["train_loss"] if iso.history else None,
                     "abl_isolation_seconds": round(iso.seconds, 2), **verdict})


__all__ = ["ABLIsolation", "ConstantLR", "Isolation", "LocalGradientAscent", "class_verdict", "fresh_copy",
           "isolate", "sample_losses"]
