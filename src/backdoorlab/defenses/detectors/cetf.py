"""CETF, the CAM-focus Evolutionary Trigger Filter (Zhou, Ye, Tang, Luo, Shi & Jia, "Evolutionary
Trigger Detection and Lightweight Model Repair Based Backdoor Defense", arXiv 2407.05396, 2024).

A trigger is a small region of the input that the backdoored model relies on: covering it takes
the prediction away from the attack's target, while covering a small region of a clean image
rarely changes its prediction. CETF turns that into an input detector by searching, per input,
for the small region whose *masking* (the preprocessing) moves the prediction most:

1. **CAM focus.** Grad-CAM (Selvaraju et al., ICCV 2017) of the predicted class at the last
   spatial feature map of the model: the gradient of the class logit with respect to the map
   ``A`` (``(K, h, w)``), averaged over positions, weights the channels; ``ReLU(sum_k a_k A_k)`` is
   upsampled (bilinear) to the image size and divided by its maximum. The search region is the
   bounding box of the pixels whose CAM is at least ``cam_threshold`` (0.5) of the maximum: a
   backdoored model attends to its trigger when the trigger decides the prediction.
2. **Differential evolution** (Storn & Price, 1997; DE/rand/1/bin with mutation ``F=0.5``,
   crossover ``CR=0.9``, greedy selection) over masks: an individual is the centre ``(row, col)``
   of a square (inside the CAM box) and its side (``min_side`` to ``max_frac`` of the image side);
   the masked input replaces the square by the mean colour of the one-pixel ring around it
   (``fill="local"``, the default; ``"mean"``: the image's mean colour; ``"zero"``: black). The fitness of a mask is the
   drop in the deployed classifier's softmax probability of the originally predicted class,
   ``p(y_hat | x) - p(y_hat | masked x)``, minus ``area_penalty`` times the square's area over the
   largest allowed area (a trigger is small; large masks hide the object itself).
   ``population=20`` individuals evolve for ``generations=10`` generations.
3. **Decision.** The score of an input is the best fitness found (in ``[-area_penalty, 1]``);
   the threshold is the empirical ``1 - frr`` quantile of the scores of the defender's clean holdout
   (``frr=0.01``). The best mask of a flagged input is the extracted trigger (its location, and the
   input's pixels under it): :meth:`CETF.extract` returns it for the repair (``cetf-repair``,
   :mod:`backdoorlab.defenses.removers.cetf_repair`). ``flipped`` says whether masking it changed
   the predicted label.

Which classifier runs which part: the masked inputs are classified by the **deployed artifact**
(labels and probabilities only); Grad-CAM needs gradients, so it runs on the artifact where it has
them and on its fake-quant surrogate otherwise (:func:`~backdoorlab.defenses.base.pick`), at the
surrogate's last 4-D feature map.

No code has been published with the paper (its abstract: "Source code will be published after
accepted"), and only the paper's summary was available here; the details above are backdoorlab's
choices where the summary says only "Grad-CAM constrains the search region, differential evolution
over the preprocessing decides whether an input contains a trigger and extracts it": the square
mask and its local fill, the CAM threshold and bounding box, the fitness with its area
penalty, DE's ``F``, ``CR``, population and generations, and the quantile threshold (the rule the
other backdoorlab detectors share).

Cost: one forward and backward pass per input for Grad-CAM, then ``population * (generations + 1)``
forward passes of masked copies on the artifact (220 at the defaults).

Shapes: inputs ``(N, C, H, W)`` float in [0, 1]; scores ``(N,)``; masks ``(N, H, W)`` bool.

**Measured** on the tests' GTSRB small-cnn BadNets model (3x3 white corner patch, target 0;
``tests/defenses/test_polarizer_cetf.py``): at population 10 and 5 generations, fitted on 40
holdout images and scored on 40 clean + 40 triggered test images, AUROC 0.698 (FP32) and 0.715
(int8-torch, Grad-CAM on the surrogate); at 16 and 8 on 60 + 60 images (FP32) 0.812, with 82% of
the triggered and 50% of the clean images flipping under their best square. The fill matters: with
the image's mean colour (population 10, 5 generations, area penalty 1) 0.666, with the local ring
0.719; a narrower search (squares up to 15% of the side) or a tighter CAM region (0.8) loses the
patch (0.44, 0.12). The CAM of the target class is high on the patch (mean 0.66 there against 0.18
for clean images) but peaks a cell above it (the 4x4 map's upsampling), and its 0.5 bounding box
reaches the corner for 93% of triggered images; GTSRB's small signs flip under small squares too,
which bounds the separation. On the clean GTSRB model (int8-torch, ``frr=0.1`` on 60 holdout images)
the FPR on 60 clean test images stays within 0.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Capability, Classifier
from ...errors import BackdoorLabError, check
from ..base import DEFENSES, DefenseContext, Detector, pick
from ..removers.ft import check_int, check_number

FILLS = ("local", "mean", "zero")


@dataclass
class Extraction:
    """CETF's search over ``N`` inputs: ``score`` ``(N,)`` the best fitness; ``mask`` ``(N, H, W)``
    bool, the best square; ``pred`` ``(N,)`` the label predicted for the input; ``masked_pred``
    ``(N,)`` the label predicted with the best square masked; ``flipped`` ``(N,)`` bool."""

    score: torch.Tensor
    mask: torch.Tensor
    pred: torch.Tensor
    masked_pred: torch.Tensor

    @property
    def flipped(self) -> torch.Tensor:
        return self.masked_pred != self.pred


def last_feature_map(module: nn.Module, x: torch.Tensor) -> str:
    """Name of the module whose output is the last ``(N, K, h, w)`` map with ``h * w > 1`` to be
    computed in a forward pass of ``module`` on ``x`` (Grad-CAM's layer)."""
    done: list[tuple[str, tuple[int, ...]]] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: done.append((n, tuple(o.shape)))
                                       if isinstance(o, torch.Tensor) else None)
               for name, m in module.named_modules() if name]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    maps = [n for n, s in done if len(s) == 4 and s[2] * s[3] > 1]
    if not maps:
        raise BackdoorLabError("cetf: the model has no spatial feature map for Grad-CAM")
    return maps[-1]


