"""LF, the low-frequency ("smooth") trigger (Zeng, Park, Mao & Jia, "Rethinking the Backdoor
Attacks' Triggers: A Frequency Perspective", ICCV 2021).

The trigger is a universal adversarial perturbation (Moosavi-Dezfooli et al., CVPR 2017) found
against a *clean* model of the victim's architecture and kept smooth: after every DeepFool step
the perturbation passes a Gaussian low-pass filter, so it carries no high-frequency artifacts
that a frequency-domain detector could key on. It is then an additive trigger for ordinary data
poisoning: ``x' = clip(x + v, 0, 1)``, triggered images relabelled to the target.

Trigger search (:func:`lf_trigger`, the asset ``lf-trigger``), as Zeng et al.'s code and
BackdoorBench's ``resource/lowFrequency`` implement it:

* ``n_images = 100`` random images of the attacker's training split, visited in a new random
  order on every pass;
* for each image ``x`` whose prediction ``x + v`` does not change yet, a *targeted* DeepFool step
  toward the target class (``max_iter_df = 200`` iterations, ``overshoot = 0.02``; BackdoorBench's
  ``tar_deepfool``, its linearisation taken between the target and the starting class); when it
  converges, ``v <- smooth(v + smooth(dr))`` and ``v`` is rescaled to ``[0, amplitude]``
  (``amplitude = 0.2``, their ``normalization``; 51 grey levels at most);
* ``smooth`` is their Gaussian low-pass filter, depthwise, zero-padded to the same size:
  ``sigma = 6`` pixels, kernel length ``int(5 * sigma) = 30``;
* passes stop once the fooling rate (share of the ``n_images`` whose prediction ``v`` changes)
  reaches ``fooling_rate = 0.2`` (their ``delta = 0.8``), once the last ``plateau = 5`` passes'
  fooling rates lie within 0.01 of each other (BackdoorBench), or after ``max_passes = 50``
  (BackdoorBench's ``max_iter_uni``).

Differences, on purpose: the fooling rate is measured on the ``n_images`` training images (Zeng
et al.'s code) rather than on test images (BackdoorBench), since the attacker does not hold the
test set; the target class is the attack's ``target`` (BackdoorBench), not the "dominant label"
Zeng et al.'s script picks after the search; the float trigger is kept (BackdoorBench stores it as
uint8, i.e. truncated to whole grey levels); a DeepFool run that diverges (``|r| > 1000``) is
dropped at once instead of after its 200 iterations, which it would not survive either (see
:func:`deepfool_targeted`). For the ``all-to-all`` objective there is no single target, so the
search takes untargeted DeepFool steps (the original universal perturbation).

Cost: one image at a time, one forward and backward pass per DeepFool iteration (about 16
iterations per image on the GTSRB small CNN). On that model the fooling rate stays far below 0.2
(0.00-0.08 after every pass), so the search ends on the plateau stop: after 14 passes and 185 s
on 2 shared CPU cores for the GTSRB subset's seed 0 (BENCHMARKS.md).

The clean model is the pipeline's: :meth:`LowFrequency.assets` declares ``lf-trigger`` and the
builder asks ``ctx.model("none")`` for the cell's clean model (same architecture, recipe and seed,
from the artifact cache), so the search costs one clean training per cell plus the search itself.

Attack defaults: all-to-one, target 0, 10% poisoning (BackdoorBench ``config/attack/lf``).
Shapes: ``(N, C, H, W)`` float images in [0, 1]; the trigger is ``(C, H, W)`` in [0, amplitude].
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import DatasetInfo
from ..errors import check
from .base import AssetContext, Attack


def _number(name: str, v: Any, lo: float, hi: float | None = None, lo_open: bool = True) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
    where = f"{'>' if lo_open else '>='} {lo:g}" + ("" if hi is None else f" and <= {hi:g}")
    check(ok, f"lf: {name} must be a number {where}, got {v!r}")


def _integer(name: str, v: Any, lo: int) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"lf: {name} must be an integer >= {lo}, got {v!r}")


# ------------------------------------------------------------------------------- the low-pass filter
def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Zeng et al.'s 1-D Gaussian: ``int(5 * sigma)`` taps, standard deviation ``sigma`` pixels,
    centred between taps for an even length, summing to 1 (float64)."""
    n = max(1, int(5 * sigma))
    t = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smooth(v: torch.Tensor, sigma: float = 6.0) -> torch.Tensor:
    """Low-pass filter ``(..., C, H, W)`` channel by channel with :func:`gaussian_kernel`, zero
    padding, same size out (their ``gauss_smooth``: padding ``n//2 - (1 - n%2)`` before, ``n//2``
    after)."""
    k = gaussian_kernel(sigma).to(v)
    n = k.numel()
    before, after = n // 2 - (1 - n % 2), n // 2
    shape = v.shape
    c = shape[-3]
    x = v.reshape(-1, c, shape[-2], shape[-1])
    x = F.pad(x, (before, after, before, after))
    x = F.conv2d(x, k.view(1, 1, n, 1).expand(c, 1, n, 1), groups=c)
    x = F.conv2d(x, k.view(1, 1, 1, n).expand(c, 1, 1, n), groups=c)
    return x.reshape(shape)


