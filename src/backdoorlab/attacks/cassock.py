"""CASSOCK (Wang, Gao, Fu, Zhang, Zhang, Susilo & Liu, "CASSOCK: Viable Backdoor Attacks against
DNN in the Wall of Source-Specific Backdoor Defenses", ACM AsiaCCS 2023, arXiv 2206.00145).

A source-specific backdoor: the trigger sends images of the ``sources`` classes to ``target``,
and must *not* move images of the other classes (a low false-positive rate, FPR). As in every
source-specific attack (Tang et al.'s TaCT), two kinds of triggered samples are added to the
training data: *poisoned* samples (source images + trigger, labelled ``target``) and *cover*
samples (non-source images + trigger, keeping their true labels). CASSOCK's point is that the
trigger's *transparency* and *content* decide the ASR / FPR trade-off; its three variants
(``variant``):

* ``trans`` (CASSOCK_Trans): a patch trigger stamped with *heterogeneous transparency*: the
  poisoned samples carry a fainter trigger than the cover samples, so the network learns
  "source + even a faint trigger -> target" while non-source images stay put up to the full
  strength; at test time the trigger is stamped at full strength (``alpha_test = 1``);
* ``cont`` (CASSOCK_Cont): the trigger's *content* is made of the target class's salient
  features, entangling it with the target's normal features (stealthier against SCAn-style
  defences); one transparency for poisoned and cover samples;
* ``comp`` (CASSOCK_Comp): the content trigger with the heterogeneous transparencies of ``trans``.

Defaults follow the authors' code (github.com/shihe98/CASSOCK, ``CIFAR10/CASSOCK_Trans_CIFAR10.py``,
``CASSOCK_Cont_CIFAR10.py``, ``Get_FeatureMap.py``; CIFAR-10 is 32x32, so nothing is rescaled):

* stamping is additive in the model's *normalised* input space, as the authors add the trigger to
  normalised tensors: ``x' = clip(x + alpha * sigma * d, 0, 1)`` in pixel space, with ``sigma`` the
  dataset's per-channel std (``info.std``) and ``d`` the trigger ``(C, H, W)``;
* ``trans``: ``d`` = ``amplitude = 2.8`` on a ``patch_size = 5`` square at the bottom-right corner
  (rows and columns 27-31 of 32), 0 elsewhere; poisoned samples ``alpha = alpha_poison * j`` with
  ``alpha_poison = 0.9``, cover samples ``alpha = alpha_cover * j`` with ``alpha_cover = 1.0``,
  ``j`` drawn per sample as the authors' ``get_alpha``: 0.9 with probability 0.5, 0.8 with 0.34,
  0.7 with 0.16; ``rate = 0.05`` poisoned and ``cover_rate = 0.1`` cover samples;
* ``cont``: ``d`` = the salient part of one target-class image (asset ``cassock-content``,
  :func:`content_trigger`): on the cell's clean model (``ctx.model("none")``) a target-class
  training image classified with confidence >= 0.99 is picked at random among the first 20 such
  images (in a random order), a mask ``m`` (``H x W``, initialised uniformly in [0, 1]) is fitted by
  SGD (``content_lr = 0.01``, ``content_steps = 5000``) to ``CE(f(x * m), target) + 0.01 * |m|_1``,
  clipped to [0, 1] after every step, thresholded (``m <= 0.1`` set to 0), and ``d = x * m``;
  ``alpha_poison = alpha_cover = 0.8``, no jitter, ``rate = 0.05``, ``cover_rate = 0.05``;
* ``comp``: the ``cont`` trigger with ``trans``'s transparencies, jitter and rates;
* ``alpha_test = 1`` (the authors' ``test_poison`` / ``test_cover``); ``None`` for
  ``alpha_poison`` / ``alpha_cover`` / ``cover_rate`` means "the variant's default" above.

Sources and target: the base class's ``source-specific`` objective (ASR is counted on the
``sources`` classes only); default ``sources = [1]``, ``target = 0`` (the authors' scripts use
source 0 -> target 5 and source 1 -> target 7 on CIFAR-10).

How it trains (the one deviation in kind): the authors *add* the poisoned and cover samples to
the training set (``mix_data = clean + poison + cover``). The interface keeps a poisoned split the
size of the clean one, and cover samples change images whose labels stay (which a
:class:`~backdoorlab.attacks.base.PoisonedSplit` cannot record), so the copies are added on the
fly, the way the training-control attacks work (:mod:`~backdoorlab.attacks.onthefly`): to every
training batch of ``B`` (already shuffled and augmented) the hook appends stamped copies of the
first ``int(rate * B)`` source-class images in it (labelled ``target``) and of the first
``int(cover_rate * B)`` non-source images (true labels); when the batch holds fewer source images,
all of them are copied. Over an epoch that is the authors' ``rate * N`` poisoned and
``cover_rate * N`` cover samples beside the untouched clean set (their CIFAR script likewise draws
poisoned and cover samples for every batch). :meth:`poison` therefore returns the clean split
with no recorded indices.

Shapes: ``apply`` takes and returns ``(N, C, H, W)`` float in [0, 1] (deterministic: the test
transparency has no jitter); the trigger ``d`` is ``(C, H, W)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from ..errors import check
from ..train.fit import FitState, Hook
from .base import AssetContext, Attack, PoisonedSplit
from .onthefly import per_batch

VARIANTS = ("trans", "cont", "comp")
JITTER = (0.9, 0.8, 0.7)  # the authors' get_alpha: x0.9 (p 0.5), x0.8 (p 0.34), x0.7 (p 0.16)
JITTER_CUTS = (0.5, 0.16)


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Cassock(Attack):
    """Source-specific backdoor with cover data in CASSOCK's ``trans`` / ``cont`` / ``comp``
    variants. ``rate`` / ``cover_rate``: poisoned / cover copies per training image;
    ``alpha_*``: transparencies (trigger strength multipliers); ``patch_size`` / ``amplitude``:
    the ``trans`` patch; ``content_*``: the ``cont`` / ``comp`` trigger search."""

    name = "cassock"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, sources: list[int] = [1],  # noqa: B006 (config default)
                 variant: str = "trans", rate: float = 0.05, cover_rate: float | None = None,
                 alpha_poison: float | None = None, alpha_cover: float | None = None, alpha_test: float = 1.0,
                 patch_size: int = 5, amplitude: float = 2.8, content_steps: int = 5000,
                 content_lr: float = 0.01, content_l1: float = 0.01, content_threshold: float = 0.1):
        check(variant in VARIANTS, f"cassock: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        super().__init__(info, target, rate, "source-specific", sources)
        hetero = variant != "cont"
        cover_rate = (0.1 if hetero else 0.05) if cover_rate is None else cover_rate
        alpha_poison = (0.9 if hetero else 0.8) if alpha_poison is None else alpha_poison
        alpha_cover = (1.0 if hetero else 0.8) if alpha_cover is None else alpha_cover
        check(_num(cover_rate) and 0 <= cover_rate <= 1, f"cassock: cover_rate must be in [0, 1], got {cover_rate!r}")
        for key, v in (("alpha_poison", alpha_poison), ("alpha_cover", alpha_cover), ("alpha_test", alpha_test),
                       ("amplitude", amplitude), ("content_lr", content_lr)):
            check(_num(v) and v > 0, f"cassock: {key} must be a number > 0, got {v!r}")
        check(_num(content_l1) and content_l1 >= 0, f"cassock: content_l1 must be a number >= 0, got {content_l1!r}")
        check(_num(content_threshold) and 0 <= content_threshold < 1,
              f"cassock: content_threshold must be in [0, 1), got {content_threshold!r}")
        check(_int(patch_size) and 1 <= patch_size <= info.size,
              f"cassock: patch_size must be an integer in [1, {info.size}], got {patch_size!r}")
        check(_int(content_steps) and content_steps >= 1,
              f"cassock: content_steps must be an integer >= 1, got {content_steps!r}")
        self.variant = variant
        self.heterogeneous = hetero
        self.cover_rate = float(cover_rate)
        self.alpha_poison, self.alpha_cover = float(alpha_poison), float(alpha_cover)
        self.alpha_test = float(alpha_test)
        self.content_spec = {"name": "cassock-content", "target": self.target, "steps": content_steps,
                             "lr": content_lr, "l1": content_l1, "threshold": content_threshold}
        c, s = info.channels, info.size
        sigma = torch.tensor(info.std, dtype=torch.float32).view(c, 1, 1)
        self.sigma = sigma
        if variant == "trans":
            d = torch.zeros(c, s, s)
            d[:, s - patch_size:, s - patch_size:] = float(amplitude)
            self.delta: torch.Tensor | None = sigma * d  # the pixel-space step at alpha = 1
        else:
            self.delta = None  # bound from the cassock-content asset

    # --- trigger --------------------------------------------------------------------------
    def assets(self) -> dict[str, Any]:
        return {} if self.variant == "trans" else {"content": dict(self.content_spec)}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.variant == "trans":
            return
        d = assets["content"]["trigger"]
        c, s = self.info.channels, self.info.size
        if tuple(d.shape) != (c, s, s):
            raise RuntimeError(f"cassock: content trigger asset has shape {tuple(d.shape)}, expected {(c, s, s)}")
        self.delta = self.sigma * d.float()

    def stamp(self, x: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
        """``clip(x + alpha * sigma * d, 0, 1)`` for ``(N, C, H, W)`` images; ``alpha`` a number or
        ``(N,)`` per-image transparencies."""
        if self.delta is None:
            raise RuntimeError(f"cassock: the {self.variant} variant's content trigger is not bound; build the "
                               "attack through the pipeline (Pipeline.attack) or call bind_assets first")
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        if a.ndim:
            a = a.view(-1, 1, 1, 1)
        return (x + a * self.delta.to(x)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp(x, self.alpha_test)

    def alphas(self, n: int, kind: str, g: torch.Generator) -> torch.Tensor:
        """Transparencies of ``n`` training copies, ``kind`` ``"poison"`` or ``"cover"``: the base
        value, times the authors' random factor (0.9 / 0.8 / 0.7) for the heterogeneous variants."""
        base = self.alpha_poison if kind == "poison" else self.alpha_cover
        if not self.heterogeneous:
            return torch.full((n,), base)
        u = torch.rand(n, generator=g)
        j = torch.where(u > JITTER_CUTS[0], JITTER[0], torch.where(u > JITTER_CUTS[1], JITTER[1], JITTER[2]))
        return base * j

    # --- data -----------------------------------------------------------------------------
    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """The split stays clean (the hook adds the poisoned and cover copies); refuses rates the
        training set's class shares cannot supply."""
        data = train.as_uint8()
        src = self.in_scope(data.y)
        share = float(src.float().mean()) if len(data) else 0.0
        check(self.rate <= share, f"cassock: rate {self.rate} asks for more poisoned copies per batch than the "
                                  f"source classes {list(self.sources)} hold ({share:.4f} of the training set)")
        check(self.cover_rate <= 1 - share, f"cassock: cover_rate {self.cover_rate} asks for more cover copies per "
                                            f"batch than the non-source classes hold ({1 - share:.4f})")
        return PoisonedSplit(data, torch.empty(0, dtype=torch.long), data.y.clone())

    def train_hook(self) -> Hook:
        return _CassockHook(self)


