"""Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019).

For every label ``k`` the defender reverse-engineers the smallest trigger that sends clean images
to ``k``: a mask ``m`` ``(1, H, W)`` and a pattern ``p`` ``(C, H, W)``, both in [0, 1], applied
as ``x' = (1 - m) * x + m * p``, minimising ``CE(f(x'), k) + cost * |m|_1``. An infected label
needs a much smaller mask than the others; the MAD anomaly index over the ``K`` mask L1 norms
(consistency constant 1.4826) flags labels whose norm is below the median with index > 2.

Hyperparameters follow the authors' code (github.com/bolunwang/backdoor), ``visualizer.py`` (the
optimisation) with the settings of ``gtsrb_visualize_example.py`` (the paper's GTSRB run) and
``mad_outlier_detection.py`` (the MAD rule):

* mask and pattern live in tanh space, ``m = tanh(w) / (2 - eps) + 0.5`` (``eps = 1e-7``, Keras'
  ``K.epsilon()``), initialised uniformly at random in [0, 1] (from ``ctx.generator``);
* Adam, ``lr=0.1``, ``betas=(0.5, 0.9)``, Keras' update (``eps=1e-7``); ``batch_size=32``;
* one *step* is ``batches_per_step = NB_SAMPLE // BATCH_SIZE = 1000 // 32 = 31`` mini-batches,
  with attack success and mask norm averaged over the step; ``steps=1000``;
* the cost starts at 0 (``RESET_COST_TO_ZERO``) and is set to ``init_cost=1e-3`` once the
  reversed attack succeeds on ``>= attack_succ_threshold=0.99`` of the images for ``patience=5``
  steps; then it is multiplied by ``cost_multiplier=2`` after 5 successful steps and divided by
  ``2 ** 1.5`` after 5 failing ones. (The ``Visualizer`` class default ``COST_MULTIPLIER = 1.5,``
  is a tuple and cannot run; the GTSRB script passes 2, which is kept here.)
* the mask kept is the smallest-norm one among steps with attack success >= 0.99 (``SAVE_LAST =
  False``); early stopping once the cost has gone both up and down and the best norm has not
  improved (``early_stop_threshold=1.0``) for ``early_stop_patience = 5 * patience = 25`` steps.

Two modes compute the same thing:

* ``mode="per-label"``: the reference, one label after the other, as the authors' loop does.
* ``mode="batched"`` (default): all ``K`` labels in one optimisation. Masks are one ``(K, 1, H, W)``
  tensor and patterns ``(K, C, H, W)``; each mini-batch of ``B`` clean images is pushed through
  every active label's mask (``K * B`` images, in chunks of at most ``forward_batch``); Adam
  moments, step counts, cost schedules, best masks and early stopping are per label, and a label
  that has stopped drops out of the batch. Each label sees the same mini-batch sequence in both
  modes (drawn from one seed), so the two differ only by floating-point summation order.

On a GPU the batched mode is many times faster; on a small CPU the forward/backward passes are
already compute-bound at ``B = 32``, so batching saves little (see ``benchmarks/bench_neural_cleanse.py``).
The paper's budget (1000 steps x 31 batches per label) is far beyond a CPU study; ``steps`` and
``batches_per_step`` set a smaller one (the early stopping rule is unchanged).

Gradients: NC needs input gradients, so the optimisation runs on ``pick(ctx.clf, GRAD)``: the
artifact itself, or for int8 artifacts without gradients their fake-quant ``surrogate``. Model
parameters are frozen (``requires_grad`` restored afterwards); only mask and pattern get
gradients. Each reversed trigger's attack success is then measured on the deployed artifact
itself (``ctx.clf.predict``, black-box) and on the gradient model, on the clean holdout images
whose label is not the target.

Output (:class:`~backdoorlab.defenses.base.ScanResult`): ``flagged`` (sorted by mask norm),
``score`` = the largest anomaly index among labels below the median norm (0 if none),
``per_label`` = anomaly index of every label, ``images`` = ``mask (K, 1, H, W)``, ``pattern
(K, C, H, W)``, ``trigger = mask * pattern (K, C, H, W)``, float in [0, 1] on CPU; ``metrics``:
``mask_l1``, ``reversed_asr_artifact``, ``reversed_asr_grad`` (per label), ``reversed_asr_agreement``
(share of triggered images on which artifact and gradient model predict the same label),
``reached_asr_threshold``, ``steps_used`` (per label), ``steps_max``, ``mad_median``, ``mad``,
``mode``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...classifier import Capability, Classifier, TorchClassifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick

MODES = ("batched", "per-label")
CONSISTENCY = 1.4826  # MAD -> standard deviation for normal data (mad_outlier_detection.py)
EPSILON = 1e-7  # Keras K.epsilon(): tanh squashing and Adam's epsilon
BETAS = (0.5, 0.9)  # Adam(lr=self.lr, beta_1=0.5, beta_2=0.9) in visualizer.py
EVAL_BATCH = 1024  # images per predict() call when measuring reversed triggers


# ------------------------------------------------------------------------------------ MAD rule
@dataclass
class MadResult:
    """The MAD outlier rule over ``K`` mask norms: ``index`` ``(K,)`` anomaly indices
    ``|l - median| / (1.4826 * median(|l - median|))``; ``flagged`` labels with norm below the median
    and index > threshold, smallest norm first; ``score`` the largest index below the median."""

    index: list[float]
    flagged: list[int]
    score: float
    median: float
    mad: float


def mad_anomaly(norms: Sequence[float] | torch.Tensor, threshold: float = 2.0) -> MadResult:
    """Apply Neural Cleanse's MAD rule to ``norms`` ``(K,)`` (the masks' L1 norms).

    ``median`` is numpy's (the mean of the two middle values for even ``K``). A zero MAD (more
    than half the norms equal) is clamped to 1e-12, so labels off the median get a huge index.
    """
    n = torch.as_tensor(norms, dtype=torch.float64).flatten()
    check(n.numel() >= 1 and bool(torch.isfinite(n).all()), "neural-cleanse: mask norms must be finite")
    med = torch.quantile(n, 0.5)
    dev = (n - med).abs()
    mad = CONSISTENCY * torch.quantile(dev, 0.5)
    index = dev / mad.clamp_min(1e-12)
    below = n < med
    flagged = [int(k) for k in torch.argsort(n) if below[k] and index[k] > threshold]
    score = float(index[below].max()) if bool(below.any()) else 0.0
    return MadResult(index.tolist(), flagged, score, float(med), float(mad))


# ------------------------------------------------------------------------- reverse engineering
@dataclass(frozen=True)
class _Hyper:
    steps: int
    batches_per_step: int
    batch_size: int
    lr: float
    init_cost: float
    cost_multiplier: float
    patience: int
    attack_succ_threshold: float
    early_stop: bool
    early_stop_threshold: float
    early_stop_patience: int
    forward_batch: int


@dataclass
class _Reversed:
    """Per label: best ``mask`` ``(K, 1, H, W)``, ``pattern`` ``(K, C, H, W)`` in [0, 1],
    whether the attack threshold was ever reached, and the steps run."""

    mask: torch.Tensor
    pattern: torch.Tensor
    reached: list[bool]
    steps_used: list[int]


def _to_tanh(v: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> tanh space (``arctanh((v - 0.5) * (2 - eps))``, in float64 as numpy does)."""
    return torch.atanh((v.double().clamp(0, 1) - 0.5) * (2 - EPSILON)).float()


