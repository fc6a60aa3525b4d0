"""Run one defense on one deployed classifier and score it against the ground truth.

Every kind yields the same three row fields, so detection rates aggregate across defenses:

* ``detected``: the defense's own verdict, made without ground truth (``None``: the method makes
  no verdict for this model, e.g. a remover on a clean model). For scanners: some label is
  flagged. For input detectors: at the threshold set on clean holdout inputs (FRR 1% by
  default), at least half of the triggered test inputs are flagged. For filters: the method's
  class-level decision. For removers: the backdoor is mitigated (ASR after repair < 0.2) on a
  model whose ASR before was at least 0.5.
* ``defense_score``: one continuous number, higher = stronger evidence or effect (scanner's
  anomaly index, detector's and filter's AUROC, remover's DER).
* ``target_flagged``: for methods that name labels, whether the attack's true target is among
  them (``None`` for clean models and for all-to-all attacks).

Which classifier ran is recorded: ``ran_on`` (``artifact`` for the black-box part) and
``grad_on`` (``artifact`` or ``surrogate`` for the part that needs gradients), with
``surrogate_agreement`` (top-1 agreement of artifact and surrogate on the defender's clean data)
whenever the surrogate was used.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attacks import Attack, NoAttack
from ..classifier import agreement
from ..data.tensordata import TensorData
from ..metrics import auroc, der, tpr_at_fpr
from .base import DefenseContext, Detector, Filter, Remover, Scanner, pick

ASR_BACKDOORED = 0.5  # a model counts as backdoored for a remover's verdict above this ASR
ASR_MITIGATED = 0.2  # ... and as repaired below this one
EVAL_LIMIT = 1000  # clean and triggered test inputs scored by input detectors


@dataclass
class Truth:
    """Ground truth a defense never sees, used only to score it.

    ``attack``: the attack (``NoAttack`` for a clean model); ``poisoned``: ``(N,)`` bool over
    ``ctx.train`` (all False for a clean model); ``test``: the clean test set;
    ``before``: CA / ASR / RA of the deployed model before any repair; ``tta``: the study's
    test-time augmentation, which scores the repaired model too.
    """

    attack: Attack
    poisoned: torch.Tensor
    test: TensorData
    before: dict[str, float] = field(default_factory=dict)
    tta: str = "none"
    # a clean model of the same architecture and recipe: with it, a remover's row also says whether
    # the backdoor is gone or dormant (BEC and re-activation, :mod:`.dormant`)
    reference_model: Any = None

    @property
    def clean_model(self) -> bool:
        return isinstance(self.attack, NoAttack)

    @property
    def target(self) -> int | None:
        if self.clean_model or self.attack.mode != "all-to-one":
            return None
        return self.attack.target


def _target_flagged(flagged: list[int], truth: Truth) -> bool | None:
    return None if truth.target is None else truth.target in flagged


def _record_grad(defense: Any, ctx: DefenseContext, out: dict[str, Any]) -> None:
    """Say where the gradient part runs (artifact or surrogate) and how well they agree."""
    needs = set(defense.white_box)
    if not needs:
        return
    _, where = pick(ctx.clf, *needs, who=defense.name)
    out["grad_on"] = where
    if where == "surrogate":
        out["surrogate_agreement"] = agreement(ctx.clf, ctx.clf.surrogate, ctx.clean.float())


def run_defense(defense: Any, ctx: DefenseContext, truth: Truth, *, eval_limit: int | None = None
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run ``defense`` on ``ctx`` and return ``(metrics, images)`` for the row.

    ``eval_limit``: at most this many clean and this many triggered test inputs are scored by an
    input detector (default: the detector's own ``eval_limit``, else ``EVAL_LIMIT``).

    Raises :class:`~backdoorlab.errors.BackdoorLabError` when the defense cannot run on this
    artifact (the caller records ``status=error``; it is never a "not detected").
    """
    for cap in defense.black_box:
        ctx.clf.require(cap, who=defense.name)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"defense_kind": defense.kind, "ran_on": "artifact"}
    _record_grad(defense, ctx, out)
    images: dict[str, torch.Tensor] = {}
    if isinstance(defense, Scanner):
        res = defense.scan(ctx)
        out.update(detected=bool(res.flagged), defense_score=float(res.score), flagged=list(res.flagged),
                   target_flagged=_target_flagged(res.flagged, truth), per_label=list(res.per_label))
        out.update(res.metrics)
        images = res.images
    elif isinstance(defense, Detector):
        limit = eval_limit or getattr(defense, "eval_limit", None) or EVAL_LIMIT
        out.update(_score_detector(defense, ctx, truth, limit))
    elif isinstance(defense, Filter):
        out.update(_score_filter(defense, ctx, truth))
    elif isinstance(defense, Remover):
        out.update(_score_remover(defense, ctx, truth))
    else:
        raise TypeError(f"{defense!r} is not a Scanner, Detector, Filter or Remover")
    out["defense_wall"] = time.perf_counter() - t0
    return out, images