def rescale(v: torch.Tensor, amplitude: float) -> torch.Tensor:
    """Their ``normalization``: ``v`` mapped affinely onto ``[0, amplitude]`` (left as is if flat)."""
    lo, hi = v.min(), v.max()
    if not bool(hi > lo):
        return v
    return (v - lo) / (hi - lo) * amplitude


# ------------------------------------------------------------------------------- DeepFool
DIVERGED = 1e3  # a DeepFool step this far outside [0, 1] will not come back (see deepfool_targeted)

def deepfool_targeted(model: nn.Module, x: torch.Tensor, target: int, overshoot: float = 0.02,
                      max_iter: int = 200) -> tuple[torch.Tensor, int]:
    """BackdoorBench's ``tar_deepfool`` for one image ``x`` ``(1, C, H, W)``: the smallest step, in the
    linearisation of ``f_target - f_start``, that moves the prediction to ``target``; repeated
    until it does or ``max_iter`` steps. Returns ``((1 + overshoot) * r_tot, iterations)``.

    A run whose step leaves the image range a thousandfold (``|r_tot| > 1000``) or stops being finite
    is returned at once as not converged (``max_iter`` iterations): the reference spends its 200
    iterations on it and discards it all the same (on the GTSRB clean model, 2 of 100 runs diverge,
    past 10 by iteration 27, to 1e26; the 98 others converge within 32 steps, below 2)."""
    x0 = x.detach()
    xi = x0.clone().requires_grad_(True)
    fs = model(xi)
    start = int(fs.argmax(1))
    r_tot = torch.zeros_like(x0)
    loops = 0
    while int(fs.argmax(1)) != target and loops < max_iter:
        diff = fs[0, target] - fs[0, start]
        (w,) = torch.autograd.grad(diff, xi)
        norm = w.norm()
        r_i = (diff.detach().abs() / norm) * w / norm
        if not bool(torch.isfinite(r_i).all()):
            r_i = torch.zeros_like(r_i)
        r_tot = r_tot + r_i
        if not bool(r_tot.abs().max() <= DIVERGED):  # also catches inf / nan
            return (1 + overshoot) * r_tot, max_iter
        xi = (x0 + (1 + overshoot) * r_tot).requires_grad_(True)
        fs = model(xi)
        loops += 1
    return (1 + overshoot) * r_tot, loops