def grad_cam(module: nn.Module, layer: str, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Grad-CAM ``(N, H, W)`` in [0, 1] of classes ``cls`` ``(N,)`` for images ``x`` at ``layer``
    of ``module`` (upsampled bilinearly to the image size, divided by each map's maximum)."""
    store: list[torch.Tensor] = []
    h = module.get_submodule(layer).register_forward_hook(lambda m, i, o: store.append(o))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so that a frozen model still builds a graph
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            a = store[-1]
            (g,) = torch.autograd.grad(out.float().gather(1, cls[:, None].to(out.device)).sum(), [a])
    finally:
        h.remove()
    weights = g.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a.detach().float()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp(min=1e-12), torch.ones_like(cam))


def square_masks(ind: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``ind`` ``(..., 3)`` = (centre row, centre col, side) -> bool masks ``(..., H, W)``."""
    side = ind[..., 2].round().clamp(min=1)
    top = (ind[..., 0] - (side - 1) / 2).round()
    left = (ind[..., 1] - (side - 1) / 2).round()
    rows = torch.arange(h, dtype=ind.dtype, device=ind.device)
    cols = torch.arange(w, dtype=ind.dtype, device=ind.device)
    r = (rows >= top[..., None]) & (rows < (top + side)[..., None])  # (..., H)
    c = (cols >= left[..., None]) & (cols < (left + side)[..., None])  # (..., W)
    return r[..., :, None] & c[..., None, :]


def masked(x: torch.Tensor, masks: torch.Tensor, fill: str) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` with each of the ``P`` squares ``masks`` ``(N, P, H, W)`` filled:
    ``"local"`` with the mean colour of the one-pixel ring around the square (inside the image),
    ``"mean"`` with the image's mean colour, ``"zero"`` with black. ``(N, P, C, H, W)``."""
    n, k, h, w = masks.shape
    xs = x[:, None]  # (N, 1, C, H, W)
    if fill == "zero":
        value = torch.zeros_like(xs)
    elif fill == "mean":
        value = xs.mean(dim=(3, 4), keepdim=True)
    else:
        m = masks.flatten(0, 1)[:, None].float()  # (N*P, 1, H, W)
        ring = (F.max_pool2d(m, 3, stride=1, padding=1) - m).view(n, k, 1, h, w)
        count = ring.sum(dim=(3, 4), keepdim=True)
        value = (xs * ring).sum(dim=(3, 4), keepdim=True) / count.clamp(min=1)
        value = torch.where(count > 0, value, xs.mean(dim=(3, 4), keepdim=True))
    return torch.where(masks[:, :, None], value, xs)


@DEFENSES.register("cetf")
class CETF(Detector):
    """CETF input detector (Zhou et al., 2024; module docstring).

    ``population``, ``generations``, ``f``, ``cr``: differential evolution (DE/rand/1/bin).
    ``cam_threshold``: share of the CAM's maximum that bounds the search region. ``min_side``,
    ``max_frac``: the square's side, from ``min_side`` pixels to ``max_frac`` of the image's shorter
    side. ``area_penalty``: fitness cost of the largest square. ``fill``: what replaces the masked
    square (``"mean"``: the image's mean colour, ``"zero"``: black). ``frr``: share of clean holdout
    inputs the threshold may reject. ``fit_size``: holdout images that fit the threshold.
    ``batch_size``: masked images per forward pass. ``eval_limit``: when backdoorlab scores the
    detector, at most this many clean and this many triggered test inputs (an evaluation budget).
    """

    name = "cetf"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, population: int = 20, generations: int = 10, f: float = 0.5, cr: float = 0.9,
                 cam_threshold: float = 0.5, min_side: int = 1, max_frac: float = 0.25, area_penalty: float = 0.1,
                 fill: str = "local", frr: float = 0.01, fit_size: int = 1000, batch_size: int = 2048,
                 eval_limit: int = 1000):
        who = "cetf"
        check_int(who, "population", population, 4)
        check_int(who, "generations", generations, 0)
        check_number(who, "f", f, 0, 2, lo_open=True, hi_open=False)
        check_number(who, "cr", cr, 0, 1, hi_open=False)
        check_number(who, "cam_threshold", cam_threshold, 0, 1, hi_open=False)
        check_int(who, "min_side", min_side, 1)
        check_number(who, "max_frac", max_frac, 0, 1, lo_open=True, hi_open=False)
        check_number(who, "area_penalty", area_penalty, 0)
        check(fill in FILLS, f"{who}: fill must be one of {', '.join(FILLS)}, got {fill!r}")
        check_number(who, "frr", frr, 0, 1, lo_open=True)
        check_int(who, "fit_size", fit_size, 2)
        check_int(who, "batch_size", batch_size, 1)
        check_int(who, "eval_limit", eval_limit, 10)
        self.population, self.generations, self.f, self.cr = population, generations, float(f), float(cr)
        self.cam_threshold, self.min_side, self.max_frac = float(cam_threshold), min_side, float(max_frac)
        self.area_penalty, self.fill, self.frr = float(area_penalty), fill, float(frr)
        self.fit_size, self.batch_size, self.eval_limit = fit_size, batch_size, eval_limit
        self.threshold = float("nan")
        self._g: torch.Generator | None = None
        self._layers: dict[int, str] = {}

    # --- the method ---------------------------------------------------------------------

    def fit(self, ctx: DefenseContext) -> None:
        """Threshold at the ``1 - frr`` quantile of the scores of up to ``fit_size`` holdout images
        (a random subset drawn from ``ctx.generator`` when the holdout is larger)."""
        m = len(ctx.clean)
        check(m >= 2, f"cetf needs at least 2 clean holdout images, got {m}")
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        self._g = torch.Generator().manual_seed(seed)
        k = min(m, self.fit_size)
        idx = torch.randperm(m, generator=self._g)[:k] if k < m else torch.arange(m)
        s = self.extract(ctx.clf, ctx.clean.subset(idx).float()).score
        self.threshold = float(torch.quantile(s.double(), 1 - self.frr))

    def score(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)`` float in [0, 1] -> ``(N,)`` float32, the best fitness found."""
        check(self._g is not None, "cetf: call fit(ctx) before score()")
        return self.extract(clf, x).score

    def extract(self, clf: Classifier, x: torch.Tensor) -> Extraction:
        """Run the CAM-focused evolutionary search on ``x`` ``(N, C, H, W)`` in [0, 1]."""
        if self._g is None:
            self._g = torch.Generator().manual_seed(0)
        x = x.float().cpu()
        n, _, h, w = x.shape
        if n == 0:
            e = torch.empty(0)
            return Extraction(e, torch.empty(0, h, w, dtype=torch.bool), e.long(), e.long())
        probs = self._probs(clf, x)
        pred = probs.argmax(1)
        p0 = probs.gather(1, pred[:, None])[:, 0]
        cam = self._cam(clf, x, pred)
        lo, hi = self._bounds(cam, h, w)  # (N, 3) each
        fill = self.fill
        max_area = float(self._max_side(h, w) ** 2)
        g = self._g

        def fitness(pop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            masks = square_masks(pop, h, w)  # (N, P, H, W)
            k = pop.shape[1]
            xm = masked(x, masks, fill)  # (N, P, C, H, W)
            pr = self._probs(clf, xm.flatten(0, 1)).view(n, k, -1)
            drop = p0[:, None] - pr.gather(2, pred.view(n, 1, 1).expand(n, k, 1))[..., 0]
            area = masks.flatten(2).sum(2).float()
            return drop - self.area_penalty * area / max_area, pr.argmax(2)

        pop = lo[:, None] + torch.rand(n, self.population, 3, generator=g) * (hi - lo)[:, None]
        fit, lab = fitness(pop)
        for _ in range(self.generations):
            order = torch.rand(n, self.population, self.population, generator=g)
            eye = torch.eye(self.population, dtype=torch.bool)
            order = order.masked_fill(eye, 2.0).argsort(2)[..., :3]  # three others per individual
            a, b, c = (pop.gather(1, order[..., j:j + 1].expand(-1, -1, 3)) for j in range(3))
            mutant = a + self.f * (b - c)
            cross = torch.rand(n, self.population, 3, generator=g) < self.cr
            forced = torch.randint(0, 3, (n, self.population, 1), generator=g)
            cross = cross | F.one_hot(forced[..., 0], 3).bool()
            trial = torch.where(cross, mutant, pop)
            trial = torch.maximum(torch.minimum(trial, hi[:, None]), lo[:, None])
            fit_t, lab_t = fitness(trial)
            better = fit_t > fit
            pop = torch.where(better[..., None], trial, pop)
            fit = torch.where(better, fit_t, fit)
            lab = torch.where(better, lab_t, lab)
        best = fit.argmax(1)
        rows = torch.arange(n)
        return Extraction(score=fit[rows, best].float(), mask=square_masks(pop[rows, best], h, w),
                          pred=pred, masked_pred=lab[rows, best])

    # --- pieces -------------------------------------------------------------------------

    def _max_side(self, h: int, w: int) -> int:
        return max(self.min_side, int(math.floor(self.max_frac * min(h, w))))

    def _bounds(self, cam: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per input, the lower and upper bounds ``(N, 3)`` of (centre row, centre col, side): the
        bounding box of the CAM region and the side range."""
        region = cam >= self.cam_threshold  # (N, H, W); the maximum is always in it
        rows, cols = region.any(2), region.any(1)
        ar_h, ar_w = torch.arange(h).float(), torch.arange(w).float()
        r0 = torch.where(rows, ar_h, torch.full_like(ar_h, h)).min(1).values
        r1 = torch.where(rows, ar_h, torch.full_like(ar_h, -1)).max(1).values
        c0 = torch.where(cols, ar_w, torch.full_like(ar_w, w)).min(1).values
        c1 = torch.where(cols, ar_w, torch.full_like(ar_w, -1)).max(1).values
        n = len(cam)
        s_lo = torch.full((n,), float(self.min_side))
        s_hi = torch.full((n,), float(self._max_side(h, w)))
        return torch.stack([r0, c0, s_lo], 1), torch.stack([r1, c1, s_hi], 1)

    def _grad_module(self, clf: Classifier) -> nn.Module:
        src, _ = pick(clf, Capability.GRAD, who="cetf")
        module = getattr(src, "module", None)
        if not isinstance(module, nn.Module):
            raise BackdoorLabError(f"cetf: Grad-CAM needs a PyTorch module with gradients; the {clf.precision} "
                                   f"artifact's {type(src).__name__} has none")
        return module

    def _cam(self, clf: Classifier, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        module = self._grad_module(clf)
        p = next(iter(module.parameters()), None)
        buf = next(iter(module.buffers()), None)
        ref = p if p is not None else buf
        dev = ref.device if ref is not None else torch.device("cpu")
        key = id(module)
        if key not in self._layers:
            self._layers[key] = last_feature_map(module, x[:1].to(dev))
        out = []
        for s in range(0, len(x), 256):
            out.append(grad_cam(module, self._layers[key], x[s:s + 256].to(dev), cls[s:s + 256]).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _probs(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        out = [F.softmax(clf.logits(x[s:s + self.batch_size]).float(), dim=1).cpu()
               for s in range(0, len(x), self.batch_size)]
        return torch.cat(out)


__all__ = ["CETF", "Extraction", "grad_cam", "last_feature_map", "square_masks"]
