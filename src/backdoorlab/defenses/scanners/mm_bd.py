"""MM-BD (Wang, Xiang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with
Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024).

A backdoor makes its target class reachable with an abnormally large classification margin: for
each class ``k`` the defender maximises the margin ``z_k(x) - max_{j != k} z_j(x)`` (``z``: the
logits, before the softmax) over the input ``x`` by gradient ascent from random starts, and keeps
the largest margin reached, ``r_k``. No clean image is used (the method is data-free: it needs
the input shape and input gradients only). The largest statistic ``r_max`` is tested against a
Gamma null fitted to the other ``K - 1`` statistics: with ``F`` the null's CDF, the order-statistic
p-value is ``p = 1 - F(r_max) ** K``; an attack is declared when ``p <= alpha``, and the class
with the largest margin is the target.

Algorithm and defaults follow the authors' code (github.com/wanghangpsu/MM-BD, ``univ_bd.py``, the
detection script ``run_detect.sh`` runs):

* ``restarts=30``: ``images = torch.rand([30, 3, 32, 32])``, uniform random starts in [0, 1]
  (drawn here from ``ctx.generator``);
* the model sees ``clamp(x, 0, 1)``; ``x`` itself is never clipped (as there: gradients vanish
  through the clamp for pixels outside [0, 1]);
* loss per class ``sum_restarts (max_{j != k} z_j - z_k)``, minimised by SGD with ``lr=1e-2``
  (``lr_scheduler`` returns a constant 1e-2). The script builds ``SGD(momentum=0.2)`` anew at every
  iteration, so its momentum buffer starts from the current gradient each time and the update is
  plain gradient descent, ``x <- x - lr * grad``; that is what runs here;
* ``steps=300`` iterations at most (``NSTEP``), stopping early once the loss's relative change
  ``|L_prev - L| / |L_prev|`` falls below ``tol=1e-5`` (``L_prev`` starts at 1000, as there);
* ``r_k``: the largest margin over the restarts, read from the logits of the last forward pass
  (computed before the last update, as the script reads ``outputs``);
* the null: ``scipy.stats.gamma.fit`` on the ``K - 1`` statistics without the largest (a
  maximum-likelihood fit of shape, location and scale, the script's call); ``p = 1 - F(r_max) **
  K``; no attack if ``p > alpha = 0.05`` (the script's test and the paper's significance level).

The classes are independent problems (each restart's gradient depends on its own margin only),
so several classes run in one batch of at most ``forward_batch`` images; each keeps its own early
stopping, so batching changes nothing but the floating-point summation order.

Gradients run on ``pick(ctx.clf, GRAD)``: the artifact, or for an int8 artifact its fake-quant
surrogate. The model's parameters are frozen while it runs (``requires_grad`` restored after).
The input shape comes from the classifier (``input_shape``), else from the clean set when it has
images; ``ctx.clean`` may be empty.

scipy is not a direct dependency of the project; it comes with scikit-learn, which is.

Measured on the tests' GTSRB small-cnn (43 classes, no clean image used): at the defaults, BadNets
(3x3 corner patch, target 0) p = 3.3e-4, class 0's margin 76.8 against 39.2 for the runner-up;
the clean model p = 0.58 (largest margin 45.7, class 7); 515-934 s per model on one thread of a
shared 2-core machine. At 5 restarts x 50 steps (the tests' budget, 11 s): BadNets p = 2.4e-4
to 3.4e-3 over three seeds, the clean model 0.67-0.71 (``tests/defenses/test_mm_bd.py``).

Output (:class:`~backdoorlab.defenses.base.ScanResult`): ``flagged`` = ``[target]`` when detected,
else ``[]``; ``score`` = ``-log10(p)`` (higher = more suspicious; ``alpha = 0.05`` is a score of
1.30; computed from the Gamma log-survival function where ``p`` underflows);
``per_label`` = the statistics ``r_k``; ``metrics``: ``verdict``, ``target`` (the largest-margin
class if detected, else ``None``), ``top_label`` (the largest-margin class in any case),
``p_value``, ``max_margin`` (per class), ``margin_anomaly_index`` (per class, the MAD index the
script prints: ``|r_k - median| / (1.4826 MAD)``), ``gamma_shape``, ``gamma_loc``,
``gamma_scale``, ``alpha``, ``threshold`` (the score at ``alpha``, ``-log10(alpha)``),
``steps_used`` (per class), ``steps_max``, ``restarts``, ``input_shape``, ``seconds``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...classifier import Capability, Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick
from ..removers.ft import check_int, check_number
from .neural_cleanse import _gradient_model, mad_anomaly

LAST_LOSS0 = 1000.0  # last_loss = 1000 before the first iteration (univ_bd.py)


@dataclass
class MarginResult:
    """Per class: ``margin`` ``(K,)`` the largest margin over the restarts, ``steps_used``."""

    margin: torch.Tensor
    steps_used: list[int]


@dataclass
class GammaTest:
    """The order-statistic test of the largest statistic against a Gamma null."""

    top: int
    p_value: float
    score: float  # -log10(p)
    shape: float
    loc: float
    scale: float


def _ascend(logits: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, classes: Sequence[int],
            steps: int, lr: float, tol: float) -> tuple[list[float], list[int]]:
    """Maximise each class's margin from its starts ``x0`` ``(A, R, C, H, W)`` (``A`` classes, ``R``
    restarts): plain gradient descent on ``sum_r (max_{j != k} z_j - z_k)``, each class stopping on
    its own relative-change test. Returns each class's largest margin and its iterations."""
    a, r = x0.shape[:2]
    x = x0.clone()
    tgt = torch.as_tensor(list(classes), dtype=torch.long, device=x.device)
    last = [LAST_LOSS0] * a
    best = [float("nan")] * a
    used = [0] * a
    active = list(range(a))
    for step in range(steps):
        if not active:
            break
        ia = torch.as_tensor(active, dtype=torch.long, device=x.device)
        xa = x[ia].requires_grad_(True)  # (n, R, C, H, W)
        n = len(active)
        out = logits(xa.clamp(0, 1).reshape(n * r, *x.shape[2:])).view(n, r, -1)
        t = tgt[ia].view(n, 1, 1).expand(n, r, 1)
        z_t = out.gather(2, t).squeeze(2)  # (n, R)
        z_o = out.scatter(2, t, float("-inf")).amax(2)  # largest other logit
        loss = (z_o - z_t).sum(1)  # (n,)
        (grad,) = torch.autograd.grad(loss.sum(), xa)
        with torch.no_grad():
            x[ia] = xa.detach() - lr * grad
        margins = (z_t - z_o).detach().amax(1).tolist()
        losses = loss.detach().tolist()
        still = []
        for j, k in enumerate(active):
            best[k], used[k] = margins[j], step + 1
            prev = last[k]
            change = abs(prev - losses[j]) / abs(prev) if prev != 0 else (0.0 if losses[j] == 0 else math.inf)
            last[k] = losses[j]
            if change >= tol:
                still.append(k)
        active = still
    return best, used