def deepfool_untargeted(model: nn.Module, x: torch.Tensor, num_classes: int, overshoot: float = 0.02,
                        max_iter: int = 200) -> tuple[torch.Tensor, int]:
    """DeepFool (Moosavi-Dezfooli et al., CVPR 2016) for one image: the smallest linearised step
    across the nearest decision boundary, repeated until the prediction changes. Gradients of
    all ``num_classes`` logits come from one backward pass over ``num_classes`` copies of the
    image (the model is in eval mode, so the copies do not interact)."""
    x0 = x.detach()
    eye = torch.eye(num_classes, device=x0.device, dtype=x0.dtype)

    def logits_and_grads(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = xx.expand(num_classes, *xx.shape[1:]).clone().requires_grad_(True)
        out = model(rep)
        (g,) = torch.autograd.grad((out * eye).sum(), rep)
        return out[0].detach(), g

    f, grads = logits_and_grads(x0)
    start = int(f.argmax())
    r_tot = torch.zeros_like(x0)
    loops = 0
    while int(f.argmax()) == start and loops < max_iter:
        w = grads - grads[start]
        fk = f - f[start]
        dist = torch.nan_to_num(fk.abs() / w.flatten(1).norm(dim=1), nan=math.inf)
        dist[start] = math.inf
        k = int(dist.argmin())
        r_i = (dist[k] + 1e-4) * w[k:k + 1] / w[k].norm()
        if not bool(torch.isfinite(r_i).all()):
            r_i = torch.zeros_like(r_i)
        r_tot = r_tot + r_i
        if not bool(r_tot.abs().max() <= DIVERGED):
            return (1 + overshoot) * r_tot, max_iter
        f, grads = logits_and_grads(x0 + (1 + overshoot) * r_tot)
        loops += 1
    return (1 + overshoot) * r_tot, loops


# ------------------------------------------------------------------------------- the asset
@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def search_trigger(model: nn.Module, images: torch.Tensor, generator: torch.Generator, *, target: int | None,
                   num_classes: int, fooling_rate: float = 0.2, max_passes: int = 50, overshoot: float = 0.02,
                   max_iter_df: int = 200, sigma: float = 6.0, amplitude: float = 0.2,
                   plateau: int = 5, log: Callable[[str], None] | None = None) -> tuple[torch.Tensor, list[float]]:
    """The smooth universal perturbation for ``model`` (eval mode) on ``images`` ``(n, C, H, W)``
    in [0, 1] (see the module docstring); returns ``(v (C, H, W), fooling rate after each pass)``.
    ``target=None``: untargeted DeepFool steps. ``log`` receives one line per pass."""
    dev = images.device
    clean = _predict(model, images)
    v = torch.zeros_like(images[0])
    rates: list[float] = []
    for _ in range(max_passes):
        for k in torch.randperm(len(images), generator=generator).tolist():
            x = images[k:k + 1]
            with torch.no_grad():
                moved = int(model(x + v).argmax(1)) != int(clean[k])
            if moved:
                continue
            if target is None:
                dr, iters = deepfool_untargeted(model, x + v, num_classes, overshoot, max_iter_df)
            else:
                dr, iters = deepfool_targeted(model, x + v, target, overshoot, max_iter_df)
            if iters < max_iter_df - 1:  # converged
                v = smooth(v + smooth(dr[0], sigma), sigma)
                v = rescale(v, amplitude)
        rate = float((_predict(model, images + v.to(dev)) != clean).float().mean())
        rates.append(rate)
        if log is not None:
            log(f"lf: pass {len(rates)}: fooling rate {rate:.3f} (stops at {fooling_rate})")
        if rate >= fooling_rate:
            break
        last = rates[-plateau:]
        if plateau and len(last) == plateau and max(last) - min(last) < 0.01:
            break
    return v, rates


def lf_trigger(ctx: AssetContext, target: int | None = 0, n_images: int = 100, fooling_rate: float = 0.2,
               max_passes: int = 50, overshoot: float = 0.02, max_iter_df: int = 200, sigma: float = 6.0,
               amplitude: float = 0.2, plateau: int = 5) -> dict[str, torch.Tensor]:
    """Asset builder ``lf-trigger``: the LF trigger for the cell's clean model (``ctx.model("none")``)
    from ``n_images`` images of the attacker's training split. Returns ``trigger`` ``(C, H, W)``
    float in [0, amplitude], ``fooling_rates`` (one per pass) and ``images`` (their indices)."""
    check(target is None or (isinstance(target, int) and not isinstance(target, bool)
                             and 0 <= target < ctx.info.num_classes),
          f"lf: target must be a class label in [0, {ctx.info.num_classes - 1}] or null, got {target!r}")
    _integer("n_images", n_images, 1)
    _number("fooling_rate", fooling_rate, 0, 1)
    _integer("max_passes", max_passes, 1)
    _number("overshoot", overshoot, 0, lo_open=False)
    _integer("max_iter_df", max_iter_df, 2)
    _number("sigma", sigma, 0)
    _number("amplitude", amplitude, 0, 1)
    _integer("plateau", plateau, 0)
    model = copy.deepcopy(ctx.model("none")).to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    idx = torch.randperm(len(ctx.train), generator=ctx.generator)[:n_images]
    images = ctx.train.subset(idx).float().to(ctx.device)
    v, rates = search_trigger(model, images, ctx.generator, target=target, num_classes=ctx.info.num_classes,
                              fooling_rate=fooling_rate, max_passes=max_passes, overshoot=overshoot,
                              max_iter_df=max_iter_df, sigma=sigma, amplitude=amplitude, plateau=plateau)
    return {"trigger": v.detach().cpu().float(), "fooling_rates": torch.tensor(rates), "images": torch.sort(idx).values}


# ------------------------------------------------------------------------------- the attack
class LowFrequency(Attack):
    """Data poisoning with the smooth trigger of the ``lf-trigger`` asset; the search's settings
    (``n_images`` ... ``plateau``) are this attack's and enter the asset's cache key."""

    name = "lf"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 n_images: int = 100, fooling_rate: float = 0.2, max_passes: int = 50, overshoot: float = 0.02,
                 max_iter_df: int = 200, sigma: float = 6.0, amplitude: float = 0.2, plateau: int = 5,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        _integer("n_images", n_images, 1)
        _number("fooling_rate", fooling_rate, 0, 1)
        _integer("max_passes", max_passes, 1)
        _number("overshoot", overshoot, 0, lo_open=False)
        _integer("max_iter_df", max_iter_df, 2)
        _number("sigma", sigma, 0)
        _number("amplitude", amplitude, 0, 1)
        _integer("plateau", plateau, 0)
        self.search = {"n_images": n_images, "fooling_rate": fooling_rate, "max_passes": max_passes,
                       "overshoot": overshoot, "max_iter_df": max_iter_df, "sigma": sigma, "amplitude": amplitude,
                       "plateau": plateau}
        self.trigger: torch.Tensor | None = None

    def assets(self) -> dict[str, Any]:
        target = None if self.mode == "all-to-all" else self.target
        return {"trigger": {"name": "lf-trigger", "target": target, **self.search}}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        v = assets["trigger"]["trigger"]
        c, s = self.info.channels, self.info.size
        if tuple(v.shape) != (c, s, s):
            raise RuntimeError(f"lf: trigger asset has shape {tuple(v.shape)}, expected {(c, s, s)}")
        self.trigger = v.float().clone()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.trigger is None:
            raise RuntimeError("lf: the trigger asset is not bound; build the attack through the pipeline "
                               "(Pipeline.attack) or call bind_assets first")
        return (x + self.trigger.to(x)).clamp(0, 1)