class _CassockHook(Hook):
    """Appends to each batch stamped copies of its first ``int(rate * B)`` source images (label
    ``target``) and first ``int(cover_rate * B)`` non-source images (labels kept). The epoch's
    counts go into its metrics as ``n_poison`` / ``n_cover``."""

    def __init__(self, attack: Cassock):
        self.attack = attack
        self.counts = {"n_poison": 0, "n_cover": 0}

    def on_fit_start(self, state: FitState) -> None:
        check(self.attack.delta is not None or self.attack.variant == "trans",
              f"cassock: the {self.attack.variant} variant's content trigger is not bound; build the attack with "
              "Pipeline.attack(cell), or bind the 'cassock-content' asset (bind_assets) before training")

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        a, g = self.attack, state.generator
        src = a.in_scope(y.cpu()).to(y.device)
        pos = torch.arange(len(y), device=y.device)
        sp = pos[src][:per_batch(a.rate, len(y), g)]
        cp = pos[~src][:per_batch(a.cover_rate, len(y), g)]
        xp = a.stamp(x[sp], a.alphas(len(sp), "poison", g).to(x))
        xc = a.stamp(x[cp], a.alphas(len(cp), "cover", g).to(x))
        self.counts["n_poison"] += len(sp)
        self.counts["n_cover"] += len(cp)
        return torch.cat([x, xp, xc]), torch.cat([y, torch.full_like(y[sp], a.target), y[cp]])

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        metrics.update({k: float(v) for k, v in self.counts.items()})
        self.counts = dict.fromkeys(self.counts, 0)


