"""Calibrated Trigger Inversion (CTI), the detector of Lukas & Kerschbaum, "Pick your Poison:
Undetectability versus Robustness in Data Poisoning Attacks", arXiv:2305.09671, 2023 (preprint;
no peer-reviewed venue found), with 1% of the training set as trusted image-label pairs.

**Kind: a model scanner.** CTI decides whether a *model* is backdoored (the authors' ``detect.py``
scores backdoored and clean models and reports the ROC AUC over models); it never scores training
samples or test inputs, so it is a :class:`~backdoorlab.defenses.base.Scanner`, not a training-data
filter. Its by-product is the label(s) it names as targets.

Reference implementation: the authors' code, pushed by N. Lukas on 2023-05-04 into
github.com/Ben-Schneider-code/vision_backdooring (commit 8359ef4),
``src/defenses/detection/calibrated_trigger_inversion.py`` (``CalibratedTriggerInversionDetector``;
registered there as ``neural-cleanse-enhanced-detector``), defaults in
``src/arguments/defense_args.py``.

Algorithm (for a suspect model ``f_0`` and trusted data ``(x, y)``):

1. **Calibration model.** ``f_r``: ``f_0`` repaired by Pivotal Tuning on the trusted data
   (:mod:`~backdoorlab.defenses.removers.pivotal_tuning`, with its defaults).
2. **Trigger inversion, per candidate label** ``k`` (every label): an additive perturbation
   ``delta_k`` ``(C, H, W)``, initialised ``0.01 * U[0, 1)``, applied as ``clip(x + delta_k, 0, 1)``
   to trusted images not of label ``k``, is optimised with Adam (``lr=0.01``, ``betas=(0.5, 0.9)``)
   for ``steps_per_class=50`` steps of ``batch_size=128`` (random horizontal flips) on
   ``CE(f_0(x + delta_k), k) + 0.5 * CE(f_r(x + delta_k), y)``: a trigger that moves the suspect
   model to ``k`` *while the repaired model keeps the true label*. There is no norm penalty (the
   reference sets ``nc_lambda_norm = 0``): the calibration against ``f_r`` replaces Neural Cleanse's
   smallness prior. A universal adversarial perturbation that fools any model of the task fools
   ``f_r`` as well; only a trigger the repair removed separates the two.
3. **Score** of ``k``: ``ASR(f_0, delta_k) - ASR(f_r, delta_k)``, the share of triggered images
   (not of label ``k``) each model sends to ``k``; the model's score is the largest over labels.

Decision (ours: the paper reports ROC AUC over models and no threshold): labels with score above
``threshold`` are flagged, largest first. The default 0.5 (the suspect model sends half the
triggered images more to ``k`` than the repaired one) is not a calibrated value: on the GTSRB
models below no threshold separates backdoored from clean.

Deviations, and why:

* The trigger's success is measured on the trusted images (those not of label ``k``), not on the
  test set the reference uses: a defender with 1% trusted data has no other clean images.
* All labels are optimised together (the perturbations are one ``(K, C, H, W)`` tensor, each
  label's loss summed, so Adam's element-wise update is the per-label one); a batch is drawn from
  all trusted images and each label's loss averages over the images not of that label (the
  reference draws from the images of the other labels). ``forward_batch`` bounds the images per
  forward pass.
* Gradients: ``f_0`` is ``pick(ctx.clf, GRAD)``: the artifact, or the fake-quant surrogate of an
  int8 artifact; the suspect model's success is then measured on the deployed artifact itself. PT
  starts from ``ctx.model`` (the FP32 model) when there is one, else from the gradient model's
  module. ``f_r`` stays in FP32 (a reference, never deployed).

Trusted data: ``trusted_fraction=0.2`` of the defender's holdout (5% of the training set) = the
paper's 1%, the seeded subset :func:`~backdoorlab.defenses.removers.pivotal_tuning.trusted_subset`
(``trusted_seed=0``; the same images Pivotal Tuning uses).

Images: ``(N, C, H, W)`` float in [0, 1]; perturbations ``(K, C, H, W)`` in [-1, 1].

Output: ``flagged`` (labels with score > threshold, highest first), ``score`` (the largest label
score, in [-1, 1]), ``per_label`` (the ``K`` scores), ``images['perturbation']`` = ``(delta + 1) / 2``
``(K, C, H, W)`` in [0, 1]; ``metrics``: ``asr_suspect`` / ``asr_repaired`` per label, the PT facts
(``pt_*``), ``gradient_model`` (artifact / surrogate), ``trusted_size``.

Measured on the tests' GTSRB models (small-cnn, BadNets target 0 and the clean model; 60 trusted
images; FP32; ``tests/defenses/test_pick_your_poison.py``):

* labels 0-7, ``pt_steps=150``, the paper's 50 inversion steps (~87 s per model on 2 shared CPU
  cores): every label scores above 0.5 on *both* models (BadNets: max 0.917, label 0 0.917,
  suspect ASR 0.93-1.0, repaired 0.03-0.43; clean: max 0.967);
* the test's budget (labels 0 and 1, ``pt_steps=50``, 20 steps, ~14 s per model): BadNets
  scores 0.350 / 0.051, the clean model 0.383 / 0.458.

The calibration fails because Pivotal Tuning on 60 images does not remove the backdoor without
wrecking the model (see :mod:`~backdoorlab.defenses.removers.pivotal_tuning`): a calibration model
that lost a third to two thirds of its accuracy disagrees with the suspect under some
perturbation for every label, backdoored or not, while the true trigger still fools both.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Capability, TorchClassifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick
from ..removers.ft import check_int, check_number
from ..removers.pivotal_tuning import check_fraction, pivotal_tune, trusted_subset
from .neural_cleanse import _gradient_model

BETAS = (0.5, 0.9)  # Adam(..., betas=(0.5, 0.9)) in the reference


@DEFENSES.register("calibrated-trigger-inversion")
class CalibratedTriggerInversion(Scanner):
    """Calibrated Trigger Inversion (Lukas & Kerschbaum, arXiv:2305.09671, 2023): per-label
    triggers that fool the suspect model but not its Pivotal-Tuning repair.

    ``steps_per_class`` (50), ``lr`` (0.01), ``batch_size`` (128), ``repaired_weight`` (0.5, the
    weight of the repaired model's true-label loss), ``init_scale`` (0.01), ``hflip`` (true): the
    inversion. ``pt_steps`` (2000), ``pt_lr`` (1e-4), ``pt_batch_size`` (128), ``slol_lambda``
    (0.05), ``param_lambda`` (20000): the Pivotal Tuning that makes the calibration model.
    ``threshold`` (0.5): labels scoring above it are flagged. ``trusted_fraction`` (0.2 of the 5%
    holdout = 1% of the training set), ``trusted_seed`` (0). ``forward_batch`` (4096): images per
    forward pass. ``targets``: the candidate labels (null = every label, the reference's default; a
    list generalises its single ``nc_accelerate_target``).
    """

    name = "calibrated-trigger-inversion"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, steps_per_class: int = 50, lr: float = 0.01, batch_size: int = 128,
                 repaired_weight: float = 0.5, init_scale: float = 0.01, hflip: bool = True,
                 pt_steps: int = 2000, pt_lr: float = 1e-4, pt_batch_size: int = 128, slol_lambda: float = 0.05,
                 param_lambda: float = 20000.0, threshold: float = 0.5, trusted_fraction: float = 0.2,
                 trusted_seed: int = 0, forward_batch: int = 4096, targets: list[int] | None = None):
        who = self.name
        check_int(who, "steps_per_class", steps_per_class, 1)
        check_number(who, "lr", lr, 0, lo_open=True)
        check_int(who, "batch_size", batch_size, 1)
        check_number(who, "repaired_weight", repaired_weight, 0)
        check_number(who, "init_scale", init_scale, 0, 1, hi_open=False)
        check(isinstance(hflip, bool), f"{who}: hflip must be true or false, got {hflip!r}")
        check_int(who, "pt_steps", pt_steps, 1)
        check_number(who, "pt_lr", pt_lr, 0, lo_open=True)
        check_int(who, "pt_batch_size", pt_batch_size, 1)
        check_number(who, "slol_lambda", slol_lambda, 0)
        check_number(who, "param_lambda", param_lambda, 0)
        check_number(who, "threshold", threshold, -1, 1, hi_open=False)
        check_fraction(who, trusted_fraction)
        check_int(who, "trusted_seed", trusted_seed, 0)
        check_int(who, "forward_batch", forward_batch, 1)
        check(targets is None or (isinstance(targets, (list, tuple)) and len(targets) > 0 and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in targets)),
            f"{who}: targets must be null (every label) or a non-empty list of labels >= 0, got {targets!r}")
        self.targets = None if targets is None else sorted(set(targets))
        self.steps_per_class, self.lr, self.batch_size = steps_per_class, float(lr), batch_size
        self.repaired_weight, self.init_scale, self.hflip = float(repaired_weight), float(init_scale), hflip
        self.pt = {"steps": pt_steps, "lr": float(pt_lr), "batch_size": pt_batch_size, "momentum": 0.9,
                   "slol_lambda": float(slol_lambda), "param_lambda": float(param_lambda)}
        self.threshold, self.trusted_fraction = float(threshold), float(trusted_fraction)
        self.trusted_seed = trusted_seed
        self.forward_batch = forward_batch

    # ----------------------------------------------------------------------------- pieces
    def repaired(self, ctx: DefenseContext, grad_clf, trusted) -> tuple[nn.Module, dict[str, Any]]:
        """The calibration model: Pivotal Tuning of the suspect FP32 model on the trusted data."""
        if ctx.model is not None:
            start = ctx.model
        else:
            check(isinstance(grad_clf, TorchClassifier),
                  f"{self.name} needs the FP32 model (or a PyTorch artifact) to repair as its calibration model")
            start = grad_clf.module
        start = copy.deepcopy(start).float().to(ctx.device)
        model, facts = pivotal_tune(start, trusted, generator=ctx.generator, device=ctx.device,
                                    progress=ctx.progress, who=self.name, **self.pt)
        return model.eval().requires_grad_(False), facts

    def invert(self, suspect, repaired: nn.Module, x: torch.Tensor, y: torch.Tensor, candidates: list[int],
               g: torch.Generator) -> torch.Tensor:
        """Perturbations ``(K, C, H, W)`` for the ``K`` candidate labels (step 2). ``x``: ``(N, C, H, W)``
        on the device."""
        k_all, n = len(candidates), len(x)
        dev = x.device
        delta = (torch.rand((k_all, *x.shape[1:]), generator=g) * self.init_scale).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=self.lr, betas=BETAS)
        labels = torch.as_tensor(candidates, dtype=torch.long, device=dev)
        bs = min(self.batch_size, n)
        perm, pos = torch.randperm(n, generator=g), 0
        for _ in range(self.steps_per_class):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + bs].to(dev)
            pos += bs
            xb, yb = x[idx], y[idx]
            if self.hflip:
                flip = (torch.rand(len(xb), generator=g) < 0.5).to(dev)
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            opt.zero_grad(set_to_none=True)
            chunk = max(1, self.forward_batch // len(xb))
            for k0 in range(0, k_all, chunk):
                ks = labels[k0:k0 + chunk]
                xt = (xb[None] + delta[k0:k0 + chunk, None]).clamp(0, 1).flatten(0, 1)  # (k*B, C, H, W)
                keep = (yb[None, :] != ks[:, None]).float()  # (k, B): images not of the label
                tgt = ks[:, None].expand(-1, len(xb)).flatten()
                ce_s = F.cross_entropy(suspect.logits(xt), tgt, reduction="none").view(len(ks), -1)
                ce_r = F.cross_entropy(repaired(xt), yb.repeat(len(ks)), reduction="none").view(len(ks), -1)
                per = ((ce_s + self.repaired_weight * ce_r) * keep).sum(1) / keep.sum(1).clamp_min(1)
                per.sum().backward()
            opt.step()
        return delta.detach()

    @torch.no_grad()
    def success(self, predict, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                candidates: list[int]) -> list[float]:
        """Per candidate label ``k``: the share of ``clip(x + delta_k)`` (images not of ``k``) predicted ``k``."""
        out = []
        for i, k in enumerate(candidates):
            xs = x[y != k]
            out.append(float((predict((xs + delta[i]).clamp(0, 1)).cpu() == k).float().mean()) if len(xs) else 0.0)
        return out

    # ------------------------------------------------------------------------------- scan
    def scan(self, ctx: DefenseContext) -> ScanResult:
        trusted = trusted_subset(ctx.clean, self.trusted_fraction, self.trusted_seed, self.name)
        cands = list(range(ctx.num_classes)) if self.targets is None else self.targets
        check(cands[-1] < ctx.num_classes, f"{self.name}: targets must be labels below {ctx.num_classes}, got {cands}")
        grad_clf, which = pick(ctx.clf, Capability.GRAD, who=self.name)
        repaired, pt_facts = self.repaired(ctx, grad_clf, trusted)
        x, y = trusted.float().to(ctx.device), trusted.y.to(ctx.device)
        with _gradient_model(grad_clf, ctx.device) as suspect:
            delta = self.invert(suspect, repaired, x, y, cands, ctx.generator)
        x_cpu, y_cpu, d_cpu = x.cpu(), y.cpu(), delta.cpu()
        asr_s = self.success(ctx.clf.predict, x_cpu, y_cpu, d_cpu, cands)

        def predict_r(xs: torch.Tensor) -> torch.Tensor:
            return torch.cat([repaired(xs[i:i + 1024].to(ctx.device)).argmax(1).cpu() for i in range(0, len(xs), 1024)])

        asr_r = self.success(predict_r, x_cpu, y_cpu, d_cpu, cands)
        scores = [a - b for a, b in zip(asr_s, asr_r)]
        flagged = [cands[i] for i in sorted((i for i, s in enumerate(scores) if s > self.threshold),
                                            key=lambda i: -scores[i])]
        metrics = {"candidates": cands, "asr_suspect": asr_s, "asr_repaired": asr_r, "gradient_model": which,
                   "trusted_size": len(trusted), **{f"pt_{k}": v for k, v in pt_facts.items()}}
        return ScanResult(flagged=flagged, score=max(scores), per_label=scores,
                          images={"perturbation": ((d_cpu + 1) / 2).clamp(0, 1)}, metrics=metrics)


__all__ = ["CalibratedTriggerInversion"]
