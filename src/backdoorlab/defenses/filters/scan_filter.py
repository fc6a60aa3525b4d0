"""SCAn, Statistical Contamination Analyzer (Tang, Wang, Tang, Zhang, "Demon in the Variant:
Statistical Analysis of DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021;
reference code github.com/TDteach/Demon-in-the-Variant, ``pysrc/SCAn.py`` and ``msrc/``).

Registered as ``scan-filter`` (``scan`` is the CLI's model scanner, :mod:`backdoorlab.scan`).

Model. A representation (penultimate features, ``D`` dims) is ``x = mu_c + eps``: an identity
vector of its class, ``mu_c ~ N(0, S_mu)``, plus a class-independent variation
``eps ~ N(0, S_eps)``. A class contaminated by a trigger mixes two populations (its own images and
the trigger-carrying ones of other classes), so it is better described by two identity vectors
than by one.

1. **Global model** (the defender's clean holdout ``ctx.clean``): ``S_mu`` and ``S_eps`` by the
   paper's EM, centred on the holdout's mean. It starts from the class means and residuals'
   covariances; the E-step takes each class's identity as its posterior mean
   ``mu_k = S_mu (n_k S_mu + S_eps)^+ sum_i x_i``, the M-step re-estimates both covariances; it
   stops when ``||dS_mu||_F + ||dS_eps||_F < 0.01`` or after 100 iterations (the reference's).
2. **Untangling** (per class ``k`` of the untrusted training set ``ctx.train``): two subgroups
   with shared ``S_eps`` by the reference's hard EM: a random split, then alternately the two
   subgroup means ``u_1, u_2`` and each sample's assignment to the nearer mean in the metric
   ``F = S_eps^+``, until no sample moves (at most 100 steps).
3. **Test statistic**: the log-likelihood ratio (x2, per sample) of the two-subgroup model against
   the one-identity model, ``J_k = (1/n_k) sum_i [(x_i - mu)' F (x_i - mu) - (x_i - u_g(i))' F (x_i - u_g(i))]``
   with ``mu`` the one-identity posterior mean above.
4. **Verdict**: the classes' ``J_k`` are normalised by the median/MAD anomaly index
   ``J*_k = (J_k - median) / (1.4826 * MAD)``, and classes with ``J*_k > e^2`` (~7.389, the paper's
   threshold) are flagged as contaminated; ``detected = bool(flagged)``, and the flagged classes are
   the targets SCAn names.

Per-sample scores (for AUROC and removal; the paper decides per class, then drops the contaminated
class's trigger subgroup). Which subgroup is the trigger one: the defender's clean holdout images
of class ``k`` are assigned to the two subgroups with the same rule; the subgroup that takes most of
them is the clean one (as public ports of SCAn decide it, from clean samples inspected alongside). Only where
the holdout has none of class ``k`` (or splits evenly) the smaller subgroup is taken as the trigger
one; ``scan_poison_side`` in the row says which rule decided each flagged class (``holdout`` or
``minority``, in the order of ``flagged``). The score is
``max(J*_k, 0) * sigmoid(delta_i)``, ``delta_i`` half the difference of the squared distances to the
clean and the trigger subgroup (the two-Gaussian log-likelihood ratio): contaminated classes rank
first, and within a class the trigger side. The trigger subgroup of every flagged class is removed.

SCAn does not assume the poison is a minority of its class (the holdout names the clean side), so it
issues its verdict where the poison is most of the target class (GTSRB BadNets: 570 of 605).
Source-specific attacks (the trigger flips only some source classes) are the paper's point: they
still put a second population into the target class, which the untangling finds.

Deviations from the reference code, and why:

* The one-identity mean of step 3 is the posterior mean ``S_mu (n S_mu + S_eps)^+ sum x``; the
  reference's ``calc_test`` multiplies by ``S_eps`` instead of ``S_mu``, which is not the model's
  estimate (its global EM uses the correct one; the two agree there, not in ``calc_test``).
* The training set is centred on the global model's (clean) mean, the origin of the identity prior;
  the reference centres the inspected set on its own mean, which the poison shifts.
* The anomaly index is one-sided (``J_k`` above the median): the reference takes
  ``|J_k - median|``, which would also flag a class *more* homogeneous than the others; a small
  ``J_k`` is no evidence of a second population. The reference's ``y / max(y)`` scaling is dropped
  (the index is scale-free).
* The features are first projected onto the top ``dims`` principal directions of the holdout's
  (centred) features, ``dims`` a tenth of the holdout's size by default (30 for a 300-image GTSRB
  holdout), so that ``S_eps`` is estimated from ten samples per dimension. In all 256 penultimate
  dimensions a 300-image holdout leaves ``S_eps`` nearly singular; ``F = S_eps^+`` then weighs its
  noise directions enormously, every class splits along them (``J`` in the thousands for clean
  classes) and the source-specific BadNets class is not told apart (J* 0.9). The paper fits the
  global model on 10% of the training data; backdoor-toolbox's SCAn port offers the same PCA
  reduction (``reduce_dim``).
* ``n_init`` random restarts of the untangling keep the split with the largest ``J_k`` (the
  likelihood EM maximises); the reference runs one (``n_init=1``, the default here).

Features: ``ctx.clf.features(x)``, the deployed artifact's penultimate activations (black box,
``FEATURES``), of both the training set and the holdout, so the model is the one that ships.
"""

