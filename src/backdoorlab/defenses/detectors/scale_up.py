"""SCALE-UP (Guo, Li, Chen, Guo, Sun, Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor
Detection via Analyzing Scaled Prediction Consistency", ICLR 2023; reference code
github.com/JunfengGo/SCALE-UP, and the authors' implementation in BackdoorBox,
github.com/THUYimingLi/BackdoorBox ``core/defenses/SCALE_UP.py``).

Amplifying every pixel value of an input (``clip(n * x, 0, 1)`` for integer scales ``n``) changes
the prediction of a benign image, while a poisoned one keeps predicting the attack's target: the
scaled prediction consistency

    ``SPC(x) = (1 / |S|) * sum_{n in S} 1[C(clip(n * x, 0, 1)) = C(x)]``

is high for triggered inputs. Only predicted labels are used (black box).

Algorithm and defaults follow BackdoorBox's ``SCALE_UP`` (the README of the reference repository
points there for the method; its own scripts only dump predictions):

* ``scales=(3, 5, 7, 9, 11)``: ``scale_set = [3, 5, 7, 9, 11]``. ``SPC`` is the share of these five
  scaled copies predicted as the original input is (the original's own prediction is not counted),
  so it takes the values 0, 0.2, ..., 1. Images are float in [0, 1] without normalisation, as there
  (``torch.clip(imgs * scale, 0.0, 1.0)``). (The reference repository's ``torch_model_wrapper.py``
  instead scans ``h = 1, ..., 11`` and counts the original among them; it also adds
  ``0.02 * U(0, 1)`` noise to its images before scaling, which BackdoorBox does not; neither is done
  here.)
* data-limited setting (``standardize=True``, the paper's Section 3.3 and BackdoorBox's ``valset``):
  the SPC of the defender's benign samples gives a mean ``mu`` and a standard deviation ``sigma``
  (``torch.std``, the unbiased estimate); the score is ``(SPC(x) - mu) / sigma``. As in
  ``init_spc_norm``, the benign SPC counts the scaled copies predicted as the sample's *label* (the
  holdout is labelled). The statistics are global, over all classes, as BackdoorBox computes them.
  ``standardize=False`` scores the plain SPC (the vanilla setting).
* threshold: ``threshold_rule="fixed"`` (the default, BackdoorBox's rule): an input is flagged when
  its (standardised) SPC exceeds ``t=0.5`` (``self.T = 0.5``; BackdoorBox writes ``>= T``, the paper
  "greater than T"; backdoorlab flags ``score > threshold``, and with five scales the plain SPC
  never equals 0.5). The FRR this gives is whatever the benign SPC distribution makes it.
  ``threshold_rule="quantile"`` takes the empirical ``1 - frr`` quantile of the holdout's scores
  instead (``frr=0.01``), the rule the other backdoorlab detectors share. SPC is discrete (six
  values with five scales): where more than ``frr`` of the clean scores tie at the top value, the
  quantile is that value and no input is flagged; the threshold never rejects more than ``frr`` of
  the holdout.

Only the classifier's outputs are used (black box, no gradients, no features), so SCALE-UP runs on
every deployed artifact as it is. Cost: ``len(scales) + 1`` forward passes per input.

Measured on the tests' GTSRB small-cnn BadNets model (3x3 white corner patch, target 0), 300 clean
and 300 triggered test inputs, the holdout's 300 images fitting the statistics: AUROC 0.763 (fp32),
0.766 (int8-torch), 0.758 (int8-ort). The white patch does not survive amplification well on
GTSRB's dark images: at scale 3 already 38% of the pixels saturate, the patch loses its contrast
against a white surround, and 27% of the triggered inputs change their prediction (to classes 1,
12, 13); at high scales almost every image, clean or triggered, turns white and is predicted as the
target 0. 17% of the clean inputs keep their prediction at every scale (SPC = 1), so at
``frr=0.01`` the quantile rule flags nothing there (FAR 1.0), while the default rule flags SPC >= 0.6:
FRR 0.34, FAR 0.23. On the clean GTSRB model the default rule flags 33% of 300 clean test inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...classifier import Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Detector
from ..removers.ft import check_int, check_number

THRESHOLD_RULES = ("fixed", "quantile")


@DEFENSES.register("scale-up")
class ScaleUp(Detector):
    """SCALE-UP input detector.

    ``scales``: the amplification factors (BackdoorBox: 3, 5, 7, 9, 11). ``standardize``: score the
    SPC standardised by the holdout's mean and standard deviation (the data-limited setting,
    BackdoorBox's ``valset``), else the plain SPC. ``threshold_rule``: ``"fixed"`` (flag a score
    above ``t``, BackdoorBox's ``T = 0.5``) or ``"quantile"`` (the empirical ``1 - frr`` quantile of
    the holdout's scores). ``frr``: the share of clean inputs the quantile rule may reject.
    ``fit_size``: at most this many holdout images fit the statistics and the threshold.
    ``batch_size``: images per forward pass (inputs are processed ``batch_size // (len(scales) + 1)``
    at a time). ``eval_limit``: when backdoorlab scores the detector, at most this many clean and
    this many triggered test inputs (an evaluation budget, not part of the method).

    ``score(clf, x)`` returns the standardised SPC (or the plain SPC in [0, 1]); higher means more
    suspicious. After :meth:`fit`, ``spc_mean`` and ``spc_std`` hold the holdout's statistics.
    """

    name = "scale-up"

    def __init__(self, scales: Sequence[float] = (3, 5, 7, 9, 11), standardize: bool = True,
                 threshold_rule: str = "fixed", t: float = 0.5, frr: float = 0.01, fit_size: int = 2000,
                 batch_size: int = 1200, eval_limit: int = 1000):
        who = "scale-up"
        check(isinstance(scales, (list, tuple)) and len(scales) >= 1,
              f"{who}: scales must be a non-empty list of numbers > 0, got {scales!r}")
        for s in scales:
            check(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0,
                  f"{who}: scales must be numbers > 0, got {s!r} in {list(scales)!r}")
        check(isinstance(standardize, bool), f"{who}: standardize must be true or false, got {standardize!r}")
        check(threshold_rule in THRESHOLD_RULES,
              f"{who}: threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {threshold_rule!r}")
        check(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t),
              f"{who}: t (the fixed threshold) must be a finite number, got {t!r}")
        check_number(who, "frr", frr, 0, 1, lo_open=True)
        check_int(who, "fit_size", fit_size, 2)
        check_int(who, "batch_size", batch_size, 1)
        check_int(who, "eval_limit", eval_limit, 10)
        self.scales = tuple(float(s) for s in scales)
        self.standardize = standardize
        self.threshold_rule = threshold_rule
        self.t = float(t)
        self.frr = float(frr)
        self.fit_size = fit_size
        self.batch_size = batch_size
        self.eval_limit = eval_limit
        self.threshold = float("nan")
        self.spc_mean = float("nan")
        self.spc_std = float("nan")
        self._fitted = False

    # --- the method ---------------------------------------------------------------------

    def fit(self, ctx: DefenseContext) -> None:
        """Fit the standardisation and the threshold on up to ``fit_size`` holdout images (a
        random subset drawn from ``ctx.generator`` when the holdout is larger)."""
        clean = ctx.clean.float()
        m = len(clean)
        check(m >= 2, f"scale-up needs at least 2 clean holdout images, got {m}")
        k = min(m, self.fit_size)
        idx = torch.randperm(m, generator=ctx.generator)[:k] if k < m else torch.arange(m)
        x, y = clean[idx], ctx.clean.y[idx].cpu()
        pred, scaled = self._predictions(ctx.clf, x)
        spc_label = (scaled == y[:, None]).float().mean(1)  # BackdoorBox's init_spc_norm: against labels
        if self.standardize:
            mu, sigma = float(spc_label.mean()), float(spc_label.std())
            check(sigma > 0, "scale-up: the clean holdout's SPC values have zero spread; cannot standardise "
                             "(set standardize: false)")
            self.spc_mean, self.spc_std = mu, sigma
        self._fitted = True
        if self.threshold_rule == "fixed":
            self.threshold = self.t
        else:
            s = self._score_from(pred, scaled)
            self.threshold = float(torch.quantile(s.double(), 1 - self.frr))

    @torch.no_grad()
    def score(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)`` float in [0, 1] -> ``(N,)`` float32, the (standardised) SPC."""
        check(self._fitted, "scale-up: call fit(ctx) before score()")
        return self._score_from(*self._predictions(clf, x))

    def _score_from(self, pred: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        spc = (scaled == pred[:, None]).float().mean(1)
        if self.standardize:
            spc = (spc - self.spc_mean) / self.spc_std
        return spc.float()

    @torch.no_grad()
    def _predictions(self, clf: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels of the inputs ``(N,)`` and of their scaled copies ``(N, len(scales))``, CPU int64."""
        x = x.float().cpu()
        n_views = len(self.scales) + 1
        factors = torch.tensor((1.0, *self.scales)).view(1, n_views, 1, 1, 1)
        chunk = max(1, self.batch_size // n_views)
        out = []
        for s in range(0, len(x), chunk):
            xb = x[s:s + chunk]
            views = (xb[:, None] * factors).clamp_(0, 1)  # (b, 1 + |S|, C, H, W); scale 1 is the input
            labels = clf.logits(views.flatten(0, 1)).argmax(1).cpu()
            out.append(labels.view(len(xb), n_views))
        if not out:
            return torch.empty(0, dtype=torch.long), torch.empty(0, len(self.scales), dtype=torch.long)
        labels = torch.cat(out)
        return labels[:, 0], labels[:, 1:]
