"""Is the backdoor gone, or only dormant? (Zhu, Liang & Wu, "Breaking the False Sense of Security
in Backdoor Defense through Re-Activation Attack", NeurIPS 2024, openreview E2odGznGim.)

After a repair the attack success rate may be near zero while the backdoor's machinery is still
in the model. The paper measures that with the **backdoor existence coefficient** and shows it by
**re-activating** the backdoor with a small universal perturbation added to the trigger.

BEC (:func:`bec`), per the authors' ``BEC/analy_backdoor_*.py``:

1. *Backdoor-related neurons.* In every conv layer of the backdoored model ``A`` (read after its
   BatchNorm, so that a model whose BatchNorm was folded into its convs compares at the same
   point; the authors read the conv output, which differs from it by a per-channel affine map), each channel's
   trigger activation change (TAC) is the mean over images of the spatially averaged
   ``|a(x + trigger) - a(x)|`` (the authors' ``sort_standard = diff``); the top ``top`` share of
   channels (5%, 10% or 20% in the paper; 10% here) are the backdoor-related ones.
2. *Similarity.* On the triggered images, the feature maps of those channels (channels x
   positions, flattened) of ``A`` and of the repaired model ``D`` are compared with linear CKA.
3. *Coefficient.* The mean over layers of ``(CKA(A, D) - CKA(A, C)) / (1 - CKA(A, C))``, with
   ``C`` a clean model of the same architecture trained on the same clean data: 1 when the
   repaired model's backdoor neurons respond to the trigger as the backdoored model's do
   (CKA(A, A) = 1), 0 when they respond as a model that never had a backdoor. The authors
   report the mean CKA with the clean model as their reference row; the normalised form is
   what the issue asks for, and the raw CKAs are kept beside it (``bec_cka_repaired``,
   ``bec_cka_clean``).

Re-activation attacks (universal perturbations ``delta``, ``||delta||_inf <= eps = 0.05``, added
to the triggered image and clipped to [0, 1]):

* **White-box** (:func:`reactivate_whitebox`, the authors' ``reattack/wb_attack.py``): ``delta``
  starts uniform in ``[-eps, eps]`` and descends
  ``CE(f(x_t + delta), target) + NLL(log(1 - p_{y'}), y')``, where ``y'`` is the most likely
  label other than the target, then is clipped back into the ball. The gradient comes from the
  artifact where it has one, else from its fake-quant surrogate (:func:`~.base.pick`).
  Deviation: the authors step with plain SGD (lr 0.05) on the raw gradient; on the small CNN of
  the GTSRB tests that gradient (batch-mean, per pixel) is so small that 250 such steps left
  ``delta`` near its random start (re-activated ASR 0.21 where a signed step reaches far more),
  so each step here is a signed one, ``lr * sign(grad)`` with ``lr = eps / 10`` (PGD's step, free
  of the model's gradient scale).
* **Black-box** (:func:`reactivate_blackbox`): query-based. The paper uses the Square attack
  (Andriushchenko et al., ECCV 2020) on the defense model's outputs; here its L_inf form made
  universal: ``delta`` starts as vertical stripes of ``+-eps``, each query proposes a random
  square window (side from the Square attack's schedule over the query budget) set to a random
  ``+-eps`` per channel, and keeps it if the margin loss of the target over the crafting images,
  read from the **deployed artifact's** logits only, decreases.
* **Transfer** (:func:`reactivate_transfer`, the authors' ``reattack/ta_attack.py`` with
  ``attack_type avg``): the white-box loss averaged over surrogate repaired models the attacker
  builds without the victim's repair: the backdoored model itself and a copy fine-tuned on the
  attacker's clean images (the FT repair, the baseline every paper compares with); the
  perturbation is then applied to the victim's deployed artifact.

Deviation: the authors craft ``delta`` on 1,000 poisoned *training* samples. Here the attacker
triggers images of their own: the counted test images (those the attack may flip) are split in
two by a fixed generator; ``delta`` is crafted on the first half (at most ``n_craft``) and the
re-activated ASR is measured on the second (at most ``n_eval``), so it is never scored on the
images it was fitted to. As the control the paper discusses (is it a re-activation or merely a
universal adversarial perturbation?), the same white-box attack is run on the clean model ``C``:
``reactivated_asr_clean_model`` is what a perturbation of that size achieves with no backdoor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..errors import check
from .base import pick

BATCH = 256
MIN_GAP = 0.05  # BEC leaves out layers where the clean model's CKA with the backdoored one exceeds 0.95


# ------------------------------------------------------------------------------------------ BEC
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) of ``x`` ``(n, p)`` and ``y`` ``(n, q)``:
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``,
    computed from ``n x n`` Gram matrices (n is small here, the widths are not)."""
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    kx, ky = x @ x.T, y @ y.T
    hsic = (kx * ky).sum()
    den = kx.norm() * ky.norm()
    return float(hsic / den) if den > 0 else 0.0