from __future__ import annotations

import math

import torch

from ...classifier import Capability
from ...errors import check
from ..base import DEFENSES, DefenseContext, Filter, FilterResult
from .common import mad_index, penultimate_features, training_set

THRESHOLD = math.exp(2)  # the paper's threshold on J*, 2 on the ln scale
GLOBAL_TOL = 0.01  # the reference's stopping rule for the global EM (msrc/global_model.m, pysrc EPS)
MAX_ITERS = 100  # ... and its iteration cap, for both EMs


def _cov(x: torch.Tensor) -> torch.Tensor:
    """``(D, D)`` unbiased covariance of the rows of ``x`` (``numpy.cov(x.T)``)."""
    return torch.cov(x.T) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)


def global_model(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(S_mu, S_eps, iterations)`` of the decomposition ``x = mu_y + eps`` fitted to clean ``x``
    (``(N, D)`` float64, centred) with labels ``y`` by the paper's EM."""
    labels, inv = torch.unique(y, return_inverse=True)
    counts = torch.bincount(inv, minlength=len(labels)).to(x.dtype)
    sums = torch.zeros(len(labels), x.shape[1], dtype=x.dtype).index_add_(0, inv, x)
    means = sums / counts[:, None]
    s_mu, s_eps = _cov(means[inv]), _cov(x - means[inv])
    it = 0
    for it in range(1, MAX_ITERS + 1):  # noqa: B007  (the count is returned)
        # E-step: each class's identity is its posterior mean S_mu (n_k S_mu + S_eps)^+ sum_i x_i
        mu = torch.stack([s_mu @ torch.linalg.pinv(n * s_mu + s_eps, hermitian=True) @ s
                          for n, s in zip(counts, sums)])
        new_mu, new_eps = _cov(mu[inv]), _cov(x - mu[inv])
        dist = float(torch.linalg.norm(new_mu - s_mu) + torch.linalg.norm(new_eps - s_eps))
        s_mu, s_eps = new_mu, new_eps
        if dist < GLOBAL_TOL:
            break
    return s_mu, s_eps, it


def _sq(x: torch.Tensor, u: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Squared distances ``(x_i - u)' F (x_i - u)`` of the rows of ``x``."""
    d = x - u
    return ((d @ f) * d).sum(1)


def untangle(x: torch.Tensor, f: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The reference's two-subgroup hard EM on one class's ``(n, D)`` representations in the metric
    ``f``: ``(n,)`` bool, True for subgroup 1 (both subgroups non-empty unless the EM empties one)."""
    n = len(x)
    z = torch.rand(n, generator=g, dtype=torch.float64) >= 0.5
    if not bool(z.any()):
        z[0] = True
    if bool(z.all()):
        z[0] = False
    for _ in range(MAX_ITERS):
        if bool(z.all()) or not bool(z.any()):
            break
        u1, u2 = x[z].mean(0), x[~z].mean(0)
        new = _sq(x, u1, f) < _sq(x, u2, f)
        if bool((new == z).all()):
            break
        z = new
    return z


def statistic(x: torch.Tensor, z: torch.Tensor, f: torch.Tensor, s_mu: torch.Tensor, s_eps: torch.Tensor
              ) -> float:
    """``J``: the mean per-sample log-likelihood ratio (x2) of the split ``z`` against one identity."""
    n = len(x)
    if bool(z.all()) or not bool(z.any()):
        return 0.0
    mu = s_mu @ torch.linalg.pinv(n * s_mu + s_eps, hermitian=True) @ x.sum(0)
    own = torch.where(z[:, None], x[z].mean(0), x[~z].mean(0))
    d0, d1 = x - mu, x - own
    return float((((d0 @ f) * d0).sum(1) - ((d1 @ f) * d1).sum(1)).mean())


@DEFENSES.register("scan-filter")
class SCAnFilter(Filter):
    """SCAn (statistical contamination analyzer) as a training-data filter.

    ``threshold``: a class is contaminated when its anomaly index ``J*`` exceeds it (paper: e^2).
    ``min_class_size``: classes with fewer training samples get no statistic (two subgroups need
    two samples at least). ``dims``: principal directions of the holdout's features the analysis
    runs in (default ``null``: a tenth of the holdout's size, see the module docstring).
    ``n_init``: random starts of the untangling EM per class, the split with the largest ``J`` kept
    (reference: 1). ``batch_size``: images per forward pass when
    reading features.
    """

    minority_assumption = False  # the holdout names the clean subgroup (see the module docstring)

    name = "scan-filter"
    black_box = frozenset({Capability.FEATURES})

    def __init__(self, threshold: float = THRESHOLD, min_class_size: int = 2, n_init: int = 1,
                 dims: int | None = None, batch_size: int = 512):
        check(isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold > 0
              and math.isfinite(threshold), f"scan-filter: threshold must be a number > 0, got {threshold!r}")
        check(isinstance(min_class_size, int) and not isinstance(min_class_size, bool) and min_class_size >= 2,
              f"scan-filter: min_class_size must be an integer >= 2, got {min_class_size!r}")
        check(isinstance(n_init, int) and not isinstance(n_init, bool) and n_init >= 1,
              f"scan-filter: n_init must be an integer >= 1, got {n_init!r}")
        check(dims is None or (isinstance(dims, int) and not isinstance(dims, bool) and dims >= 1),
              f"scan-filter: dims must be an integer >= 1 or null, got {dims!r}")
        check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
              f"scan-filter: batch_size must be an integer >= 1, got {batch_size!r}")
        self.threshold = float(threshold)
        self.min_class_size = min_class_size
        self.n_init = n_init
        self.dims = dims
        self.batch_size = batch_size

    def filter(self, ctx: DefenseContext) -> FilterResult:
        train = training_set(ctx, self.name)
        check(len(ctx.clean) > 0 and len(torch.unique(ctx.clean.y)) >= 2,
              f"{self.name} needs clean holdout images of two classes at least (ctx.clean)")
        feats = penultimate_features(ctx.clf, train, self.batch_size, who=self.name)
        clean = penultimate_features(ctx.clf, ctx.clean, self.batch_size, who=self.name)
        y, yc = train.y.cpu(), ctx.clean.y.cpu()
        centre = clean.mean(0)
        dims = self.dims or max(1, len(clean) // 10)
        _, _, vh = torch.linalg.svd(clean - centre, full_matrices=False)
        proj = vh[:min(dims, len(vh))].T  # the holdout's top principal directions
        x_all, xc_all = (feats - centre) @ proj, (clean - centre) @ proj
        s_mu, s_eps, iters = global_model(xc_all, yc)
        f = torch.linalg.pinv(s_eps, hermitian=True)

        n, kk = len(y), ctx.num_classes
        stat = torch.full((kk,), float("nan"), dtype=torch.float64)
        delta = torch.zeros(n, dtype=torch.float64)  # log-likelihood ratio trigger side vs clean side
        side: list[str | None] = [None] * kk
        for k in range(kk):
            idx = torch.nonzero(y == k).flatten()
            seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)) for _ in range(self.n_init)]
            if len(idx) < self.min_class_size:
                continue
            x = x_all[idx]
            best: tuple[float, torch.Tensor] | None = None
            for seed in seeds:
                z = untangle(x, f, torch.Generator().manual_seed(seed))
                j = statistic(x, z, f, s_mu, s_eps)
                if best is None or j > best[0]:
                    best = (j, z)
            assert best is not None
            stat[k], z = best
            if bool(z.all()) or not bool(z.any()):
                continue
            u1, u2 = x[z].mean(0), x[~z].mean(0)
            xc = xc_all[yc == k]
            in1 = int((_sq(xc, u1, f) < _sq(xc, u2, f)).sum()) if len(xc) else 0
            if len(xc) and 2 * in1 != len(xc):  # the subgroup holding most clean images is the clean one
                trig_is_1, side[k] = 2 * in1 < len(xc), "holdout"
            else:
                trig_is_1, side[k] = int(z.sum()) < int((~z).sum()), "minority"
            u_t, u_c = (u1, u2) if trig_is_1 else (u2, u1)
            delta[idx] = 0.5 * (_sq(x, u_c, f) - _sq(x, u_t, f))
        index = mad_index(stat)
        flagged = [k for k in range(kk) if bool(index[k] > self.threshold)]
        weight = torch.nan_to_num(index, nan=0.0).clamp_min(0.0)
        scores = weight[y] * torch.sigmoid(delta)
        removed = torch.isin(y, torch.tensor(flagged, dtype=y.dtype)) & (delta > 0)
        return FilterResult(
            scores=scores.float(), removed=removed, flagged=flagged, detected=bool(flagged),
            metrics={"scan_statistic": [round(float(v), 4) for v in stat],
                     "scan_anomaly_index": [round(float(v), 4) for v in index],
                     "scan_max_anomaly_index": float(torch.nan_to_num(index, nan=float("-inf")).max()),
                     "scan_poison_side": [side[k] for k in flagged],
                     "scan_global_em_iters": iters, "scan_dims": int(proj.shape[1])})
