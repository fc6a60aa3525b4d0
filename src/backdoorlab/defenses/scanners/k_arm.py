"""K-Arm (Shen, Liu, Tao, An, Xu, Cheng, Ma, Zhang, "Backdoor Scanning for Deep Neural Networks
through K-Arm Optimization", ICML 2021).

Neural Cleanse reverse-engineers a trigger for every label, one after the other, with the same
budget for each. K-Arm treats every *candidate* as an arm of a multi-armed bandit: each arm has its
own trigger (mask ``m`` ``(1, H, W)`` and pattern ``p``, both in [0, 1], applied as
``x' = (1 - m) * x + m * p``, Neural Cleanse's parametrisation, imported from
:mod:`.neural_cleanse`), and an epsilon-greedy scheduler decides which arm gets the next
optimisation round, so rounds go to the arms whose trigger shrinks fastest and the others are
left early. Four stages, as the authors' code (github.com/PurduePAML/K-ARM_Backdoor_Optimization,
commit 8c837fd; file:line below refer to it):

1. **Arm pre-screening** (``Arm_Pre_Screening.py``), on the deployed artifact's softmax over the
   defender's clean images (black-box). ``k = 2`` if ``K <= 8`` classes, else
   ``round(K * gamma)`` (lines 44-47, Python's ``round``). *Label-agnostic*: a label in the top-k
   of more than ``global_theta`` of all images is a candidate target (line 103). Only if there is
   none, *label-specific*: for each class ``v`` (by top-1 prediction) and label ``t != v``, ``t``
   is in the top-k of at least ``local_theta`` of the images predicted ``v`` (line 135); such a
   pair needs the sum and the median of ``t``'s softmax over those images above 1e-8 (lines
   72-73), and a target keeps at most its 3 victims with the largest sum (line 83). Every
   (target, victim) pair is an arm. No candidate: the model is benign, nothing is optimised.
2. **K-Arm optimisation** (``K_Arm_Scanner.py``). One *round* of an arm is one pass over its
   images in order (``shuffle=False``, ``K_ARM_Opt.py`` 34/40; label-agnostic: all clean images;
   label-specific: the victim class's images, by their true label) in mini-batches, minimising
   ``CE(f(x'), t) + cost * |m|_1`` with ``torch.optim.Adam(lr, betas=(0.5, 0.9))`` per arm (line
   139) on the tanh-space mask and pattern (``m = tanh(w) / (2 - 1e-7) + 0.5``). Initial trigger,
   shared by all arms (``K_ARM_Opt.py`` 47-72): label-agnostic, mask and pattern uniform in
   [0, 1]; label-specific, one colour per channel (``single_color_opt``, a ``(C, 1, 1)`` pattern)
   and a mask of ``0.001 * U[0, 1]`` with a centred square of 0.99 (``central_init``; 50x50 in
   224x224, here the same share of the side). Per arm, after each round (epoch means of attack
   success and mask L1):

   * the mask is kept when success ``>= attack_succ_threshold`` and the L1 is below the arm's best
     (an *improvement*); the arm's descent rate is then ``(L1_0 - L1) / (improvements + rounds /
     2)`` (lines 228-231, where ``L1_0 = 2500``, the L1 of their 50x50 initial square; here the L1
     of the arm's initial mask, see the deviations);
   * cost schedule (lines 262-290): the cost starts at 0 (``reset_cost_to_zero``) and is set to
     ``init_cost`` after 2 successful rounds (line 264, fixed); then multiplied by
     ``cost_multiplier`` after ``patience`` successful rounds and divided by it (the same factor,
     unlike Neural Cleanse's ``** 1.5``) after ``patience`` failing ones;
   * hopeless arms stop (lines 207, 212): forward, after more than 20 rounds with best success
     < 0.3, more than 200 with < 0.8, or more than 10 with 0; in the symmetric check, more than
     200 rounds with best success < 1;
   * once early stopping is on (``early_stop``, or from the first bandit decision, line 316): an
     arm stops after more than ``rounds`` improvements, or (label-agnostic) when its cost has gone
     both up and down and its best L1 has not improved for more than ``early_stop_patience``
     rounds (``early_stop_threshold``, line 248); if that arm holds the smallest trigger, the whole
     search stops (line 251);
   * scheduling (lines 301-338): warm-up, each arm in turn until it has ``warmup_rounds``
     improvements; then, after every improving round, with probability ``epsilon_for_bandits`` a
     random live arm, else the live arm maximising ``descent rate + beta / L1`` (line 317); an arm
     stays selected while its rounds do not improve it; a stopped arm hands over to the first live
     arm not yet successful, else to a random live arm.

   The search ends after ``steps`` rounds in all. The result is the arm with the smallest trigger
   size: the epoch-mean L1 of the round its best mask was kept in (``K_ARM_Opt.py`` 84).
3. **Symmetric check** (``main.py`` 86-95), label-specific only: one arm victim <- target (the
   target class's images, sent to the victim label), fresh initial trigger, as many rounds as the
   best arm ran; the ratio is its trigger size over the forward one (never successful: infinite;
   no clean image of the target class: no check, not flagged).
4. **Decision** (``utils.py`` ``trojan_det``): label-agnostic, trojan if size < ``global_det_bound``;
   label-specific, trojan if size < ``local_det_bound`` and ratio > ``ratio_det_bound``.

Defaults (``main.py`` argument parser, lines 30-56): ``batch_size=32``, ``lr=0.1``, ``steps=1000``,
``rounds=60``, ``warmup_rounds=2``, ``init_cost=1e-3``, ``patience=5``, ``cost_multiplier=1.5``,
``attack_succ_threshold=0.99``, ``early_stop=False``, ``early_stop_threshold=1``,
``early_stop_patience=10``, ``epsilon_for_bandits=0.3``, ``reset_cost_to_zero=True``,
``single_color_opt=True``, ``gamma=0.25``, ``beta=1e4``, ``global_theta=0.95``, ``local_theta=0.9``,
``central_init=True``, ``sym_check=True``, ``global_det_bound=1720``, ``local_det_bound=1000``,
``ratio_det_bound=10``. The random seed is ``ctx.generator`` (the authors fix 333).

Deviations:

* **Image size.** The authors' sizes are pixels of 224x224 TrojAI images. ``global_det_bound``
  and ``local_det_bound`` are given in those units and scaled at scan time by
  ``s = H * W / 224**2`` (32x32: ``s = 0.0204``, bounds 35.1 and 20.4 pixels); ``beta`` is scaled
  by ``s**2`` (4.17 at 32x32), which keeps the balance of the two terms of the scheduler's
  objective (the rate scales with ``s``, ``beta / L1`` with ``beta / s``). The initial square keeps
  its share of the side (8x8 at 32x32). ``init_cost`` is per pixel and kept.
* **Descent rate's reference point.** The authors' fixed 2500 is the L1 of their label-specific
  initial mask; here it is the L1 of the arms' initial mask (63.8 for the 8x8 square at 32x32;
  about half the image for a label-agnostic arm's uniform mask). With the fixed value (scaled:
  51) every label-agnostic arm, whose mask starts at ~512 pixels, has a negative rate until it
  falls below 51, and the scheduler keeps whichever arm it has run most (measured on the tests'
  GTSRB model: a non-target arm took 33 of 60 rounds).
* **Several label-agnostic candidates.** The authors keep only the most frequent label above
  ``global_theta``; here every such label is an arm (most frequent first), so the bandit chooses
  among them. With one candidate this is their search.
* **Hopeless arms** are stopped by the forward rule whatever the trigger type (the authors apply it
  to label-specific arms only; their single label-agnostic arm cannot stall a warm-up).
* **Scheduling details.** The greedy choice is among live arms (the authors' argmax also sees
  stopped arms, which wastes a round); the warm-up hands over to the first live arm with fewer
  than ``warmup_rounds`` improvements (theirs: the first arm never successful, which may be a
  stopped one). Label-specific arms without any image of their victim class are dropped.
* **Symmetric check** runs only when the forward trigger is below ``local_det_bound`` (otherwise it
  cannot change the verdict).
* **CPU budget.** The paper's 1000 rounds are minutes of CPU for a label-agnostic arm over a
  300-image holdout; ``steps`` sets a smaller budget (the schedule is otherwise unchanged).
  ``benchmarks/bench_k_arm.py`` times K-Arm against Neural Cleanse's label-by-label search.

Measured on the tests' GTSRB subset (43 classes, 300 holdout images, small-cnn; ``tests/defenses/
test_k_arm.py``): with ``global_theta=0.95`` pre-screening finds no label-agnostic candidate in
the BadNets model (target 0 is in the top-11 of 67% of the images) and turns ~125 target-victim
pairs into arms, whose victims have 0-23 holdout images; the 1000 rounds then go to their warm-up
and the model is not flagged, and at 3000 rounds a natural 2-pixel trigger on a two-image class
is flagged instead (pair 13 <- 6). With ``global_theta=0.6`` (the other labels of both models
stay at or below 48%) label 0 is the one arm and is flagged after 40 rounds (trigger ~12 pixels,
bound 35.1). The scheduler's descent rate is a mean over an arm's own rounds, so it drops as an
arm is chosen; on label-agnostic arms, which all start at half the image and shrink at similar
speeds, the choice stays close to round-robin (4 arms, 80 rounds: 22 for the target, 19-20 for
the others). The saving over Neural Cleanse comes mostly from pre-screening and from stopping the
whole search once the smallest trigger has converged.

Gradients: the optimisation runs on ``pick(ctx.clf, GRAD)`` (the artifact, or an int8 artifact's
fake-quant ``surrogate``) with its parameters frozen; pre-screening and the best trigger's attack
success (``reversed_asr_artifact``) use the deployed artifact itself (black-box).

Output (:class:`~backdoorlab.defenses.base.ScanResult`): ``flagged`` = ``[target]`` when the
decision says trojan, else ``[]``; ``score`` = the decision as a continuous number, ``> 1`` exactly
when it says trojan: label-agnostic ``bound / size``, label-specific ``min(bound / size, ratio /
ratio_det_bound)`` (``bound / size`` alone where the symmetric check was not needed; capped at 1
with ``sym_check=False``, with which the authors never flag a label-specific trigger); 0 without a
candidate or a successful arm. ``per_label`` (``K`` values) = the best ``bound / size`` among the
arms aiming at the label, 0 for labels no arm aims at. ``images``: ``mask (A, 1, H, W)``,
``pattern (A, C, H, W)``, ``trigger = mask * pattern`` for the ``A`` forward arms in arm order
(best mask, or the last one where the arm never succeeded), float in [0, 1] on CPU. ``metrics``:
``verdict``, ``target`` (the flagged label or ``None``), ``victims`` (label-specific: the best
arm's victim, then the target's other victims whose trigger is below the bound; else ``[]``),
``trigger_type`` (``label-agnostic``, ``label-specific`` or ``None``), ``mask_l1`` (the best
arm's trigger size, ``None`` if no arm succeeded), ``arms`` (per arm: ``target``, ``victim``,
``mask_l1``, ``rounds``, ``improvements``, ``reached``, ``best_asr``), ``best_arm``,
``rounds_used``, ``rounds_max``, ``symmetric`` (``None``, or ``target``, ``victim``, ``mask_l1``,
``ratio``, ``rounds``), ``reversed_asr_artifact`` and ``reversed_asr_grad`` (the best trigger's
success on the deployed artifact and on the gradient model, over the clean images it should flip:
label-agnostic all images not of the target class, label-specific the victim's), ``topk``,
``bounds`` (the scaled ``global``, ``local`` and ``ratio`` bounds), ``size_scale`` and
``seconds``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...classifier import Capability, Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick
from ..removers.ft import check_int, check_number
from .neural_cleanse import EVAL_BATCH, _from_tanh, _gradient_model, _to_tanh

AGNOSTIC, SPECIFIC = "label-agnostic", "label-specific"
REF_SIDE = 224  # the authors' input_width / input_height: their sizes are pixels of 224x224 images
CENTRE_HALF = 25  # K_ARM_Opt.py:69, mask[:, 112-25:112+25, 112-25:112+25] = 0.99
CENTRE_VALUE, CENTRE_NOISE = 0.99, 0.001  # K_ARM_Opt.py:68-69
COST_SET_ROUNDS = 2  # K_Arm_Scanner.py:264, successful rounds before the cost is first set
SMALL_K, SMALL_TOPK = 8, 2  # Arm_Pre_Screening.py:44-45, k = 2 for at most 8 classes
MIN_PROB = 1e-8  # Arm_Pre_Screening.py:72-73
MAX_VICTIMS = 3  # Arm_Pre_Screening.py:83
# K_Arm_Scanner.py:207 and 212: (more than this many rounds, best success below this) stops an arm
GIVE_UP_FORWARD = ((20, 0.3), (200, 0.8))
GIVE_UP_NEVER = 10  # ... and more than 10 rounds without any success
GIVE_UP_BACKWARD = ((200, 1.0),)


# ------------------------------------------------------------------------------ pre-screening
@dataclass
class Candidates:
    """Pre-screening's outcome: ``trigger_type`` (``None``: no candidate, benign), ``arms`` as
    ``(target, victim)`` pairs (``victim`` ``None`` for label-agnostic arms), ``topk`` and, per
    label, the share of images with the label in their top-k."""

    trigger_type: str | None
    arms: list[tuple[int, int | None]]
    topk: int
    frequency: list[float]


def pre_screen(probs: torch.Tensor, gamma: float = 0.25, global_theta: float = 0.95,
               local_theta: float = 0.9) -> Candidates:
    """K-Arm's arm pre-screening on ``probs`` ``(N, K)``, the softmax of clean images.

    Label-agnostic candidates (every label above ``global_theta``, most frequent first) are
    returned if there are any; otherwise the label-specific pairs, by target then victim order
    (victims by index, or by their softmax sum where more than 3 were cut to 3).
    """
    n, k_cls = probs.shape
    check(n > 0, "k-arm: pre-screening needs clean images")
    k = SMALL_TOPK if k_cls <= SMALL_K else round(k_cls * gamma)
    k = min(max(k, 1), k_cls)
    top_p, top_i = probs.float().topk(k, dim=1)
    counts = torch.bincount(top_i.flatten(), minlength=k_cls).double()
    freq = (counts / n).tolist()
    agnostic = [t for t in torch.argsort(-counts, stable=True).tolist() if counts[t] > global_theta * n]
    if agnostic:
        return Candidates(AGNOSTIC, [(t, None) for t in agnostic], k, freq)
    pred = top_i[:, 0]
    sums = torch.zeros(k_cls, k_cls, dtype=torch.float64)  # [target, victim]
    medians = torch.zeros(k_cls, k_cls, dtype=torch.float64)
    for v in range(k_cls):
        rows = pred == v
        n_v = int(rows.sum())
        if n_v == 0:
            continue
        ti, tp = top_i[rows], top_p[rows]
        for t in range(k_cls):
            hit = ti == t
            if t != v and int(hit.sum()) / n_v >= local_theta:
                sums[t, v] = float(tp[hit].sum())
                medians[t, v] = float(tp[hit].median())
    arms: list[tuple[int, int | None]] = []
    for t in range(k_cls):
        victims = [v for v in range(k_cls) if sums[t, v] > MIN_PROB and medians[t, v] > MIN_PROB]
        if len(victims) > MAX_VICTIMS:
            victims = sorted(victims, key=lambda v: -float(sums[t, v]))[:MAX_VICTIMS]
        arms += [(t, v) for v in victims]
    return Candidates(SPECIFIC if arms else None, arms, k, freq)


# ------------------------------------------------------------------------------ optimisation
@dataclass(frozen=True)
class _Hyper:
    batch_size: int
    lr: float
    rounds: int
    warmup_rounds: int
    init_cost: float
    patience: int
    cost_multiplier: float
    attack_succ_threshold: float
    early_stop: bool
    early_stop_threshold: float
    early_stop_patience: int
    epsilon_for_bandits: float
    reset_cost_to_zero: bool
    beta: float  # already scaled to the image size
    first_best_reg: float  # the initial mask's L1, the descent rate's reference point


@dataclass
class Arm:
    """One arm's state: its candidate, images ``x`` ``(n, C, H, W)``, tanh-space trigger and
    optimiser, cost schedule, and the best trigger so far (``best_reg`` = its size)."""

    target: int
    victim: int | None
    x: torch.Tensor
    w_mask: torch.Tensor
    w_pattern: torch.Tensor
    opt: torch.optim.Optimizer
    cost: float
    rounds: int = 0
    improvements: int = 0
    best_reg: float = math.inf
    best_acc: float = 0.0
    last_reg: float = math.inf
    rate: float = -math.inf
    best_mask: torch.Tensor | None = None
    best_pattern: torch.Tensor | None = None
    stopped: bool = False
    set_cnt: int = 0
    up_cnt: int = 0
    down_cnt: int = 0
    up_flag: bool = False
    down_flag: bool = False
    es_cnt: int = 0
    es_best: float = math.inf
    log: list[tuple[float, float]] = field(default_factory=list)

    def trigger(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The best mask ``(1, H, W)`` and pattern ``(C, H, W)`` (the last ones if never successful)."""
        h, w = self.x.shape[-2:]
        if self.best_mask is None:
            with torch.no_grad():
                m, p = _from_tanh(self.w_mask), _from_tanh(self.w_pattern)
        else:
            m, p = self.best_mask, self.best_pattern
        return m.detach()[0].cpu(), p.detach()[0].expand(-1, h, w).cpu()


