"""ABL, Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean
Models on Poisoned Data", NeurIPS 2021, arXiv:2110.11571; reference code github.com/bboylyg/ABL,
``backdoor_isolation.py`` and ``backdoor_unlearning.py``; BackdoorBench's ``defense/abl.py``).

**A training-time defense, not a post-hoc repair of ``ctx.model``.** ABL trains a new model from
scratch on the received (poisoned) training set ``ctx.train``; of ``ctx.model`` it uses only the
architecture (a re-initialised copy), and it never reads the deployed artifact. The result is
deployed as the cell deploys (``ctx.deploy``), so its row compares a model the defender trained
with ABL against the backdoored model the cell trained without it. (In the ``deploy-first`` order
the architecture is the shipped one, BatchNorm folded where the artifact folded it.)

Three stages, one schedule of ``T`` epochs in the paper (``T = 100``, ``T_te = 20``):

1. **Backdoor isolation** (``isolation_epochs``, the paper's ``T_te = 20``): the fresh model is
   trained on ``ctx.train`` with local gradient ascent (LGA), ``sign(L - gamma) * L``, at a constant
   ``lr=0.1``; the ``isolation_ratio=0.01`` lowest-loss samples are isolated
   (:func:`backdoorlab.defenses.filters.abl.isolate`, the ``abl-isolation`` filter's stage).
2. **Clean training** (``finetune_epochs=60``): the isolation model is trained on, with plain
   cross-entropy, on the samples *not* isolated (the reference's and BackdoorBench's
   ``isolate_other_data``: their "finetuning of the ascent model"), at ``finetune_lr=0.1`` with
   random-crop augmentation.
3. **Backdoor unlearning** (``unlearning_epochs=20``): gradient ascent on the isolated samples,
   loss ``-CE`` (the reference's ``(-loss).backward()``), at a constant ``unlearning_lr=5e-4``, no
   augmentation, BatchNorm in train mode (as the reference). The trigger-to-target shortcut is
   what these samples share, so raising their loss breaks it while the clean task, learned from
   99% of the data, is kept.

Defaults, and where the sources differ: the paper's ``T = 100`` with ``T_te = 20`` splits the rest
into BackdoorBench's ``finetuning_epochs: 60`` and ``unlearning_epochs: 20`` (its
``config/defense/abl``). The reference's ``config.py`` has 10 isolation epochs, 60 of clean
training (0.1 for 40 epochs, then 0.01) and 5 of unlearning at ``5e-4`` (its epoch 0 only
evaluates: 4 ascent epochs); BackdoorBench's code ignores its ``lr_*_init`` settings and uses 0.01
then 0.001 for clean training and ``1e-4`` for unlearning. Here: 20 / 60 / 20 epochs, isolation at
the reference's constant 0.1, clean training on fit's one-cycle schedule peaking at 0.1 (``fit`` has
no step schedule), unlearning at the configured ``lr_unlearning_init = 5e-4`` held constant; Nesterov SGD,
momentum 0.9, ``weight_decay=1e-4``, ``batch_size=64`` throughout. The reference's Cutout and
flips are not applied in clean training (``fit``'s random crop only: flips are wrong for traffic
signs, Cutout is not in ``fit``).

Training is the project's one :func:`~backdoorlab.train.fit.fit` in all three stages: LGA, the
constant rate and the ascent are ``loss`` hooks (:class:`~..filters.abl.LocalGradientAscent`,
:class:`~..filters.abl.ConstantLR`, :class:`GradientAscent`).

Shapes: ``ctx.train`` images ``(N, C, H, W)`` float in [0, 1] (or uint8 NHWC), labels ``(N,)``.
The facts in the row are counts, epochs and seconds (the remover sees no ground truth).

Measured on the tests' GTSRB BadNets training set (small-cnn, 5,700 images, 570 poisoned):
see ``tests/defenses/test_abl.py`` for the small budget the tests run and its numbers.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from torch import nn

from ...classifier import Classifier
from ...errors import check
from ...train.fit import FitState, Hook, TrainConfig, accuracy, fit
from ..base import DEFENSES, DefenseContext, Remover
from ..filters.abl import ConstantLR, Isolation, _check_params, isolate, sample_losses
from ..filters.common import training_set


class GradientAscent(Hook):
    """ABL's unlearning loss: minus fit's batch cross-entropy (gradient ascent on the batch)."""

    def loss(self, state: FitState, x, y, logits, loss):
        return -loss


class StopWhenUnlearned(Hook):
    """Ends the unlearning (backdoorlab's option, not the paper's) after the first epoch in which
    the accuracy on the isolated samples (fit's ``train_acc``: train-mode forward passes before
    each step) is at most ``stop_acc``: those weights are kept (:meth:`restore_`), and the
    learning rate is 0 for the rest of fit's epochs, so the ascent does not run away. Place it
    after the hook that sets the rate."""

    def __init__(self, stop_acc: float):
        self.stop_acc = float(stop_acc)
        self.epoch: int | None = None
        self._weights: dict[str, Any] | None = None

    def loss(self, state: FitState, x, y, logits, loss):
        if self.epoch is not None:
            for group in state.optimizer.param_groups:
                group["lr"] = 0.0
        return loss

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        if self.epoch is None and metrics["train_acc"] <= self.stop_acc:
            self.epoch = state.epoch + 1
            self._weights = copy.deepcopy(state.model.state_dict())

    def restore_(self, model: nn.Module) -> nn.Module:
        """``model`` (fit's result) with the weights and BatchNorm statistics of the stopping epoch."""
        if self._weights is not None:
            model.load_state_dict(self._weights)
        return model


@DEFENSES.register("abl")
class ABL(Remover):
    """ABL (Li et al., NeurIPS 2021): train from scratch on ``ctx.train`` with backdoor isolation,
    clean training and backdoor unlearning. A training-time method: of ``ctx.model`` only its
    architecture is used (module docstring).

    ``isolation_epochs`` (20), ``gamma`` (0.5), ``isolation_ratio`` (0.01), ``lr`` (0.1, constant):
    the isolation stage with LGA. ``finetune_epochs`` (60), ``finetune_lr`` (0.1, cosine): training
    on the samples not isolated. ``unlearning_epochs`` (20), ``unlearning_lr`` (5e-4, constant):
    gradient ascent on the isolated samples. ``batch_size`` (64), ``weight_decay`` (1e-4),
    ``momentum`` (0.9): Nesterov SGD in every stage. ``finetune_epochs=0`` skips clean training
    (the reference's ``finetuning_ascent_model: False``).
    """

    name = "abl"

    def __init__(self, isolation_epochs: int = 20, finetune_epochs: int = 60, unlearning_epochs: int = 20,
                 gamma: float = 0.5, isolation_ratio: float = 0.01, lr: float = 0.1, finetune_lr: float = 0.1,
                 unlearning_lr: float = 5e-4, batch_size: int = 64, weight_decay: float = 1e-4,
                 momentum: float = 0.9, unlearning_stop_acc: float | None = None):
        _check_params("abl", isolation_epochs, lr, gamma, isolation_ratio, batch_size, weight_decay, momentum)
        for name, v, lo in (("finetune_epochs", finetune_epochs, 0), ("unlearning_epochs", unlearning_epochs, 1)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                  f"abl: {name} must be an integer >= {lo}, got {v!r}")
        for name, v in (("finetune_lr", finetune_lr), ("unlearning_lr", unlearning_lr)):
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                  f"abl: {name} must be a number > 0, got {v!r}")
        self.isolation_epochs, self.finetune_epochs, self.unlearning_epochs = (isolation_epochs, finetune_epochs,
                                                                               unlearning_epochs)
        self.gamma, self.isolation_ratio, self.lr = float(gamma), float(isolation_ratio), float(lr)
        self.finetune_lr, self.unlearning_lr = float(finetune_lr), float(unlearning_lr)
        check(unlearning_stop_acc is None or (isinstance(unlearning_stop_acc, (int, float))
                                              and not isinstance(unlearning_stop_acc, bool)
                                              and 0 <= unlearning_stop_acc < 1),
              f"abl: unlearning_stop_acc must be null or a number in [0, 1), got {unlearning_stop_acc!r}")
        self.batch_size, self.weight_decay, self.momentum = batch_size, float(weight_decay), float(momentum)
        self.unlearning_stop_acc = None if unlearning_stop_acc is None else float(unlearning_stop_acc)

    def isolate(self, ctx: DefenseContext) -> Isolation:
        """Stage 1, the ``abl-isolation`` filter's stage with this remover's settings."""
        return isolate(ctx, epochs=self.isolation_epochs, lr=self.lr, gamma=self.gamma,
                       isolation_ratio=self.isolation_ratio, batch_size=self.batch_size,
                       weight_decay=self.weight_decay, momentum=self.momentum, who=self.name)

    def _cfg(self, epochs: int, lr: float, augment: bool, schedule: str) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=lr, momentum=self.momentum, nesterov=True,
                           weight_decay=self.weight_decay, schedule=schedule, augment=augment)

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        train = training_set(ctx, self.name)
        iso = self.isolate(ctx)
        check(len(iso.isolated) == len(train), f"{self.name}: the isolation covers {len(iso.isolated)} samples, the "
                                               f"training set has {len(train)}")
        kept = train.subset(iso.isolated.logical_not().nonzero().flatten())
        suspect = train.subset(iso.isolated.nonzero().flatten())
        model, facts = iso.model, {}
        t0 = time.perf_counter()
        if self.finetune_epochs:
            res = fit(model, kept, self._cfg(self.finetune_epochs, self.finetune_lr, augment=True, schedule="onecycle"),
                      generator=ctx.generator, device=ctx.device, progress=ctx.progress)
            model = res.model
            facts["finetune_train_acc"] = res.history[-1]["train_acc"]
        t1 = time.perf_counter()
        dev = next(model.parameters()).device
        facts["holdout_acc_before_unlearning"] = accuracy(model, ctx.clean, device=dev) if len(ctx.clean) else None
        before = float(sample_losses(model, suspect, dev).mean())
        hooks: list[Hook] = [GradientAscent(), ConstantLR(self.unlearning_lr)]
        stop = StopWhenUnlearned(self.unlearning_stop_acc) if self.unlearning_stop_acc is not None else None
        if stop is not None:
            hooks.append(stop)
        res = fit(model, suspect, self._cfg(self.unlearning_epochs, self.unlearning_lr, augment=False,
                                            schedule="cosine"),
                  generator=ctx.generator, hooks=hooks, device=ctx.device, progress=ctx.progress)
        model = (stop.restore_(res.model) if stop is not None else res.model).eval()
        facts["unlearning_stopped_at"] = stop.epoch if stop is not None else None
        after = float(sample_losses(model, suspect, dev).mean())
        t2 = time.perf_counter()
        facts.update({
            "isolated": int(iso.isolated.sum()), "n_train": len(train),
            "isolation_epochs": iso.epochs, "finetune_epochs": self.finetune_epochs,
            "unlearning_epochs": self.unlearning_epochs, "gamma": self.gamma, "isolation_ratio": self.isolation_ratio,
            "isolated_loss_before_unlearning": round(before, 4), "isolated_loss_after_unlearning": round(after, 4),
            "isolated_acc_after_unlearning": accuracy(model, suspect, device=dev),
            "holdout_acc": accuracy(model, ctx.clean, device=dev) if len(ctx.clean) else None,
            "isolation_seconds": round(iso.seconds, 2), "finetune_seconds": round(t1 - t0, 2),
            "unlearning_seconds": round(t2 - t1, 2)})
        return ctx.deploy(model), facts


__all__ = ["ABL", "GradientAscent", "StopWhenUnlearned"]