def _from_tanh(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / (2 - EPSILON) + 0.5


class _Batches:
    """Mini-batch indices over ``n`` images, reshuffled every pass (Keras ``flow(shuffle=True)``:
    the last batch of a pass holds the remainder)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs = n, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.g)
        self.pos = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos >= self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return idx


def _reverse(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, targets: Sequence[int],
             mask0: torch.Tensor, pattern0: torch.Tensor, data_seed: int, hp: _Hyper) -> _Reversed:
    """Reverse-engineer triggers for ``targets`` (``K`` labels) at once.

    ``x``: ``(N, C, H, W)`` clean images in [0, 1] on the model's device; ``mask0`` ``(K, 1, H, W)``
    and ``pattern0`` ``(K, C, H, W)``: initial values in [0, 1]. With ``K = 1`` this is the
    authors' ``Visualizer.visualize`` for one label.
    """
    dev = x.device
    k_all = len(targets)
    w_m, w_p = _to_tanh(mask0).to(dev), _to_tanh(pattern0).to(dev)
    adam = {"m": [torch.zeros_like(w_m), torch.zeros_like(w_p)], "v": [torch.zeros_like(w_m), torch.zeros_like(w_p)]}
    t_adam = torch.zeros(k_all, device=dev)
    tgt = torch.as_tensor(list(targets), dtype=torch.long, device=dev)
    best_m, best_p = _from_tanh(w_m).detach().clone(), _from_tanh(w_p).detach().clone()
    inf = float("inf")
    cost = [0.0] * k_all  # RESET_COST_TO_ZERO
    set_cnt, up_cnt, down_cnt = [0] * k_all, [0] * k_all, [0] * k_all
    up_flag, down_flag = [False] * k_all, [False] * k_all
    reg_best, es_best, es_cnt = [inf] * k_all, [inf] * k_all, [0] * k_all
    done, steps_used = [False] * k_all, [0] * k_all
    mult_up, mult_down = hp.cost_multiplier, hp.cost_multiplier ** 1.5
    b1, b2 = BETAS
    batches = _Batches(len(x), hp.batch_size, data_seed)

    for step in range(hp.steps):
        act = [k for k in range(k_all) if not done[k]]
        if not act:
            break
        ia = torch.as_tensor(act, dtype=torch.long, device=dev)
        n_act = len(act)
        cost_t = torch.tensor([cost[k] for k in act], device=dev)
        hits = torch.zeros(n_act, device=dev)
        reg_sum = torch.zeros(n_act, device=dev)
        seen = 0
        for _ in range(hp.batches_per_step):
            xb = x[next(batches).to(dev)]  # (B, C, H, W)
            b = xb.shape[0]
            sub_m = w_m[ia].requires_grad_(True)  # (A, 1, H, W) leaf copies of the active rows
            sub_p = w_p[ia].requires_grad_(True)
            per = max(1, hp.forward_batch // b)  # labels per forward pass
            for c0 in range(0, n_act, per):
                sl = slice(c0, c0 + per)
                mask, pat = _from_tanh(sub_m[sl]), _from_tanh(sub_p[sl])
                xa = (1 - mask[:, None]) * xb[None] + (mask * pat)[:, None]  # (a, B, C, H, W)
                a = xa.shape[0]
                out = logits(xa.reshape(a * b, *xb.shape[1:]))
                y = tgt[ia[sl]].repeat_interleave(b)
                ce = F.cross_entropy(out, y, reduction="none").view(a, b).mean(1)
                reg = mask.abs().sum(dim=(1, 2, 3))
                (ce + cost_t[sl] * reg).sum().backward()
                with torch.no_grad():
                    hits[sl] += (out.argmax(1) == y).view(a, b).float().sum(1)
                    reg_sum[sl] += reg.detach()
            seen += b
            with torch.no_grad():  # Keras 2 Adam, per label (own step count), active rows only
                t_adam[ia] += 1
                t = t_adam[ia].view(-1, 1, 1, 1)
                lr_t = hp.lr * torch.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                for i, (w, g) in enumerate(((w_m, sub_m.grad), (w_p, sub_p.grad))):
                    m = b1 * adam["m"][i][ia] + (1 - b1) * g
                    v = b2 * adam["v"][i][ia] + (1 - b2) * g * g
                    adam["m"][i][ia], adam["v"][i][ia] = m, v
                    w[ia] = w[ia] - lr_t * m / (v.sqrt() + EPSILON)
        acc = (hits / seen).tolist()
        reg = (reg_sum / hp.batches_per_step).tolist()
        with torch.no_grad():
            now_m, now_p = _from_tanh(w_m[ia]), _from_tanh(w_p[ia])
        for j, k in enumerate(act):
            steps_used[k] = step + 1
            ok = acc[j] >= hp.attack_succ_threshold
            if ok and reg[j] < reg_best[k]:  # keep the smallest successful mask (SAVE_LAST = False)
                best_m[k], best_p[k], reg_best[k] = now_m[j], now_p[j], reg[j]
            if hp.early_stop:
                if reg_best[k] < inf:
                    es_cnt[k] = es_cnt[k] + 1 if reg_best[k] >= hp.early_stop_threshold * es_best[k] else 0
                es_best[k] = min(reg_best[k], es_best[k])
                if down_flag[k] and up_flag[k] and es_cnt[k] >= hp.early_stop_patience:
                    done[k] = True
                    continue
            if cost[k] == 0 and ok:
                set_cnt[k] += 1
                if set_cnt[k] >= hp.patience:
                    cost[k] = hp.init_cost
                    up_cnt[k] = down_cnt[k] = 0
                    up_flag[k] = down_flag[k] = False
            else:
                set_cnt[k] = 0
            if ok:
                up_cnt[k], down_cnt[k] = up_cnt[k] + 1, 0
            else:
                up_cnt[k], down_cnt[k] = 0, down_cnt[k] + 1
            if up_cnt[k] >= hp.patience:
                up_cnt[k] = 0
                cost[k] *= mult_up
                up_flag[k] = True
            elif down_cnt[k] >= hp.patience:
                down_cnt[k] = 0
                cost[k] /= mult_down
                down_flag[k] = True

    reached = [r < inf for r in reg_best]
    with torch.no_grad():  # labels that never reached the threshold keep their last mask
        for k in range(k_all):
            if not reached[k]:
                best_m[k], best_p[k] = _from_tanh(w_m[k]), _from_tanh(w_p[k])
    return _Reversed(best_m.detach(), best_p.detach(), reached, steps_used)


@contextmanager
def _gradient_model(clf: Classifier, device: torch.device) -> Iterator[Classifier]:
    """``clf`` ready for input gradients on ``device`` with its parameters frozen.

    A :class:`TorchClassifier` on another device is deep-copied there; otherwise the parameters'
    ``requires_grad`` flags are switched off and restored on exit (training mode is untouched).
    """
    if isinstance(clf, TorchClassifier) and clf.device != device:
        module = copy.deepcopy(clf.module).requires_grad_(False)
        yield TorchClassifier(module, clf.precision, device=device, dtype=clf.dtype,
                              capabilities=clf.capabilities, channels_last=clf.channels_last)
        return
    params = list(clf.module.parameters()) if isinstance(clf, TorchClassifier) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield clf
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


@torch.no_grad()
def _reversed_predictions(clf: Classifier, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                          pattern: torch.Tensor) -> list[torch.Tensor]:
    """For each label ``k``: ``clf``'s top-1 labels on the holdout images with ``y != k`` stamped
    with trigger ``k`` (``(n_k,)`` long on CPU)."""
    out = []
    for k in range(mask.shape[0]):
        xs = x[y != k]
        xa = (1 - mask[k]) * xs + mask[k] * pattern[k]
        out.append(clf.predict(xa, EVAL_BATCH).cpu())
    return out


# ------------------------------------------------------------------------------------ scanner
def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@DEFENSES.register("neural-cleanse")
class NeuralCleanse(Scanner):
    """Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineered triggers per label, MAD
    outlier test on their mask norms. See the module docstring for the algorithm and defaults.

    ``mode``: ``"batched"`` (all labels in one optimisation) or ``"per-label"`` (the reference);
    ``steps``: step budget per label (paper: 1000); ``batches_per_step``: mini-batches per step
    (paper: 1000 // 32 = 31); ``forward_batch``: most images per forward pass in batched mode
    (``None``: 256 on CPU, where small chunks are faster, 16384 on CUDA); ``anomaly_threshold``:
    the MAD rule's cut (paper: 2).
    """

    name = "neural-cleanse"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, mode: str = "batched", steps: int = 1000, batches_per_step: int = 31, batch_size: int = 32,
                 lr: float = 0.1, init_cost: float = 1e-3, cost_multiplier: float = 2.0, patience: int = 5,
                 attack_succ_threshold: float = 0.99, early_stop: bool = True, early_stop_threshold: float = 1.0,
                 early_stop_patience: int = 25, anomaly_threshold: float = 2.0, forward_batch: int | None = None):
        who = "neural-cleanse"
        check(mode in MODES, f"{who}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        for key, val in (("steps", steps), ("batches_per_step", batches_per_step), ("batch_size", batch_size),
                         ("patience", patience), ("early_stop_patience", early_stop_patience)):
            check(_is_int(val, 1), f"{who}: {key} must be an integer >= 1, got {val!r}")
        check(forward_batch is None or _is_int(forward_batch, 1),
              f"{who}: forward_batch must be None or an integer >= 1, got {forward_batch!r}")
        for key, val in (("lr", lr), ("init_cost", init_cost), ("early_stop_threshold", early_stop_threshold),
                         ("anomaly_threshold", anomaly_threshold)):
            check(_is_num(val) and val > 0, f"{who}: {key} must be a number > 0, got {val!r}")
        check(_is_num(cost_multiplier) and cost_multiplier > 1,
              f"{who}: cost_multiplier must be a number > 1, got {cost_multiplier!r}")
        check(_is_num(attack_succ_threshold) and 0 < attack_succ_threshold <= 1,
              f"{who}: attack_succ_threshold must be in (0, 1], got {attack_succ_threshold!r}")
        check(isinstance(early_stop, bool), f"{who}: early_stop must be true or false, got {early_stop!r}")
        self.mode = mode
        self.anomaly_threshold = float(anomaly_threshold)
        self.forward_batch = forward_batch
        self.hp = _Hyper(steps, batches_per_step, batch_size, float(lr), float(init_cost), float(cost_multiplier),
                         patience, float(attack_succ_threshold), early_stop, float(early_stop_threshold),
                         early_stop_patience, forward_batch or 0)

    def reverse(self, clf: Classifier, x: torch.Tensor, num_classes: int, generator: torch.Generator,
                device: torch.device | None = None) -> _Reversed:
        """Reverse-engineer one trigger per label on ``clf`` (which must have GRAD).

        ``x``: ``(N, C, H, W)`` clean images in [0, 1]. Initial masks ``(K, 1, H, W)``, patterns
        ``(K, C, H, W)`` (uniform in [0, 1]) and the mini-batch order's seed come from ``generator``,
        drawn identically in both modes.
        """
        clf.require(Capability.GRAD, who=self.name)
        device = device if device is not None else clf.device
        c, h, w = x.shape[1:]
        mask0 = torch.rand(num_classes, 1, h, w, generator=generator, dtype=torch.float64)
        pattern0 = torch.rand(num_classes, c, h, w, generator=generator, dtype=torch.float64)
        data_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with _gradient_model(clf, device) as model:
            dev = model.device
            fb = self.forward_batch or (256 if dev.type == "cpu" else 16384)
            hp = _Hyper(**{**self.hp.__dict__, "forward_batch": fb})
            xd = x.to(dev)
            if self.mode == "batched":
                return _reverse(model.logits, xd, range(num_classes), mask0, pattern0, data_seed, hp)
            parts = [_reverse(model.logits, xd, [k], mask0[k:k + 1], pattern0[k:k + 1], data_seed, hp)
                     for k in range(num_classes)]
        return _Reversed(torch.cat([p.mask for p in parts]), torch.cat([p.pattern for p in parts]),
                         [r for p in parts for r in p.reached], [s for p in parts for s in p.steps_used])

    def scan(self, ctx: DefenseContext) -> ScanResult:
        check(len(ctx.clean) > 0, "neural-cleanse needs clean holdout images")
        grad_clf, _ = pick(ctx.clf, Capability.GRAD, who=self.name)
        x, y = ctx.clean.float(), ctx.clean.y
        rev = self.reverse(grad_clf, x, ctx.num_classes, ctx.generator, ctx.device)
        mask, pattern = rev.mask.float().cpu(), rev.pattern.float().cpu()
        norms = mask.abs().sum(dim=(1, 2, 3))
        mad = mad_anomaly(norms, self.anomaly_threshold)
        on_art = _reversed_predictions(ctx.clf, x, y, mask, pattern)
        on_grad = on_art if grad_clf is ctx.clf else _reversed_predictions(grad_clf, x, y, mask, pattern)
        asr = [[float((p == k).float().mean()) if len(p) else float("nan") for k, p in enumerate(preds)]
               for preds in (on_art, on_grad)]
        agree = torch.cat([a == g for a, g in zip(on_art, on_grad)]).float()
        metrics = {"mask_l1": norms.tolist(), "reversed_asr_artifact": asr[0], "reversed_asr_grad": asr[1],
                   "reversed_asr_agreement": float(agree.mean()) if len(agree) else float("nan"),
                   "reached_asr_threshold": rev.reached, "steps_used": rev.steps_used, "steps_max": self.hp.steps,
                   "mad_median": mad.median, "mad": mad.mad, "mode": self.mode}
        mask, pattern = mask.clamp(0, 1), pattern.clamp(0, 1)  # float32 rounding of tanh(w) / (2 - 1e-7) + 0.5
        images = {"mask": mask, "pattern": pattern, "trigger": mask * pattern}
        return ScanResult(flagged=mad.flagged, score=mad.score, per_label=mad.index, images=images,
                          metrics=metrics)


__all__ = ["MODES", "MadResult", "NeuralCleanse", "mad_anomaly"]
