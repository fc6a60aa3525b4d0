"""CETF's lightweight model repair (Zhou, Ye, Tang, Luo, Shi & Jia, "Evolutionary Trigger Detection
and Lightweight Model Repair Based Backdoor Defense", arXiv 2407.05396, 2024, second phase).

The first phase, CETF (:mod:`backdoorlab.defenses.detectors.cetf`), filters triggered inputs and
extracts their triggers: for a flagged input, the square whose masking moved the prediction. The
second phase unlearns those triggers: clean images of the defender's holdout are stamped with the
extracted triggers (the input's pixels under its square, pasted at the same place) and keep their
true labels, so that the model learns that the trigger does not decide the class. The paper's
variants (``variant``):

* ``"bn-unlearning"`` (default; the issue: "unlearning on the triggers that CETF detects, with the
  Batch Normalization layers as the repaired part"): only the BatchNorm layers change: their
  affine parameters are trained (SGD) on the stamped-and-clean batches, in train mode, so their
  running statistics are re-estimated on the same data; every other weight is frozen.
* ``"bn-cleaning"``: no gradient step at all: the BatchNorm running statistics are re-estimated
  (reset, then a cumulative average over ``epochs`` passes in train mode) on the stamped-and-clean
  data; the paper reports that the backdoor is tied to these statistics.
* ``"naive"``: Naive Unlearning, the same training with every parameter trainable.

**Threat model and where the triggered inputs come from.** CETF is an input filter: the defender
sees inputs at run time, some of them triggered, and keeps the triggers it catches for the repair.
backdoorlab's cell has no stream of run-time inputs, so the triggered inputs are taken where a
defender meets them: from the training set as received (``ctx.train``, poisoned in a backdoored
cell). A random subset of ``scan_size`` training images is scanned by the CETF detector, fitted on
the clean holdout (threshold at its ``frr`` quantile); an image is taken as triggered when its score
is above the threshold and masking its best square changes the predicted label. The
``max_triggers`` highest-scoring ones give the triggers. Where none is found the model is handed
back unchanged (``n_triggers = 0`` in the row).

No code has been published with the paper and only its summary was available here, so backdoorlab
chose: the stamping onto clean images with true labels, ``portion=0.5`` of each batch stamped, SGD
(momentum 0.9) at ``lr=0.01`` for ``epochs=10`` at ``batch_size=64``, and the cumulative
statistics of ``bn-cleaning``.

Shapes: images ``(N, C, H, W)`` float in [0, 1]; triggers are a bool mask ``(H, W)`` and the pixels
``(C, H, W)`` under it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Remover
from .ft import check_int, check_number

VARIANTS = ("bn-unlearning", "bn-cleaning", "naive")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def stamp(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` with trigger ``i`` (``masks[i]`` ``(H, W)`` bool, ``patterns[i]``
    ``(C, H, W)``) pasted on image ``i``."""
    return torch.where(masks[:, None], patterns, x)