def _initial_trigger(kind: str, c: int, h: int, w: int, single_color: bool, central: bool,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial mask ``(1, 1, H, W)`` and pattern ``(1, C, H or 1, W or 1)`` (``K_ARM_Opt.py`` 47-72)."""
    one_colour = single_color and kind == SPECIFIC
    pattern = torch.rand(1, c, *((1, 1) if one_colour else (h, w)), generator=gen, dtype=torch.float64)
    if kind == SPECIFIC and central:
        mask = torch.rand(1, 1, h, w, generator=gen, dtype=torch.float64) * CENTRE_NOISE
        rh, rw = CENTRE_HALF * h / REF_SIDE, CENTRE_HALF * w / REF_SIDE
        mask[..., round(h / 2 - rh):round(h / 2 + rh), round(w / 2 - rw):round(w / 2 + rw)] = CENTRE_VALUE
    else:
        mask = torch.rand(1, 1, h, w, generator=gen, dtype=torch.float64)
    return mask, pattern


def _make_arms(pairs: Sequence[tuple[int, int | None]], images: Sequence[torch.Tensor], mask0: torch.Tensor,
               pattern0: torch.Tensor, hp: _Hyper, device: torch.device) -> list[Arm]:
    arms = []
    for (t, v), x in zip(pairs, images):
        w_m = _to_tanh(mask0).to(device).requires_grad_(True)
        w_p = _to_tanh(pattern0).to(device).requires_grad_(True)
        opt = torch.optim.Adam([w_p, w_m], lr=hp.lr, betas=(0.5, 0.9))
        arms.append(Arm(t, v, x, w_m, w_p, opt, 0.0 if hp.reset_cost_to_zero else hp.init_cost))
    return arms


def _round(logits: Callable[[torch.Tensor], torch.Tensor], arm: Arm, batch_size: int) -> tuple[float, float]:
    """One pass over the arm's images; the means of attack success and mask L1 over its batches."""
    accs, regs = [], []
    for i in range(0, len(arm.x), batch_size):
        xb = arm.x[i:i + batch_size]
        mask, pattern = _from_tanh(arm.w_mask), _from_tanh(arm.w_pattern)
        out = logits((1 - mask) * xb + mask * pattern)
        y = torch.full((len(xb),), arm.target, dtype=torch.long, device=out.device)
        reg = mask.abs().sum()
        arm.opt.zero_grad(set_to_none=True)
        (F.cross_entropy(out, y) + arm.cost * reg).backward()
        arm.opt.step()
        accs.append(float((out.detach().argmax(1) == y).float().mean()))
        regs.append(float(reg.detach()))
    return sum(accs) / len(accs), sum(regs) / len(regs)


def _gives_up(arm: Arm, direction: str) -> bool:
    if direction == "forward":
        return (any(arm.rounds > r and arm.best_acc < a for r, a in GIVE_UP_FORWARD)
                or (arm.rounds > GIVE_UP_NEVER and arm.best_acc == 0))
    return any(arm.rounds > r and arm.best_acc < a for r, a in GIVE_UP_BACKWARD)


def _cost_schedule(arm: Arm, ok: bool, hp: _Hyper) -> None:
    """``K_Arm_Scanner.py`` 262-290: set the cost after 2 successes, then up / down by the multiplier."""
    if arm.cost == 0 and ok:
        arm.set_cnt += 1
        if arm.set_cnt >= COST_SET_ROUNDS:
            arm.cost = hp.init_cost
            arm.up_cnt = arm.down_cnt = 0
            arm.up_flag = arm.down_flag = False
    else:
        arm.set_cnt = 0
    arm.up_cnt, arm.down_cnt = (arm.up_cnt + 1, 0) if ok else (0, arm.down_cnt + 1)
    if arm.up_cnt >= hp.patience:
        arm.up_cnt, arm.up_flag = 0, True
        arm.cost *= hp.cost_multiplier
    elif arm.down_cnt >= hp.patience:
        arm.down_cnt, arm.down_flag = 0, True
        arm.cost /= hp.cost_multiplier


def _smallest(arms: Sequence[Arm]) -> int:
    return min(range(len(arms)), key=lambda i: arms[i].best_reg)


def k_arm_search(logits: Callable[[torch.Tensor], torch.Tensor], arms: list[Arm], kind: str, steps: int,
                 hp: _Hyper, gen: torch.Generator, direction: str = "forward") -> int:
    """Run the K-Arm scheduler over ``arms`` (updated in place) for at most ``steps`` rounds in
    all; returns the rounds run. ``direction``: ``forward`` or ``backward`` (the symmetric check)."""
    early = hp.early_stop
    cur, used = 0, 0
    for _ in range(steps):
        arm = arms[cur]
        arm.rounds += 1
        used += 1
        acc, reg = _round(logits, arm, hp.batch_size)
        arm.log.append((acc, reg))
        arm.last_reg, arm.best_acc = reg, max(arm.best_acc, acc)
        if _gives_up(arm, direction):
            arm.stopped = True
        ok = acc >= hp.attack_succ_threshold
        improved = ok and reg < arm.best_reg
        if improved:
            with torch.no_grad():
                arm.best_mask = _from_tanh(arm.w_mask).detach().clone()
                arm.best_pattern = _from_tanh(arm.w_pattern).detach().clone()
            arm.improvements += 1
            arm.rate = (hp.first_best_reg - reg) / (arm.improvements + arm.rounds / 2)
            arm.best_reg = reg
        if early:
            if arm.best_reg < math.inf:
                arm.es_cnt = arm.es_cnt + 1 if arm.best_reg >= hp.early_stop_threshold * arm.es_best else 0
            arm.es_best = min(arm.es_best, arm.best_reg)
            converged = (arm.up_flag and arm.down_flag and arm.es_cnt > hp.early_stop_patience and kind == AGNOSTIC)
            if arm.improvements > hp.rounds or converged:
                if cur == _smallest(arms):
                    break  # the smallest trigger has converged: stop the whole search
                arm.stopped = True
                if all(a.stopped for a in arms):
                    break
        if not arm.stopped:
            _cost_schedule(arm, ok, hp)
        live = [i for i, a in enumerate(arms) if not a.stopped]
        if arm.stopped:
            fresh = [i for i in live if arms[i].improvements == 0]
            if fresh:
                cur = fresh[0]
            elif live:
                cur = live[int(torch.randint(len(live), (1,), generator=gen))]
            else:
                break
        elif improved and all(arms[i].improvements >= hp.warmup_rounds for i in live):
            early = True  # the bandit phase switches early stopping on (K_Arm_Scanner.py:316)
            explore = float(torch.rand(1, generator=gen)) < hp.epsilon_for_bandits
            if explore:
                if len(live) > 1:
                    cur = live[int(torch.randint(len(live), (1,), generator=gen))]
            else:
                cur = max(live, key=lambda i: arms[i].rate + hp.beta / arms[i].last_reg)
        elif improved and arm.improvements >= hp.warmup_rounds:  # warmed up: next arm's warm-up
            cur = next(i for i in live if arms[i].improvements < hp.warmup_rounds)
    return used


# ------------------------------------------------------------------------------------ scanner
def _check_bool(who: str, name: str, v: Any) -> None:
    check(isinstance(v, bool), f"{who}: {name} must be true or false, got {v!r}")


@torch.no_grad()
def _success(clf: Classifier, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, target: int) -> float:
    """Share of ``x`` that ``clf`` sends to ``target`` once stamped with the trigger."""
    if len(x) == 0:
        return float("nan")
    pred = clf.predict((1 - mask) * x + mask * pattern, EVAL_BATCH)
    return float((pred == target).float().mean())


@torch.no_grad()
def _softmax(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([clf.logits(x[i:i + EVAL_BATCH]).float().softmax(1).cpu() for i in range(0, len(x), EVAL_BATCH)])


@DEFENSES.register("k-arm")
class KArm(Scanner):
    """K-Arm (Shen et al., ICML 2021): arm pre-screening, bandit-scheduled trigger reverse
    engineering, symmetric check, size bounds. See the module docstring for the algorithm, the
    defaults (the authors' ``main.py``) and the deviations.

    ``steps``: rounds in all (one round = one pass over an arm's images); ``rounds``: improvements
    after which an arm stops; ``global_det_bound`` / ``local_det_bound``: trigger size bounds in
    pixels of a 224x224 image (scaled to the images scanned); ``beta`` in the same units (scaled by
    the square of the area ratio).
    """

    name = "k-arm"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, steps: int = 1000, rounds: int = 60, warmup_rounds: int = 2, batch_size: int = 32,
                 lr: float = 0.1, init_cost: float = 1e-3, patience: int = 5, cost_multiplier: float = 1.5,
                 attack_succ_threshold: float = 0.99, early_stop: bool = False, early_stop_threshold: float = 1.0,
                 early_stop_patience: int = 10, epsilon_for_bandits: float = 0.3, reset_cost_to_zero: bool = True,
                 single_color_opt: bool = True, gamma: float = 0.25, beta: float = 1e4, global_theta: float = 0.95,
                 local_theta: float = 0.9, central_init: bool = True, sym_check: bool = True,
                 global_det_bound: float = 1720, local_det_bound: float = 1000, ratio_det_bound: float = 10):
        who = "k-arm"
        for key, val in (("steps", steps), ("rounds", rounds), ("warmup_rounds", warmup_rounds),
                         ("batch_size", batch_size), ("patience", patience),
                         ("early_stop_patience", early_stop_patience)):
            check_int(who, key, val, 1)
        for key, val in (("lr", lr), ("init_cost", init_cost), ("early_stop_threshold", early_stop_threshold),
                         ("beta", beta), ("global_det_bound", global_det_bound),
                         ("local_det_bound", local_det_bound), ("ratio_det_bound", ratio_det_bound)):
            check_number(who, key, val, 0, lo_open=True)
        check_number(who, "cost_multiplier", cost_multiplier, 1, lo_open=True)
        for key, val in (("attack_succ_threshold", attack_succ_threshold), ("gamma", gamma),
                         ("global_theta", global_theta), ("local_theta", local_theta)):
            check_number(who, key, val, 0, 1, lo_open=True, hi_open=False)
        check_number(who, "epsilon_for_bandits", epsilon_for_bandits, 0, 1, hi_open=False)
        for key, val in (("early_stop", early_stop), ("reset_cost_to_zero", reset_cost_to_zero),
                         ("single_color_opt", single_color_opt), ("central_init", central_init),
                         ("sym_check", sym_check)):
            _check_bool(who, key, val)
        self.steps = steps
        self.gamma, self.global_theta, self.local_theta = float(gamma), float(global_theta), float(local_theta)
        self.single_color_opt, self.central_init, self.sym_check = single_color_opt, central_init, sym_check
        self.global_det_bound, self.local_det_bound = float(global_det_bound), float(local_det_bound)
        self.ratio_det_bound = float(ratio_det_bound)
        self.beta = float(beta)
        self.hp = _Hyper(batch_size, float(lr), rounds, warmup_rounds, float(init_cost), patience,
                         float(cost_multiplier), float(attack_succ_threshold), early_stop, float(early_stop_threshold),
                         early_stop_patience, float(epsilon_for_bandits), reset_cost_to_zero, float(beta), 0.0)

    # ---------------------------------------------------------------- pieces
    def scaled(self, h: int, w: int) -> tuple[_Hyper, dict[str, float], float]:
        """The hyperparameters, bounds and area ratio ``s`` for ``H x W`` images (see the module docstring)."""
        s = h * w / REF_SIDE**2
        hp = _Hyper(**{**self.hp.__dict__, "beta": self.beta * s * s})
        bounds = {"global": self.global_det_bound * s, "local": self.local_det_bound * s, "ratio": self.ratio_det_bound}
        return hp, bounds, s

    def optimise(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, pairs: Sequence[tuple[int, int | None]],
                 kind: str, generator: torch.Generator, steps: int | None = None, direction: str = "forward",
                 device: torch.device | None = None) -> tuple[list[Arm], int]:
        """Optimise the arms ``pairs`` (``(target, victim)``; ``victim`` ``None``: label-agnostic)
        on ``clf`` (which must have GRAD) with the K-Arm scheduler; returns the arms and the rounds
        used. ``x`` ``(N, C, H, W)`` clean images in [0, 1], ``y`` their labels. Pairs whose victim
        has no image are dropped."""
        clf.require(Capability.GRAD, who=self.name)
        check(kind in (AGNOSTIC, SPECIFIC), f"k-arm: kind must be {AGNOSTIC} or {SPECIFIC}, got {kind!r}")
        c, h, w = x.shape[1:]
        hp, _, _ = self.scaled(h, w)
        mask0, pattern0 = _initial_trigger(kind, c, h, w, self.single_color_opt, self.central_init, generator)
        hp = _Hyper(**{**hp.__dict__, "first_best_reg": float(mask0.abs().sum())})
        with _gradient_model(clf, device if device is not None else clf.device) as model:
            dev = model.device
            keep = [(p, x[y == p[1]] if p[1] is not None else x) for p in pairs]
            keep = [(p, xi.to(dev)) for p, xi in keep if len(xi)]
            arms = _make_arms([p for p, _ in keep], [xi for _, xi in keep], mask0, pattern0, hp, dev)
            if not arms:
                return arms, 0
            used = k_arm_search(model.logits, arms, kind, self.steps if steps is None else steps, hp, generator,
                                direction)
        return arms, used

    # ---------------------------------------------------------------- scan
    def scan(self, ctx: DefenseContext) -> ScanResult:
        t0 = time.perf_counter()
        check(len(ctx.clean) > 0, "k-arm needs clean holdout images")
        grad_clf, _ = pick(ctx.clf, Capability.GRAD, who=self.name)
        x, y = ctx.clean.float(), ctx.clean.y.long().cpu()
        c, h, w = x.shape[1:]
        _, bounds, s = self.scaled(h, w)
        cand = pre_screen(_softmax(ctx.clf, x), self.gamma, self.global_theta, self.local_theta)
        kind = cand.trigger_type
        arms, used = [], 0
        if kind is not None:
            arms, used = self.optimise(grad_clf, x, y, cand.arms, kind, ctx.generator, device=ctx.device)
        bound = bounds["global" if kind == AGNOSTIC else "local"]
        evidence = [bound / a.best_reg if a.best_reg < math.inf else 0.0 for a in arms]
        per_label = [0.0] * ctx.num_classes
        for a, e in zip(arms, evidence):
            per_label[a.target] = max(per_label[a.target], e)
        best = _smallest(arms) if arms else None
        reached = best is not None and arms[best].best_reg < math.inf
        score, symmetric = 0.0, None
        if reached:
            ba = arms[best]
            score = evidence[best]
            if kind == SPECIFIC and not self.sym_check:
                score = min(score, 1.0)
            elif kind == SPECIFIC and ba.best_reg < bound:
                symmetric = self._symmetric(grad_clf, x, y, ba, ctx)
                score = min(score, symmetric["ratio"] / bounds["ratio"]) if symmetric else 0.0
        verdict = score > 1
        target = arms[best].target if verdict else None
        victims: list[int] = []
        if verdict and kind == SPECIFIC:
            victims = [arms[best].victim] + sorted(
                a.victim for i, a in enumerate(arms)
                if i != best and a.target == target and a.best_reg < bound and a.victim != arms[best].victim)
        asr_art = asr_grad = float("nan")
        if reached:
            m, p = arms[best].trigger()
            ba = arms[best]
            xs = x[y == ba.victim] if ba.victim is not None else x[y != ba.target]
            asr_art = _success(ctx.clf, xs, m, p, ba.target)
            asr_grad = asr_art if grad_clf is ctx.clf else _success(grad_clf, xs, m, p, ba.target)
        trig = [a.trigger() for a in arms]
        mask = torch.stack([m for m, _ in trig]) if trig else torch.zeros(0, 1, h, w)
        pattern = torch.stack([p for _, p in trig]) if trig else torch.zeros(0, c, h, w)
        metrics = {
            "verdict": verdict, "threshold": 1.0, "target": target, "victims": victims, "trigger_type": kind,
            "best_mask_l1": arms[best].best_reg if reached else None,
            "arm_labels": [a.target for a in arms],
            "arms": [{"target": a.target, "victim": a.victim,
                      "mask_l1": a.best_reg if a.best_reg < math.inf else None, "rounds": a.rounds,
                      "improvements": a.improvements, "reached": a.best_reg < math.inf, "best_asr": a.best_acc}
                     for a in arms],
            "best_arm": best, "rounds_used": used, "rounds_max": self.steps, "symmetric": symmetric,
            "best_reversed_asr_artifact": asr_art, "best_reversed_asr_grad": asr_grad, "topk": cand.topk,
            "bounds": bounds, "size_scale": s, "seconds": time.perf_counter() - t0,
        }
        # the authors' decoding tanh(w) / (2 - 1e-7) + 0.5 lies in (0, 1), but float32 rounds a
        # saturated tanh to a few 1e-8 below 0: the images a user saves are clamped to [0, 1]
        mask, pattern = mask.float().clamp(0, 1), pattern.float().clamp(0, 1)
        images = {"mask": mask, "pattern": pattern, "trigger": mask * pattern}
        return ScanResult(flagged=[target] if verdict else [], score=float(score), per_label=per_label,
                          images=images, metrics=metrics)

    def _symmetric(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, fwd: Arm,
                   ctx: DefenseContext) -> dict[str, Any] | None:
        """The reverse direction victim <- target for as many rounds as ``fwd`` ran (``main.py``
        86-95); ``None`` where the target class has no clean image to start from."""
        assert fwd.victim is not None
        arms, used = self.optimise(clf, x, y, [(fwd.victim, fwd.target)], SPECIFIC, ctx.generator,
                                   steps=fwd.rounds, direction="backward", device=ctx.device)
        if not arms:
            return None
        size = arms[0].best_reg
        return {"target": fwd.victim, "victim": fwd.target, "mask_l1": size if size < math.inf else None,
                "ratio": size / fwd.best_reg, "rounds": used}


__all__ = ["AGNOSTIC", "SPECIFIC", "Arm", "Candidates", "KArm", "k_arm_search", "pre_screen"]