def triggered_test(truth: Truth, limit: int = EVAL_LIMIT, g: torch.Generator | None = None,
                   labels: bool = False) -> tuple[torch.Tensor, ...]:
    """Up to ``limit`` clean test images and up to ``limit`` triggered ones (images the attack
    may flip, with its trigger applied), both ``(n, C, H, W)`` float in [0, 1]. ``labels=True``
    also returns the clean images' labels and the triggered images' attack targets, ``(n,)``."""
    test = truth.test
    n = len(test)
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    clean = test.subset(order[:limit]).float()
    counted = truth.attack.counted(test.y[order])
    trig_idx = order[counted][:limit]
    trig = truth.attack.apply(test.subset(trig_idx).float())
    if not labels:
        return clean, trig
    return clean, trig, test.y[order[:limit]], truth.attack.target_labels(test.y[trig_idx])


def _score_detector(det: Detector, ctx: DefenseContext, truth: Truth, limit: int = EVAL_LIMIT) -> dict[str, Any]:
    det.fit(ctx)
    x_clean, x_trig, y_clean, y_target = triggered_test(truth, limit, g=torch.Generator().manual_seed(0), labels=True)
    s_clean = det.score(ctx.clf, x_clean).float().cpu()
    s_trig = det.score(ctx.clf, x_trig).float().cpu()
    thr = float(det.threshold)
    frr = float((s_clean > thr).float().mean())  # clean test inputs wrongly rejected
    far = float((s_trig <= thr).float().mean())  # triggered inputs let through
    labels = torch.cat([torch.zeros(len(s_clean)), torch.ones(len(s_trig))])
    scores = torch.cat([s_clean, s_trig])
    roc = auroc(scores, labels)
    out = {"detected": (1 - far) >= 0.5, "defense_score": roc, "auroc": roc, "far": far, "frr": frr,
           "threshold": thr, "n_eval_clean": len(s_clean), "n_eval_triggered": len(s_trig), **_tprs(scores, labels)}
    extra = getattr(det, "extra_metrics", None)  # a detector's own numbers (VIF's filtered CA / ASR)
    if extra is not None:
        out.update(extra(ctx.clf, x_clean, y_clean, x_trig, y_target))
    return out


