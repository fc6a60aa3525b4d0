"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, "Reconstructive Neuron
Pruning for Backdoor Defense", ICML 2023, arXiv:2305.14876; code: bboylyg/RNP).

An asymmetric *unlearn-then-recover* process exposes the backdoor neurons:

1. **Neuron-level unlearning.** Gradient *ascent* on the cross-entropy of the defender's clean
   data, over all weights of a copy of the model, until its clean accuracy on that data falls to
   ``clean_threshold`` (0.2). Unlearning destroys the clean features but leaves the backdoor
   features (which clean data never exercises) largely intact.
2. **Filter-level recovering.** On the unlearned model, with its weights frozen, learn a mask
   ``m_k`` in [0, 1] per neuron (per ``BatchNorm2d`` channel, scaling the BN's weight) that brings
   the clean accuracy back: minimise ``alpha * CE``. The clean neurons are recovered
   (mask near 1); the backdoor neurons, which do not help clean accuracy, and which unlearning made
   the carriers of the remaining signal, are switched off (small mask).
3. **Pruning.** The *original* backdoored model's neurons whose mask is ``<= threshold`` are pruned.

Defaults are the authors' (``main.py``, and BackdoorBench's ``defense/rnp.py``): unlearning SGD
``unlearning_lr=0.01``, momentum 0.9, weight decay 5e-4, learning rate x0.1 at epochs 10 and 20,
at most ``unlearning_epochs=20`` epochs, stopping after the first epoch whose running training
accuracy is ``<= clean_threshold=0.2``; recovering SGD ``recovering_lr=0.2`` (momentum 0.9) on the
masks for ``recovering_epochs=20`` epochs with ``alpha=0.2``, masks clipped to [0, 1] after each
step; ``batch_size=128``; pruning by threshold. Both phases run in train mode (batch statistics),
as the authors'.

Here:

* **Pruning threshold.** The paper prunes by mask threshold; BackdoorBench sweeps thresholds and
  keeps the one with the lowest *test ASR* within a 10% clean-accuracy loss (a defender has no
  test ASR). Here ``threshold=0.2`` (the value at which the authors' published BadNets log reaches
  ASR 6.6% at a 0.6-point clean-accuracy cost), or, with ``max_acc_drop`` set, the largest
  threshold of the sweep grid (0, 0.05, ..., 0.9) whose *clean holdout* accuracy stays within
  ``max_acc_drop`` of the unpruned model's.
* **When unlearning stops.** The reference checks the running training accuracy after each
  epoch. On the 300-image GTSRB holdout (3 batches an epoch) the small CNN's ascent runs off a
  cliff within one epoch (momentum 0.9: holdout loss 0.35 -> 4.7 -> 81 over 7 steps), so the
  per-epoch check keeps a model with 1% accuracy, whose masks then recover only 9% of the holdout
  and prune 216 of 672 channels (CA 0.96 -> 0.18). Here the accuracy of each batch is measured in
  its forward pass and unlearning stops *before* stepping on the first batch at or below
  ``clean_threshold``: the kept model is the one that was measured (11 ascent steps; masks recover
  88%; 82 channels pruned; CA 0.96 -> 0.92, ASR 0.94 -> 0.00).
* **Gradient clipping.** The reference calls ``clip_grad_norm_(max_norm=20)`` before
  ``backward()``, where the gradients are already zeroed, so it never clips; here the ascent
  gradient is clipped to norm 20 after ``backward()``, as intended.
* **Data.** The authors' 500 defense images (1% of CIFAR-10) are shuffled each epoch with random
  crop and flip; here the defender's holdout ``ctx.clean`` is used as is (the lab's GTSRB recipe
  trains without flips or crops), reshuffled each epoch with ``ctx.generator``.
* **A pruned neuron is exactly zero.** The reference sets the pruned BN weight to 0 and keeps its
  bias; here the whole channel is zeroed (weight, bias, running statistics, and the conv filter
  where the conv feeds only this BN), so it is exactly 0 after int8 deployment and ONNX export
  (:mod:`.neuron_pruning`).
* The repaired FP32 model is deployed as the cell deploys (``ctx.redeploy``).

Cost: at most ``unlearning_epochs + recovering_epochs`` passes over the holdout (about 10 s for
the small CNN on the 300-image GTSRB holdout on one CPU thread). Works on every registered
architecture. Images ``(N, C, H, W)`` float in [0, 1]; masks ``(K,)`` per BN layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Classifier
from ..base import DEFENSES, DefenseContext, Remover
from .neuron_pruning import (
    NeuronMasks,
    batches,
    bn_units,
    check_int,
    check_number,
    check_threshold,
    fp32_copy,
    holdout,
    prune_by_mask,
)

MOMENTUM = 0.9
UNLEARN_WEIGHT_DECAY = 5e-4
UNLEARN_MILESTONES = (10, 20)  # MultiStepLR(gamma=0.1), the authors' --schedule
MAX_GRAD_NORM = 20.0