@DEFENSES.register("cetf-repair")
class CETFRepair(Remover):
    """CETF's trigger unlearning (Zhou et al., 2024; module docstring).

    ``variant``: ``"bn-unlearning"``, ``"bn-cleaning"`` or ``"naive"``. ``scan_size``: training
    images scanned for triggers. ``max_triggers``: triggers kept (highest CETF scores first).
    ``detector``: parameters of the CETF detector (:class:`~backdoorlab.defenses.detectors.cetf.CETF`).
    ``epochs``, ``lr``, ``batch_size``, ``momentum``: the unlearning (``bn-cleaning`` uses
    ``epochs`` and ``batch_size`` only). ``portion``: share of each batch stamped with a trigger.
    """

    name = "cetf-repair"

    def __init__(self, variant: str = "bn-unlearning", scan_size: int = 1000, max_triggers: int = 100,
                 detector: dict | None = None, epochs: int = 10, lr: float = 0.01, batch_size: int = 64,
                 momentum: float = 0.9, portion: float = 0.5):
        who = "cetf-repair"
        check(variant in VARIANTS, f"{who}: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        check_int(who, "scan_size", scan_size, 1)
        check_int(who, "max_triggers", max_triggers, 1)
        check(detector is None or isinstance(detector, dict),
              f"{who}: detector must be a mapping of CETF parameters, got {detector!r}")
        det = dict(detector or {})
        check("name" not in det, f"{who}: detector takes CETF's parameters only, not a name")
        check_int(who, "epochs", epochs, 1)
        check_number(who, "lr", lr, 0, lo_open=True)
        check_int(who, "batch_size", batch_size, 1)
        check_number(who, "momentum", momentum, 0, 1)
        check_number(who, "portion", portion, 0, 1, lo_open=True, hi_open=False)
        self.detector_params = det
        DEFENSES.validate({"name": "cetf", **det})  # the detector's own checks, before anything runs
        self.variant, self.scan_size, self.max_triggers = variant, scan_size, max_triggers
        self.epochs, self.lr, self.batch_size, self.momentum, self.portion = epochs, float(lr), batch_size, \
            float(momentum), float(portion)

    def find_triggers(self, ctx: DefenseContext) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Triggers extracted from the training set as received: masks ``(T, H, W)`` bool and
        patterns ``(T, C, H, W)``, with facts about the scan."""
        check(ctx.train is not None and len(ctx.train) > 0,
              "cetf-repair needs the training set as received (ctx.train) to find triggered inputs in")
        from ..detectors.cetf import CETF  # here: detectors.cetf imports this package's ft module

        det = CETF(**self.detector_params)
        det.fit(ctx)
        n = len(ctx.train)
        idx = torch.randperm(n, generator=ctx.generator)[:min(n, self.scan_size)]
        x = ctx.train.subset(idx).float()
        ext = det.extract(ctx.clf, x)
        hit = (ext.score > det.threshold) & ext.flipped
        order = torch.argsort(ext.score.masked_fill(~hit, float("-inf")), descending=True)[:int(hit.sum())]
        order = order[:self.max_triggers]
        masks = ext.mask[order]
        patterns = x[order]
        facts = {"n_scanned": len(idx), "n_flagged": int(hit.sum()), "n_triggers": len(order),
                 "cetf_threshold": det.threshold,
                 "trigger_area_mean": float(masks.flatten(1).sum(1).float().mean()) if len(order) else None}
        return masks, patterns, facts

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        check(ctx.model is not None, "cetf-repair needs the FP32 model the artifact was deployed from")
        check(len(ctx.clean) > 0, "cetf-repair needs clean holdout data")
        masks, patterns, facts = self.find_triggers(ctx)
        dev, g = ctx.device, ctx.generator
        model = copy.deepcopy(ctx.model).float().to(dev).eval()
        facts.update(variant=self.variant, epochs=self.epochs, holdout_size=len(ctx.clean), steps=0)
        if len(masks) == 0:
            return ctx.deploy(model), facts
        bns = [m for m in model.modules() if isinstance(m, _BN)]
        x_all, y_all = ctx.clean.float().to(dev), ctx.clean.y.long().to(dev)
        n = len(y_all)

        def batches():
            for idx in torch.randperm(n, generator=g).split(self.batch_size):
                x = x_all[idx.to(dev)]
                k = max(1, int(round(self.portion * len(idx))))
                pick = torch.randint(0, len(masks), (k,), generator=g)
                x = torch.cat([stamp(x[:k], masks[pick].to(dev), patterns[pick].to(dev)), x[k:]])
                yield x, y_all[idx.to(dev)]

        if self.variant == "bn-cleaning":
            saved = [(m.momentum, m.track_running_stats) for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over every batch seen
            model.train()
            with torch.no_grad():
                for _ in range(self.epochs):
                    for x, _y in batches():
                        model(x)
            for m, (mom, _) in zip(bns, saved, strict=True):
                m.momentum = mom
            model.eval()
        else:
            params = [p for m in bns for p in m.parameters()] if self.variant == "bn-unlearning" \
                else list(model.parameters())
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
            model.train(self.variant == "naive")
            for m in bns:  # the BatchNorm layers are the repaired part: their statistics follow the data
                m.train()
            steps = 0
            for _ in range(self.epochs):
                for x, y in batches():
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
            facts["steps"] = steps
            model.eval()
            for p in model.parameters():
                p.grad = None
                p.requires_grad_(True)
        return ctx.deploy(model), facts


__all__ = ["CETFRepair", "stamp"]