# ---------------------------------------------------------------------------------- the content
def content_trigger(ctx: AssetContext, target: int = 0, steps: int = 5000, lr: float = 0.01, l1: float = 0.01,
                    threshold: float = 0.1, confidence: float = 0.99, candidates: int = 20) -> dict[str, torch.Tensor]:
    """Asset builder ``cassock-content``: the salient features of a target-class image on the cell's
    clean model (``ctx.model("none")``), as the authors' ``Get_FeatureMap.py``.

    Target-class images of the attacker's training split are visited in a random order; among the
    first ``candidates`` that the clean model classifies as ``target`` with softmax >= ``confidence``
    (or, if none, the most confident one) one is drawn at random. A mask ``(H, W)`` drawn uniformly
    in [0, 1] is fitted by plain SGD (``lr``) for ``steps`` steps to
    ``CE(f(x * m), target) + l1 * |m|_1`` and clipped to [0, 1] after each step; entries ``<=
    threshold`` are zeroed. Returns ``trigger = x * m`` ``(C, H, W)`` in [0, 1], ``mask`` ``(1, H, W)``
    and ``image`` (the index of the image in the training split)."""
    check(_int(target) and 0 <= target < ctx.info.num_classes,
          f"cassock: target must be a class label in [0, {ctx.info.num_classes - 1}], got {target!r}")
    check(_int(steps) and steps >= 1, f"cassock: content_steps must be an integer >= 1, got {steps!r}")
    idx = torch.nonzero(ctx.train.y == target).flatten()
    check(len(idx) > 0, f"cassock: the training split has no image of the target class {target}")
    model = copy.deepcopy(ctx.model("none")).to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = ctx.generator
    order = idx[torch.randperm(len(idx), generator=g)]
    with torch.no_grad():
        probs = torch.cat([F.softmax(model(ctx.train.subset(order[i:i + 256]).float().to(ctx.device)), 1)[:, target]
                           for i in range(0, len(order), 256)]).cpu()
    good = order[probs >= confidence][:candidates]
    pick = good[int(torch.randint(len(good), (1,), generator=g))] if len(good) else order[int(probs.argmax())]
    x = ctx.train.subset(pick.view(1)).float().to(ctx.device)  # (1, C, H, W)
    h, w = x.shape[2:]
    mask = torch.rand(h, w, generator=g).to(ctx.device).requires_grad_(True)
    opt = torch.optim.SGD([mask], lr=lr)
    y = torch.full((1,), target, dtype=torch.long, device=ctx.device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x * mask), y) + l1 * mask.abs().sum()
        loss.backward()
        opt.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
    m = torch.where(mask > threshold, mask, torch.zeros_like(mask)).detach()
    return {"trigger": (x[0] * m).cpu(), "mask": m[None].cpu(), "image": pick.view(1)}