@DEFENSES.register("rnp")
class RNP(Remover):
    """Reconstructive Neuron Pruning (Li et al., ICML 2023).

    ``unlearning_lr``, ``unlearning_epochs``, ``clean_threshold``: gradient ascent on the holdout
    (SGD) until the running training accuracy is ``<= clean_threshold`` or the epochs run out.
    ``recovering_lr``, ``recovering_epochs``, ``alpha``: mask learning on the unlearned model.
    ``threshold``: prune neurons whose mask is ``<= threshold``; ``max_acc_drop``: if set, choose
    the threshold from clean holdout accuracy instead (module docstring).
    """

    name = "rnp"

    def __init__(self, unlearning_lr: float = 0.01, unlearning_epochs: int = 20, clean_threshold: float = 0.2,
                 recovering_lr: float = 0.2, recovering_epochs: int = 20, alpha: float = 0.2,
                 batch_size: int = 128, threshold: float = 0.2, max_acc_drop: float | None = None):
        check_number("rnp", "unlearning_lr", unlearning_lr, 0, lo_open=True)
        check_int("rnp", "unlearning_epochs", unlearning_epochs, 1)
        check_number("rnp", "clean_threshold", clean_threshold, 0, 1, hi_open=True)
        check_number("rnp", "recovering_lr", recovering_lr, 0, lo_open=True)
        check_int("rnp", "recovering_epochs", recovering_epochs, 1)
        check_number("rnp", "alpha", alpha, 0, lo_open=True)
        check_int("rnp", "batch_size", batch_size, 2)
        check_threshold("rnp", threshold, max_acc_drop)
        self.unlearning_lr, self.unlearning_epochs = float(unlearning_lr), unlearning_epochs
        self.clean_threshold = float(clean_threshold)
        self.recovering_lr, self.recovering_epochs, self.alpha = float(recovering_lr), recovering_epochs, float(alpha)
        self.batch_size = batch_size
        self.threshold = float(threshold)
        self.max_acc_drop = None if max_acc_drop is None else float(max_acc_drop)

    def unlearn(self, ctx: DefenseContext) -> tuple[nn.Module, dict[str, Any]]:
        """Step 1: a copy of ``ctx.model`` unlearned by gradient ascent on the holdout, and facts."""
        model = fp32_copy(ctx, "rnp", channels_last=True)
        x, y = holdout(ctx, "rnp")
        opt = torch.optim.SGD(model.parameters(), lr=self.unlearning_lr, momentum=MOMENTUM,
                              weight_decay=UNLEARN_WEIGHT_DECAY)
        model.train()
        acc, epochs, steps, reached = 1.0, 0, 0, False
        for epoch in range(self.unlearning_epochs):
            lr = self.unlearning_lr * 0.1 ** sum(epoch >= m for m in UNLEARN_MILESTONES)
            for group in opt.param_groups:
                group["lr"] = lr
            epochs = epoch + 1
            for idx in batches(len(x), self.batch_size, ctx.generator, ctx.device):
                out = model(x[idx])
                acc = float((out.detach().argmax(1) == y[idx]).float().mean())
                if acc <= self.clean_threshold:  # unlearned: keep the model that was just measured
                    reached = True
                    break
                opt.zero_grad(set_to_none=True)
                (-F.cross_entropy(out, y[idx])).backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
                opt.step()
                steps += 1
            if reached:
                break
        return model, {"unlearning_epochs_run": epochs, "unlearning_steps": steps, "unlearned_batch_acc": acc,
                       "unlearning_reached_threshold": reached}

    def recover(self, ctx: DefenseContext, unlearned: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Step 2: masks ``(K,)`` in [0, 1] per BN layer (by name) learned on the unlearned model."""
        x, y = holdout(ctx, "rnp")
        for p in unlearned.parameters():
            p.requires_grad_(False)
        nm = NeuronMasks(unlearned, bn_units(unlearned, "rnp"), ctx.device)
        opt = torch.optim.SGD(nm.masks, lr=self.recovering_lr, momentum=MOMENTUM)
        unlearned.train()
        steps, hits, seen = 0, 0, 0
        try:
            for _ in range(self.recovering_epochs):
                hits = seen = 0
                for idx in batches(len(x), self.batch_size, ctx.generator, ctx.device):
                    out = unlearned(x[idx])
                    loss = self.alpha * F.cross_entropy(out, y[idx])
                    hits += int((out.detach().argmax(1) == y[idx]).sum())
                    seen += len(idx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    nm.clip_()
                    steps += 1
        finally:
            nm.remove()
        return nm.values(), {"mask_iterations": steps, "recovered_train_acc": hits / max(seen, 1)}

    def prune(self, ctx: DefenseContext) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
        """Steps 1-3: the pruned FP32 copy of ``ctx.model``, the pruned channels by BN name, facts."""
        unlearned, facts = self.unlearn(ctx)
        masks, more = self.recover(ctx, unlearned)
        del unlearned
        model = fp32_copy(ctx, "rnp").eval()
        x, y = holdout(ctx, "rnp")
        pruned_model, pruned, prune_facts = prune_by_mask(model, bn_units(model, "rnp"), masks, self.threshold,
                                                          self.max_acc_drop, x, y)
        facts.update(more)
        facts.update(prune_facts)
        facts["mask_min"] = float(min(m.min() for m in masks.values()))
        return pruned_model, pruned, facts

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        model, _, facts = self.prune(ctx)
        return ctx.deploy(model), facts


__all__ = ["RNP"]