def max_margins(clf: Classifier, shape: tuple[int, int, int], num_classes: int, generator: torch.Generator,
                restarts: int, steps: int, lr: float, tol: float, forward_batch: int,
                device: torch.device | None = None) -> MarginResult:
    """The maximum-margin statistic of every class on ``clf`` (which must have GRAD).

    Starts: ``(K, restarts, C, H, W)`` uniform in [0, 1] from ``generator`` (drawn on the CPU, the
    same whatever the batching). Classes run ``forward_batch // restarts`` at a time (at least one).
    """
    clf.require(Capability.GRAD, who="mm-bd")
    x0 = torch.rand(num_classes, restarts, *shape, generator=generator)
    per = max(1, forward_batch // restarts)
    margins: list[float] = []
    used: list[int] = []
    with _gradient_model(clf, device if device is not None else clf.device) as model:
        for c0 in range(0, num_classes, per):
            cls = list(range(c0, min(num_classes, c0 + per)))
            m, u = _ascend(model.logits, x0[cls].to(model.device), cls, steps, lr, tol)
            margins += m
            used += u
    return MarginResult(torch.tensor(margins, dtype=torch.float64), used)


def gamma_order_test(stats: Sequence[float] | torch.Tensor) -> GammaTest:
    """The script's test: fit a Gamma (shape, loc, scale; scipy's MLE) to the statistics without the
    largest, and return ``p = 1 - F(r_max) ** K``. Where ``p`` underflows, ``-log10 p`` comes from
    the log-survival function (``p ~ K * sf`` for a small ``sf``)."""
    import numpy as np
    from scipy import stats as st

    r = np.asarray(torch.as_tensor(stats, dtype=torch.float64).flatten().tolist(), dtype=np.float64)
    k = len(r)
    check(k >= 3 and bool(np.isfinite(r).all()), "mm-bd: needs at least 3 classes with finite margins")
    top = int(np.argmax(r))
    null = np.delete(r, top)
    check(float(np.ptp(null)) > 0, "mm-bd: the null margins are all equal; no Gamma can be fitted")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        a, loc, scale = st.gamma.fit(null)
        sf = float(st.gamma.sf(r[top], a, loc=loc, scale=scale))
        logsf = float(st.gamma.logsf(r[top], a, loc=loc, scale=scale))
    check(math.isfinite(sf), f"mm-bd: the Gamma fit to the null margins failed (shape {a}, loc {loc}, scale {scale})")
    p = -math.expm1(k * math.log1p(-sf)) if sf < 1 else 1.0  # 1 - (1 - sf) ** K, accurately
    if p > 0:
        score = -math.log10(p)
    elif math.isfinite(logsf):
        score = -(math.log10(k) + logsf / math.log(10))
    else:
        score = 324.0  # beyond float64: p below the smallest subnormal
    return GammaTest(top, p, max(score, 0.0), float(a), float(loc), float(scale))


def _input_shape(ctx: DefenseContext, grad_clf: Classifier) -> tuple[int, int, int]:
    for shape in (ctx.clf.input_shape, grad_clf.input_shape):
        if shape is not None:
            return tuple(int(s) for s in shape)  # type: ignore[return-value]
    check(ctx.clean is not None and len(ctx.clean) > 0,
          "mm-bd needs the input shape: the classifier has no input_shape and there are no clean images")
    return ctx.clean.chw


@DEFENSES.register("mm-bd")
class MMBD(Scanner):
    """MM-BD (Wang et al., IEEE S&P 2024): the maximum achievable classification margin per class,
    tested against a Gamma null; data-free. See the module docstring for the algorithm and defaults.

    ``restarts``: random starts per class (30); ``steps``: most iterations (300); ``lr``: step size
    (1e-2); ``tol``: relative loss change that stops a class (1e-5); ``alpha``: significance level
    (0.05); ``forward_batch``: most images per forward pass (classes are batched up to it).
    """

    name = "mm-bd"
    white_box = frozenset({Capability.GRAD})
    data_free: ClassVar[bool] = True  # runs without clean images (the scan command's data-free mode)

    def __init__(self, restarts: int = 30, steps: int = 300, lr: float = 1e-2, tol: float = 1e-5,
                 alpha: float = 0.05, forward_batch: int = 1024):
        who = "mm-bd"
        check_int(who, "restarts", restarts, 1)
        check_int(who, "steps", steps, 1)
        check_number(who, "lr", lr, 0, lo_open=True)
        check_number(who, "tol", tol, 0)
        check_number(who, "alpha", alpha, 0, 1, lo_open=True, hi_open=True)
        check_int(who, "forward_batch", forward_batch, 1)
        self.restarts, self.steps, self.forward_batch = restarts, steps, forward_batch
        self.lr, self.tol, self.alpha = float(lr), float(tol), float(alpha)

    def scan(self, ctx: DefenseContext) -> ScanResult:
        t0 = time.perf_counter()
        check(ctx.num_classes >= 3, f"mm-bd needs at least 3 classes, got {ctx.num_classes}")
        grad_clf, _ = pick(ctx.clf, Capability.GRAD, who=self.name)
        shape = _input_shape(ctx, grad_clf)
        res = max_margins(grad_clf, shape, ctx.num_classes, ctx.generator, self.restarts, self.steps, self.lr,
                          self.tol, self.forward_batch, ctx.device)
        test = gamma_order_test(res.margin)
        verdict = test.p_value <= self.alpha  # univ_bd.py: "No Attack!" if pv > 0.05
        margins = res.margin.tolist()
        metrics: dict[str, Any] = {
            "verdict": verdict, "target": test.top if verdict else None, "top_label": test.top,
            "p_value": test.p_value, "max_margin": margins,
            "margin_anomaly_index": mad_anomaly(res.margin).index, "gamma_shape": test.shape,
            "gamma_loc": test.loc, "gamma_scale": test.scale, "alpha": self.alpha,
            "threshold": -math.log10(self.alpha), "steps_used": res.steps_used,
            "steps_max": self.steps, "restarts": self.restarts, "input_shape": list(shape),
            "seconds": time.perf_counter() - t0}
        return ScanResult(flagged=[test.top] if verdict else [], score=test.score, per_label=margins,
                          metrics=metrics)


__all__ = ["MMBD", "GammaTest", "MarginResult", "gamma_order_test", "max_margins"]