def _tprs(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """TPR at 1% and 5% FPR (the threshold-free operating points beside AUROC); None where a class
    is empty."""
    out: dict[str, float | None] = {}
    for name, fpr in (("tpr_at_1fpr", 0.01), ("tpr_at_5fpr", 0.05)):
        v = tpr_at_fpr(scores, labels, fpr)
        out[name] = None if math.isnan(v) else v
    return out


def _score_filter(flt: Filter, ctx: DefenseContext, truth: Truth) -> dict[str, Any]:
    res = flt.filter(ctx)
    poisoned = truth.poisoned.bool()
    out: dict[str, Any] = {"detected": res.detected, "flagged": list(res.flagged),
                           "target_flagged": _target_flagged(res.flagged, truth),
                           "n_removed": int(res.removed.sum())}
    if poisoned.any():
        roc = auroc(res.scores.float(), poisoned.float())
        caught = int((res.removed & poisoned).sum())
        out.update(auroc=roc, defense_score=roc, removal_recall=caught / int(poisoned.sum()),
                   removal_precision=caught / max(1, int(res.removed.sum())),
                   **_tprs(res.scores.float(), poisoned.float()))
    else:
        out.update(auroc=None, defense_score=None, removal_recall=None, removal_precision=0.0, tpr_at_1fpr=None,
                   tpr_at_5fpr=None)
    out.update(res.metrics)
    most = _poison_share(truth, ctx)
    if most is not None:
        cls, share = most
        out.update(poison_class=cls, poison_class_share=share)
        if truth.target is not None and cls == truth.target:  # the field earlier rows carry (all-to-one)
            out["target_poison_share"] = share
        if flt.minority_assumption and share > 0.5:
            # the method looks for poison as the minority of its class; here it is the majority,
            # so a flag (or its absence) would come from an inverted assumption: no verdict
            out["detected"] = None
            out["assumption"] = (f"poison is {share:.0%} of class {cls}: {flt.name} assumes it is "
                                 "a minority of its class; no verdict")
    if getattr(flt, "retrain", False):
        out.update(_retrain(flt, ctx, truth, ~res.removed.bool().cpu()))
    return out


def _poison_share(truth: Truth, ctx: DefenseContext) -> tuple[int, float] | None:
    """The class (by training label) whose samples are most often poisoned, and that share (ground
    truth): the target class of all-to-one, source-specific and clean-label attacks; for
    all-to-all attacks the poison spreads over the classes and the largest share is small."""
    if ctx.train is None or not truth.poisoned.any():
        return None
    y = ctx.train.y.cpu().long()
    bad = truth.poisoned.bool().cpu()
    total = torch.bincount(y, minlength=ctx.num_classes).double()
    share = torch.bincount(y[bad], minlength=ctx.num_classes).double() / total.clamp(min=1)
    cls = int(share.argmax())
    return cls, float(share[cls])


def _retrain(flt: Filter, ctx: DefenseContext, truth: Truth, keep: torch.Tensor) -> dict[str, Any]:
    """The filter's last step in its paper (Spectral Signatures, SCAn, ...): train the victim's
    model again, with the cell's recipe, on the samples the filter kept, deploy it as the cell
    deploys, and score it: ``ca_after_retrain``, ``asr_after_retrain``, ``ra_after_retrain``."""
    from ..bench.pipeline import evaluate

    if ctx.retrain is None:
        return {"retrain_skipped": "no training recipe in this context (only a study cell retrains)"}
    start = time.perf_counter()
    model = ctx.retrain(keep)
    if model is None:
        return {"retrain_skipped": f"attack {truth.attack.name!r} poisons during training (a training hook), "
                                   "not in the data: removing samples cannot remove it"}
    after = evaluate(ctx.deploy(model), truth.test, truth.attack, tta=truth.tta)
    return {"ca_after_retrain": after["ca"], "asr_after_retrain": after["asr"], "ra_after_retrain": after["ra"],
            "n_retrain": int(keep.sum()), "retrain_wall": time.perf_counter() - start}


def _score_remover(rem: Remover, ctx: DefenseContext, truth: Truth) -> dict[str, Any]:
    from ..bench.pipeline import evaluate

    repaired_fp32: list[Any] = []
    if ctx.redeploy is not None:  # the repaired FP32 model, as the remover hands it over to deploy
        deploy = ctx.redeploy

        def redeploy(m: Any) -> Any:
            repaired_fp32.append(m)
            return deploy(m)

        ctx = dataclasses.replace(ctx, redeploy=redeploy)
    backdoored_fp32 = ctx.model
    if rem.order == "deploy-first" and ctx.model is not None:
        from .order import shipped_model

        ctx = dataclasses.replace(ctx, model=shipped_model(ctx.clf, ctx.model))
    start = time.perf_counter()
    repaired, facts = rem.repair(ctx)
    repair_wall = time.perf_counter() - start
    after = evaluate(repaired, truth.test, truth.attack, tta=truth.tta)
    b = truth.before or evaluate(ctx.clf, truth.test, truth.attack, tta=truth.tta)
    score = der(b["ca"], after["ca"], b["asr"], after["asr"])
    backdoored = b["asr"] >= ASR_BACKDOORED and not truth.clean_model
    out = {"detected": (after["asr"] < ASR_MITIGATED) if backdoored else None, "defense_score": score,
           "der": score, "ca_before": b["ca"], "asr_before": b["asr"], "ra_before": b["ra"],
           "ca_after": after["ca"], "asr_after": after["asr"], "ra_after": after["ra"],
           "repaired_precision": repaired.precision, "repair_wall": repair_wall, "repair_order": rem.order,
           **facts}
    if not repaired_fp32 and hasattr(repaired, "module"):
        repaired_fp32.append(repaired.module)
    settings = rem.dormancy
    if (settings is not None and backdoored and truth.reference_model is not None and backdoored_fp32 is not None
            and repaired_fp32):
        from .dormant import Dormancy, dormancy

        out.update(dormancy(backdoored=backdoored_fp32, repaired=repaired_fp32[-1], clean=truth.reference_model,
                            deployed=repaired, attack=truth.attack, test=truth.test, device=ctx.device,
                            settings=Dormancy() if settings == "default" else settings,
                            generator=torch.Generator().manual_seed(int(ctx.generator.initial_seed()) % 2**31)))
    return out


__all__ = ["Truth", "run_defense", "triggered_test"]