def conv_layers(model: nn.Module) -> list[str]:
    """The probe points BEC averages over: every ``Conv2d`` of ``model`` (the authors' "Conv"),
    read after the ``BatchNorm2d`` that directly follows it in a ``Sequential`` where there is one,
    or after the ``Identity`` that replaced it when the BatchNorm was folded into the conv (an
    int4 or int8 artifact's weights), so that a folded and an unfolded model compare at the same
    point. Names are the modules whose output is read."""
    out = []
    for pname, parent in model.named_modules():
        kids = list(parent.named_children())
        for i, (cname, child) in enumerate(kids):
            if not isinstance(child, nn.Conv2d):
                continue
            name = f"{pname}.{cname}" if pname else cname
            if isinstance(parent, nn.Sequential) and i + 1 < len(kids) and isinstance(
                    kids[i + 1][1], (nn.BatchNorm2d, nn.Identity)):
                name = f"{pname}.{kids[i + 1][0]}" if pname else kids[i + 1][0]
            out.append(name)
    return out


@torch.no_grad()
def conv_outputs(model: nn.Module, x: torch.Tensor, layers: list[str], device: torch.device) -> list[torch.Tensor]:
    """The outputs ``(N, C, H, W)`` of ``layers`` of the FP32 ``model`` on ``x`` (on the CPU)."""
    named = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [named[n].register_forward_hook(lambda m, i, o, n=n: out[n].append(o.detach().float().cpu()))
               for n in layers]
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), BATCH):
            model(x[i:i + BATCH].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return [torch.cat(out[n]) for n in layers]


def bec(backdoored: nn.Module, repaired: nn.Module, clean: nn.Module, x: torch.Tensor, x_trig: torch.Tensor,
        top: float = 0.1, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Backdoor existence coefficient of ``repaired`` (see the module docstring).

    ``x``: ``(N, C, H, W)`` clean images in [0, 1]; ``x_trig``: the same images with the trigger
    (paired, for the trigger activation change). The backdoored and clean models share one
    architecture; the repaired one has a module at each of its probe points (a repair may insert
    layers between them, as Neural Polarizer does, and is then read at the same points).
    Returns ``bec`` (mean over conv layers of the normalised similarity; ``None`` if no layer
    tells the backdoored model from a clean one), ``bec_layers`` (per layer, ``None`` where the
    clean model's CKA is within ``MIN_GAP`` of 1), ``bec_cka_repaired`` and ``bec_cka_clean``
    (mean raw CKAs) and ``bec_top``."""
    check(0 < top <= 1, f"bec: top must be in (0, 1], got {top!r}")
    device = torch.device(device)
    layers = conv_layers(backdoored)
    named = dict(repaired.named_modules())
    check(bool(layers) and layers == conv_layers(clean) and all(n in named for n in layers),
          "bec: the backdoored, repaired and clean models must share one architecture with conv layers")
    a_clean = conv_outputs(backdoored, x, layers, device)
    a_trig = conv_outputs(backdoored, x_trig, layers, device)
    d_trig = conv_outputs(repaired, x_trig, layers, device)
    c_trig = conv_outputs(clean, x_trig, layers, device)
    per_layer: list[float | None] = []
    raw_d, raw_c = [], []
    for ac, at, dt, ct in zip(a_clean, a_trig, d_trig, c_trig, strict=True):
        tac = (at - ac).abs().mean(dim=(2, 3)).mean(0)  # (C,) trigger activation change per channel
        k = max(1, int(len(tac) * top))
        idx = torch.topk(tac, k).indices
        s_d = linear_cka(at[:, idx], dt[:, idx])
        s_c = linear_cka(at[:, idx], ct[:, idx])
        raw_d.append(s_d)
        raw_c.append(s_c)
        # where a clean model already responds as the backdoored one (CKA above 1 - MIN_GAP), the
        # layer says nothing about the backdoor and its ratio would divide by almost 0: left out
        per_layer.append((s_d - s_c) / (1 - s_c) if s_c < 1 - MIN_GAP else None)
    used = [v for v in per_layer if v is not None]
    return {"bec": sum(used) / len(used) if used else None, "bec_layers": per_layer,
            "bec_cka_repaired": sum(raw_d) / len(raw_d), "bec_cka_clean": sum(raw_c) / len(raw_c), "bec_top": top}


# ------------------------------------------------------------------------------ re-activation
def _apply(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (x + delta).clamp(0.0, 1.0)


def _wb_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' white-box loss: CE towards the target, plus pushing down the most likely
    other label ``y'`` through ``-log(1 - p_{y'})``."""
    probs = F.softmax(logits, dim=1)
    top2 = probs.argsort(dim=1)[:, -2:]
    other = torch.where(top2[:, -1] == target, top2[:, -2], top2[:, -1])
    loss2 = F.nll_loss(torch.log(1.0001 - probs + 1e-12), other)
    return F.cross_entropy(logits, target) + loss2


def reactivate_whitebox(models: list[Any], x: torch.Tensor, target: torch.Tensor, *, eps: float = 0.05,
                        steps: int = 250, lr: float = 0.005, batch_size: int = 128,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A universal ``delta`` ``(1, C, H, W)`` with ``||delta||_inf <= eps`` that sends the triggered
    images ``x`` to ``target`` (``(N,)``) on ``models`` (callables returning logits, differentiable
    in their input; the loss is averaged over them: one model is the white-box attack, several
    the transfer attack). ``steps`` signed-gradient steps of size ``lr`` over mini-batches drawn
    in turn from ``x``."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    delta = (torch.rand((1, *x.shape[1:]), generator=g) * 2 - 1) * eps
    delta.requires_grad_(True)
    order = torch.randperm(len(x), generator=g)
    for step in range(steps):
        i = (step * batch_size) % len(x)
        idx = order[i:i + batch_size]
        if len(idx) == 0:
            continue
        xb, tb = x[idx], target[idx]
        loss = sum(_wb_loss(m(_apply(xb.to(delta.device), delta)), tb) for m in models) / len(models)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= lr * grad.sign()
            delta.clamp_(-eps, eps)
    return delta.detach()


def _margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``max_{j != t} z_j - z_t`` (negative once the target wins)."""
    zt = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, target[:, None], float("-inf"))
    return (other.max(1).values - zt).mean()


def _square_side(it: int, n_iters: int, p_init: float, hw: int) -> int:
    """The Square attack's schedule of the square's area share ``p`` (halved at fixed fractions
    of the budget, for 10,000 iterations rescaled to ``n_iters``), as a side length in pixels."""
    it = int(it / n_iters * 10000)
    p = p_init
    for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000):
        if it > bound:
            p /= 2
    return max(1, min(hw - 1, int(round(math.sqrt(p * hw * hw)))))


@torch.no_grad()
def reactivate_blackbox(clf: Classifier, x: torch.Tensor, target: torch.Tensor, *, eps: float = 0.05,
                        queries: int = 2000, p_init: float = 0.05, batch: int = 100,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """A universal ``delta`` found from ``clf``'s logits alone (the deployed artifact, no
    gradient): the Square attack's L_inf random search made universal (module docstring).
    Returns ``(delta, queries used)``; one query is one forward pass over ``batch`` of the
    crafting images (a fixed random subset, so that losses compare)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    keep = torch.randperm(len(x), generator=g)[:batch]
    x, target = x[keep], target[keep]
    c, h, w = x.shape[1:]
    # vertical stripes of +-eps, the Square attack's initialisation
    delta = eps * (torch.randint(0, 2, (1, c, 1, w), generator=g).float() * 2 - 1).expand(1, c, h, w).clone()

    def loss(d: torch.Tensor) -> float:
        return float(_margin(_logits(clf, _apply(x, d)), target))

    best = loss(delta)
    used = 1
    for it in range(queries - 1):
        s = _square_side(it, queries, p_init, min(h, w))
        r = int(torch.randint(0, h - s + 1, (1,), generator=g))
        col = int(torch.randint(0, w - s + 1, (1,), generator=g))
        cand = delta.clone()
        cand[0, :, r:r + s, col:col + s] = eps * (torch.randint(0, 2, (c, 1, 1), generator=g).float() * 2 - 1)
        if torch.equal(cand, delta):
            continue
        val = loss(cand)
        used += 1
        if val < best:
            best, delta = val, cand
    return delta, used


def _logits(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([clf.logits(x[i:i + BATCH]).float().cpu() for i in range(0, len(x), BATCH)])


@torch.no_grad()
def asr_with(clf: Classifier, x: torch.Tensor, target: torch.Tensor, delta: torch.Tensor | None) -> float:
    """Share of triggered images ``x`` (plus ``delta``) that ``clf`` sends to ``target``."""
    xx = x if delta is None else _apply(x, delta.cpu())
    return float((_logits(clf, xx).argmax(1) == target).float().mean())


# ----------------------------------------------------------------------------- the row's part
@dataclass(frozen=True)
class Dormancy:
    """Settings of the dormant-backdoor measurement (the paper's ``eps`` 0.05 L_inf; BEC over the
    top 10% of channels). ``wb_steps``, ``wb_lr``: signed steps of the white-box and transfer
    attacks (the authors: 50 outer x 5 inner steps per batch of 1,000 samples); ``queries``: the
    black-box budget, ``bb_batch`` crafting images per query; ``ft_epochs``, ``ft_lr``: the
    transfer attacker's fine-tuned surrogate."""

    eps: float = 0.05
    top: float = 0.1
    n_craft: int = 500
    n_eval: int = 1000
    wb_steps: int = 250
    wb_lr: float = 0.005
    queries: int = 2000
    bb_batch: int = 100
    ft_epochs: int = 10
    ft_lr: float = 0.01


def dormancy_settings(value: Any, what: str) -> Dormancy | str | None:
    """A remover's ``dormancy`` option: ``false`` (off), ``true`` (the defaults) or a mapping of
    :class:`Dormancy` fields, checked here (one line naming the field)."""
    import dataclasses

    from ..config import check_fields
    from ..errors import BackdoorLabError

    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if not isinstance(value, dict):
        raise BackdoorLabError(f"{what} must be true, false or a mapping of settings, got {value!r}")
    names = {f.name for f in dataclasses.fields(Dormancy)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise BackdoorLabError(f"{what} has no setting {unknown[0]!r} (settings: {', '.join(sorted(names))})")
    cfg = Dormancy(**value)
    check_fields(cfg, what)
    for k in ("eps", "top"):
        check(0 < getattr(cfg, k) <= 1, f"{what} {k} must be in (0, 1], got {getattr(cfg, k)!r}")
    for k in ("n_craft", "n_eval", "wb_steps", "queries", "bb_batch", "ft_epochs"):
        check(getattr(cfg, k) >= 1, f"{what} {k} must be >= 1, got {getattr(cfg, k)!r}")
    for k in ("wb_lr", "ft_lr"):
        check(getattr(cfg, k) > 0, f"{what} {k} must be > 0, got {getattr(cfg, k)!r}")
    return cfg


def _grad_fn(clf: Classifier):
    """A differentiable logits function of ``clf`` (the artifact or its surrogate) and which ran."""
    g_clf, where = pick(clf, Capability.GRAD, who="the white-box re-activation attack")
    return (lambda xb: g_clf.logits(xb).float().cpu()), where


def _requires_grad_off(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dormancy(*, backdoored: nn.Module, repaired: nn.Module, clean: nn.Module, deployed: Classifier,
             attack: Any, test: Any, device: torch.device | str = "cpu", settings: Dormancy = Dormancy(),
             generator: torch.Generator | None = None) -> dict[str, Any]:
    """BEC of the repaired FP32 model and the re-activated ASR of the repaired model **as
    deployed** (white-box, black-box, transfer), with the clean model's control, for the row."""
    from ..train.fit import TrainConfig, fit

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    device = torch.device(device)
    counted = attack.counted(test.y).nonzero().flatten()
    order = counted[torch.randperm(len(counted), generator=g)]
    half = len(order) // 2
    craft_idx, eval_idx = order[:half][:settings.n_craft], order[half:][:settings.n_eval]
    x_craft = test.subset(craft_idx).float()
    xt_craft, t_craft = attack.apply(x_craft), attack.target_labels(test.y[craft_idx]).long()
    x_eval = test.subset(eval_idx).float()
    xt_eval, t_eval = attack.apply(x_eval), attack.target_labels(test.y[eval_idx]).long()

    from ..errors import BackdoorLabError

    try:
        out: dict[str, Any] = bec(backdoored, repaired, clean, x_craft, xt_craft, top=settings.top, device=device)
    except BackdoorLabError as exc:  # e.g. a repair that hands over a rebuilt (quantized) model: no BEC
        out = {"bec": None, "bec_note": str(exc)}
    out["reactivation_eps"] = settings.eps
    out["reactivation_n_craft"], out["reactivation_n_eval"] = len(craft_idx), len(eval_idx)
    out["asr_after_eval_half"] = asr_with(deployed, xt_eval, t_eval, None)

    try:
        fn, where = _grad_fn(deployed)
    except BackdoorLabError as exc:  # no gradient and no surrogate: the black-box parts still run
        out["reactivated_asr_whitebox"], out["reactivation_grad_on"] = None, None
        out["reactivation_note"] = str(exc)
    else:
        d_wb = reactivate_whitebox([fn], xt_craft, t_craft, eps=settings.eps, steps=settings.wb_steps,
                                   lr=settings.wb_lr, generator=g)
        out["reactivated_asr_whitebox"] = asr_with(deployed, xt_eval, t_eval, d_wb)
        out["reactivation_grad_on"] = where

    d_bb, used = reactivate_blackbox(deployed, xt_craft, t_craft, eps=settings.eps, queries=settings.queries,
                                     batch=settings.bb_batch, generator=g)
    out["reactivated_asr_blackbox"] = asr_with(deployed, xt_eval, t_eval, d_bb)
    out["reactivation_queries"] = used

    # transfer: surrogates the attacker builds without the victim's repair
    from ..data.tensordata import TensorData

    ft = fit(copy.deepcopy(backdoored).float(), TensorData(x_craft, test.y[craft_idx]),
             TrainConfig(epochs=settings.ft_epochs, batch_size=64, lr=settings.ft_lr, schedule="cosine"),
             generator=g, device=device).model.eval()
    surrogates = [_requires_grad_off(copy.deepcopy(backdoored).float().eval().to(device)),
                  _requires_grad_off(ft.to(device))]
    fns = [(lambda xb, m=m: _first(m(xb.to(device))).float().cpu()) for m in surrogates]
    d_tr = reactivate_whitebox(fns, xt_craft, t_craft, eps=settings.eps, steps=settings.wb_steps,
                               lr=settings.wb_lr, generator=g)
    out["reactivated_asr_transfer"] = asr_with(deployed, xt_eval, t_eval, d_tr)

    # control: the same white-box attack on a model that never had the backdoor
    c = _requires_grad_off(copy.deepcopy(clean).float().eval().to(device))
    c_clf = TorchClassifier(c, device=device)
    d_c = reactivate_whitebox([lambda xb: _first(c(xb.to(device))).float().cpu()], xt_craft, t_craft,
                              eps=settings.eps, steps=settings.wb_steps, lr=settings.wb_lr, generator=g)
    out["reactivated_asr_clean_model"] = asr_with(c_clf, xt_eval, t_eval, d_c)
    return out


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


__all__ = ["Dormancy", "asr_with", "bec", "conv_layers", "dormancy", "dormancy_settings", "linear_cka",
           "reactivate_blackbox", "reactivate_whitebox"]
