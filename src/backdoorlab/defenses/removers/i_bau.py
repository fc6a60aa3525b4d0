"""i-BAU (Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient", ICLR 2022, arXiv:2110.03735).

Backdoor removal as a minimax problem on the defender's clean data ``D = {(x_i, y_i)}``::

    min_theta  max_{||delta||_2 <= C}  H(delta, theta) = 1/n sum_i L(f_theta(x_i + delta), y_i)

The inner player is a **universal** perturbation ``delta`` (one ``(1, C, H, W)`` tensor added to
every image), the stand-in for the unknown trigger; the outer player is the model. Because the
inner maximiser ``delta*(theta)`` depends on ``theta``, the outer gradient is the *implicit
hypergradient*

    dH/dtheta = d_theta L1 + (d delta*/d theta)^T d_delta L1,

computed without unrolling the inner solver from the fixed-point equation of one inner
gradient step ``Phi(delta, theta) = delta - a * grad_delta L2(delta, theta)``: ``v`` solves
``v = (d_delta Phi)^T v + d_delta L1`` (``K`` fixed-point iterations from ``v = 0``), and the
hypergradient is ``d_theta L1 + (d_theta Phi)^T v`` (Grazzi et al. 2020, "On the iteration
complexity of hypergradient computation", the ``fixed_point`` routine of the authors' code).

One **round** (as in the authors' ``defense.py`` and GTSRB notebook, YiZeng623/I-BAU):

1. **Inner maximisation.** ``delta`` starts at 0 and takes one Adam step (``pert_lr=1``, the GTSRB
   notebook's) per clean batch, one pass over the data, on
   ``-CE(f(clip(x + delta)), argmax f(x)) + 0.001 ||delta||^2`` (the model's own predictions as
   labels), then is projected onto the L2 ball of radius ``norm_bound=10`` (the notebook's
   ``pert * min(1, 10 / ||pert||)``).
2. **Outer (unlearning) step.** For every clean batch, one Adam step (``lr=1e-3``, the authors'
   default) on the model with the implicit hypergradient, where
   ``L1 = CE(f(clip(x + delta_masked)), y)`` with ``delta`` added to a random ``portion=0.01`` of
   the batch (at least one image) and ``L2 = -CE(f(clip(x_0 + delta)), y_0) + 0.001 ||delta||^2``
   on the first batch ``x_0`` (the authors' ``loss_outer`` / ``loss_inner``); the fixed-point map
   takes a gradient step of ``inner_lr=0.1`` and is iterated ``K=5`` times.

Defaults are the authors' (``defense.py``: ``n_rounds=5``, ``K=5``, Adam ``lr=0.001``,
``batch_size=100``; the GTSRB notebook: perturbation Adam ``lr=1``, ``||delta||_2 <= 10``, pixel
clipping). BackdoorBench's ``config/defense/i-bau`` keeps ``n_rounds=5``, ``K=5`` but uses
Adam ``lr=1e-4`` and batch 256 over 5% of the training set; with the ~300-image holdout of the
GTSRB tests that is 10 outer steps in all at a tenth of the authors' rate.

Here:

* The model stays in eval mode throughout, as in both reference implementations (BatchNorm
  running statistics are kept; its affine parameters are trained). The caller's ``ctx.model``
  is deep-copied, never changed; the repaired FP32 model is deployed as the cell deploys
  (``ctx.redeploy``).
* The clean holdout is cut into batches once with ``ctx.generator`` (the authors' unlearning
  loader does not shuffle); the random ``portion`` of each batch also comes from ``ctx.generator``.
* Inputs are ``(N, C, H, W)`` float in [0, 1]; models normalise internally, so ``delta`` lives in
  pixel space, as in the authors' notebook (BackdoorBench perturbs normalised images). The
  authors' ``defense.py`` neither clips nor projects; the GTSRB notebook does both, as here.
* The model and batches run in ``channels_last`` (about 3x faster double backward on CPU).
* Cost: each outer step differentiates through one inner gradient step ``K + 2`` times (Hessian-
  vector products on the first batch), about 20 forward passes of a batch.

Measured (GTSRB BadNets, small-cnn, 300-image holdout, 5 rounds = 15 outer steps, about a minute on
2 CPU cores): at the defaults ASR 0.936 -> 0.000 but CA 0.961 -> 0.893-0.907. The cost is the
outer Adam at ``lr=1e-3`` on so little data (the authors unlearn on 5,000 images, 50 steps a
round): 15 steps of plain clean fine-tuning with the same Adam cost 4 points as well (CA 0.921)
and leave ASR at 0.913. With ``lr=3e-4``: ASR 0.042, CA 0.934 (FP32), ASR 0.021, CA 0.931
(int8-torch); with BackdoorBench's ``1e-4`` ASR only falls to 0.872.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Remover


def _grads(out: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: torch.Tensor | None = None,
           retain_graph: bool = False) -> list[torch.Tensor]:
    """``d out / d inputs`` (vector-Jacobian product with ``grad_outputs``), zeros where unused."""
    gs = torch.autograd.grad(out, list(inputs), grad_outputs=grad_outputs, retain_graph=retain_graph,
                             allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


def implicit_hypergradient(delta: torch.Tensor, params: Sequence[torch.Tensor], K: int,
                           fp_map: Callable[[torch.Tensor], torch.Tensor],
                           outer_loss: Callable[[torch.Tensor], torch.Tensor],
                           tol: float = 1e-10) -> tuple[list[torch.Tensor], int]:
    """The hypergradient ``dL1/dparams`` at the inner solution ``delta`` by ``K`` fixed-point
    iterations (Grazzi et al. 2020), and the iterations run.

    ``fp_map(d)``: one differentiable inner step (a function of ``d`` and of ``params``, which it
    closes over); ``outer_loss(d)``: the outer objective. Both must build graphs through
    ``params``. Returns one gradient per parameter (same shapes).
    """
    d = delta.detach().requires_grad_(True)
    g_d, *g_p = _grads(outer_loss(d), [d, *params])
    mapped = fp_map(d)
    v = torch.zeros_like(d)
    its = 0
    for _ in range(K):
        prev = v
        v = _grads(mapped, [d], grad_outputs=v, retain_graph=True)[0] + g_d
        its += 1
        if float(torch.linalg.vector_norm(v - prev)) < tol:
            break
    g_map = _grads(mapped, params, grad_outputs=v)
    return [a + b for a, b in zip(g_p, g_map)], its


def _number(name: str, v: Any, lo: float, hi: float | None = None, lo_open: bool = True) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
    where = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi is None else f"in ({lo:g}, {hi:g}]"
    check(ok, f"i-bau: {name} must be a number {where}, got {v!r}")


def _integer(name: str, v: Any, lo: int) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"i-bau: {name} must be an integer >= {lo}, got {v!r}")


@DEFENSES.register("i-bau")
class IBAU(Remover):
    """i-BAU (Zeng et al., ICLR 2022): minimax unlearning of a universal adversarial perturbation
    with the implicit hypergradient.

    ``n_rounds``: rounds of (inner maximisation, one pass of outer steps). ``K``: fixed-point
    iterations of the hypergradient. ``lr``: the model's Adam learning rate. ``batch_size``: clean
    images per step. ``norm_bound``: L2 radius of the perturbation (pixel units, images in
    [0, 1]). ``pert_lr``: the perturbation's Adam learning rate. ``inner_lr``: the step of the
    fixed-point map. ``portion``: share of each outer batch that carries the perturbation.
    ``reg``: weight of ``||delta||^2`` in the inner loss.
    """

    name = "i-bau"

    def __init__(self, n_rounds: int = 5, K: int = 5, lr: float = 0.001, batch_size: int = 100,
                 norm_bound: float = 10.0, pert_lr: float = 1.0, inner_lr: float = 0.1, portion: float = 0.01,
                 reg: float = 0.001):
        _integer("n_rounds", n_rounds, 1)
        _integer("K", K, 1)
        _number("lr", lr, 0)
        _integer("batch_size", batch_size, 1)
        _number("norm_bound", norm_bound, 0)
        _number("pert_lr", pert_lr, 0)
        _number("inner_lr", inner_lr, 0)
        _number("portion", portion, 0, 1)
        _number("reg", reg, 0, lo_open=False)
        self.n_rounds, self.K, self.batch_size = n_rounds, K, batch_size
        self.lr, self.norm_bound, self.pert_lr = float(lr), float(norm_bound), float(pert_lr)
        self.inner_lr, self.portion, self.reg = float(inner_lr), float(portion), float(reg)

    def _perturbation(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Step 1: the universal perturbation ``(1, C, H, W)``, one Adam step per batch, projected
        onto the L2 ball."""
        delta = torch.zeros((1, *batches[0][0].shape[1:]), device=batches[0][0].device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.pert_lr)
        for xb, _ in batches:
            with torch.no_grad():
                pred = model(xb).argmax(1)
            loss = -F.cross_entropy(model((xb + delta).clamp(0, 1)), pred) + self.reg * delta.pow(2).sum()
            (g,) = torch.autograd.grad(loss, [delta])
            delta.grad = g
            opt.step()
        with torch.no_grad():
            norm = float(torch.linalg.vector_norm(delta))
            return (delta * min(1.0, self.norm_bound / max(norm, 1e-12))).detach()

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        check(ctx.model is not None, "i-bau needs the FP32 model the artifact was deployed from")
        check(len(ctx.clean) > 0, "i-bau needs clean holdout data")
        dev, g = ctx.device, ctx.generator
        model = copy.deepcopy(ctx.model).float().to(dev).to(memory_format=torch.channels_last).eval()
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        x, y = ctx.clean.float(), ctx.clean.y.long()
        perm = torch.randperm(len(y), generator=g)
        batches = [(x[idx].to(dev).contiguous(memory_format=torch.channels_last), y[idx].to(dev))
                   for idx in perm.split(self.batch_size)]
        x0, y0 = batches[0]
        opt = torch.optim.Adam(params, lr=self.lr)

        def inner_loss(d: torch.Tensor) -> torch.Tensor:
            return -F.cross_entropy(model((x0 + d).clamp(0, 1)), y0) + self.reg * d.pow(2).sum()

        def fp_map(d: torch.Tensor) -> torch.Tensor:
            (gd,) = torch.autograd.grad(inner_loss(d), [d], create_graph=True)
            return d - self.inner_lr * gd

        norms, fooled, fp_iters, steps = [], [], 0, 0
        for _ in range(self.n_rounds):
            delta = self._perturbation(model, batches)
            norms.append(float(torch.linalg.vector_norm(delta)))
            with torch.no_grad():  # share of the holdout whose prediction the perturbation changes
                flips = sum(int((model((xb + delta).clamp(0, 1)).argmax(1) != model(xb).argmax(1)).sum())
                            for xb, _ in batches)
            fooled.append(flips / len(y))
            for xb, yb in batches:
                m = max(1, int(len(yb) * self.portion))
                chosen = torch.randperm(len(yb), generator=g)[:m].to(dev)
                mask = torch.zeros(len(yb), 1, 1, 1, device=dev)
                mask[chosen] = 1.0

                def outer_loss(d: torch.Tensor, xb=xb, yb=yb, mask=mask) -> torch.Tensor:
                    return F.cross_entropy(model((xb + mask * d).clamp(0, 1)), yb)

                grads, its = implicit_hypergradient(delta, params, self.K, fp_map, outer_loss)
                fp_iters += its
                opt.zero_grad(set_to_none=True)
                for p, gp in zip(params, grads):
                    p.grad = gp
                opt.step()
                steps += 1
        model = model.to(memory_format=torch.contiguous_format).eval()
        for p in model.parameters():
            p.grad = None
        facts = {"rounds": self.n_rounds, "outer_steps": steps, "pert_steps": self.n_rounds * len(batches),
                 "fixed_point_K": self.K, "fixed_point_iters": fp_iters, "lr": self.lr, "batch_size": self.batch_size,
                 "norm_bound": self.norm_bound, "pert_norm": norms[-1], "pert_norm_max": max(norms),
                 "pert_fooled_first": fooled[0], "pert_fooled_last": fooled[-1]}
        return ctx.deploy(model), facts


__all__ = ["IBAU", "implicit_hypergradient"]
