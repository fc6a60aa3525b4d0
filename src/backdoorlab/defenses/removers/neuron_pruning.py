"""What the neuron-pruning removers share (ANP, CLP, RNP): BatchNorm channels as "neurons".

ANP (Wu & Wang, NeurIPS 2021), RNP (Li et al., ICML 2023) and CLP (Zheng et al., ECCV 2022) all
treat one output channel of a ``BatchNorm2d`` as one neuron: ANP and RNP learn a mask ``m`` in
[0, 1] per channel that scales the BN's ``weight`` (their ``NoisyBatchNorm2d`` /
``MaskBatchNorm2d`` replace every ``BatchNorm2d``), CLP scores the ``Conv2d -> BatchNorm2d`` pair
that produces the channel. Here:

* :func:`bn_units` lists every affine ``BatchNorm2d`` of a model and, from its ``torch.fx`` graph,
  the ``Conv2d`` whose output is the BN's input (``None`` after a residual add, as PreAct-ResNet's
  ``bn1`` and final BN). The conv's filter is zeroed with the channel only where the conv feeds
  nothing but that BN (``conv_exclusive``): PreAct-ResNet's stem conv also feeds the residual.
* :class:`NeuronMasks` applies masks (and ANP's perturbations) with forward hooks on the BN
  modules, so every architecture works without rebuilding it: a BN's output ``y = γ x̂ + β`` becomes
  ``(y - β) (m + δ) + β (1 + ξ)`` = ``γ (m + δ) x̂ + β (1 + ξ)``, exactly the papers' layer.
* :func:`prune_units_` prunes a channel as
  :func:`~backdoorlab.defenses.removers.fine_pruning.prune_channels_` does (BN ``weight``/``bias``
  0, ``running_mean`` 0, ``running_var`` 1, the exclusive conv's filter 0), so it outputs exactly
  0 in eval and train mode, after Conv-BN folding, FX int8 (0 maps to the zero-point) and ONNX.
* :func:`prune_by_mask` prunes the channels whose mask is at most a threshold (the papers'
  "pruning by threshold"), either a fixed one or the largest one on the papers' sweep grid
  (0, 0.05, ..., 0.9) whose clean-holdout accuracy drop stays within ``max_acc_drop``.

Images: ``(N, C, H, W)`` float in [0, 1]; masks: ``(K,)`` float in [0, 1] per BN layer of ``K``
channels.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import BackdoorLabError, check
from ..base import DefenseContext
from .fine_pruning import LastBlock, prune_channels_

GRID_STEP = 0.05  # the papers' pruning sweep (pruning_step 0.05 up to pruning_max 0.90)
GRID_MAX = 0.90
EVAL_BATCH = 256


@dataclass(frozen=True)
class BNUnit:
    """One ``BatchNorm2d`` (module name ``bn``, ``channels`` outputs) and the ``Conv2d`` whose output
    is its input (``conv``, ``None`` if there is none); ``conv_exclusive``: that conv feeds only
    this BN, so its filters may be zeroed with the BN's channels."""

    bn: str
    channels: int
    conv: str | None = None
    conv_exclusive: bool = False


def bn_units(model: nn.Module, who: str) -> list[BNUnit]:
    """Every affine ``BatchNorm2d`` of ``model`` in module order, with its producing conv from the
    ``torch.fx`` graph (no conv is paired if the model cannot be traced)."""
    named = dict(model.named_modules())
    bns = [n for n, m in named.items() if isinstance(m, nn.BatchNorm2d) and m.affine]
    check(bool(bns), f"{who}: {type(model).__name__} has no affine BatchNorm2d layer (the neurons it prunes)")
    producer: dict[str, tuple[str, bool]] = {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  untraceable model: prune BN channels without their convs
        graph = None
    if graph is not None:
        for node in graph.nodes:
            if node.op != "call_module" or node.target not in bns or not node.args:
                continue
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and src.op == "call_module" and \
                    isinstance(named.get(src.target), nn.Conv2d) and \
                    named[src.target].out_channels == named[node.target].num_features:
                producer[node.target] = (src.target, len(src.users) == 1)
    return [BNUnit(bn=n, channels=named[n].num_features, conv=producer.get(n, (None, False))[0],
                   conv_exclusive=producer.get(n, (None, False))[1]) for n in bns]


@torch.no_grad()
def prune_units_(model: nn.Module, units: list[BNUnit], pruned: dict[str, torch.Tensor]) -> None:
    """Zero, in place, channels ``pruned[bn]`` of each unit so they output exactly 0."""
    for u in units:
        idx = pruned.get(u.bn)
        if idx is None or len(idx) == 0:
            continue
        block = LastBlock(conv=u.conv if u.conv_exclusive else None, bn=u.bn, act=u.bn, gap=False,
                          channels=u.channels)
        prune_channels_(model, block, idx)


class NeuronMasks:
    """A mask per channel of each unit's BN, applied to ``model`` by forward hooks.

    ``masks``: one ``(K,)`` tensor per unit, initialised to 1 and trainable. ``noise_w`` /
    ``noise_b``: ANP's multiplicative perturbations of the BN scale and shift, used while
    ``perturbed`` is true. Call :meth:`remove` when done.
    """

    def __init__(self, model: nn.Module, units: list[BNUnit], device: torch.device):
        named = dict(model.named_modules())
        self.units = units
        self.masks = [torch.ones(u.channels, device=device, requires_grad=True) for u in units]
        self.noise_w = [torch.zeros(u.channels, device=device) for u in units]
        self.noise_b = [torch.zeros(u.channels, device=device) for u in units]
        self.perturbed = False
        self._handles = [named[u.bn].register_forward_hook(self._hook(i)) for i, u in enumerate(units)]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            bias = module.bias.view(1, -1, 1, 1)
            if self.perturbed:
                scale = (self.masks[i] + self.noise_w[i]).view(1, -1, 1, 1)
                return (out - bias) * scale + bias * (1.0 + self.noise_b[i]).view(1, -1, 1, 1)
            return (out - bias) * self.masks[i].view(1, -1, 1, 1) + bias
        return hook

    @torch.no_grad()
    def clip_(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def values(self) -> dict[str, torch.Tensor]:
        """The learned masks by BN name, ``(K,)`` float on the CPU."""
        return {u.bn: m.detach().float().cpu() for u, m in zip(self.units, self.masks)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def holdout(ctx: DefenseContext, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean holdout as ``(N, C, H, W)`` float in [0, 1] and ``(N,)`` long labels on
    ``ctx.device``."""
    check(len(ctx.clean) >= 2, f"{who} needs at least 2 clean holdout images, got {len(ctx.clean)}")
    x = ctx.clean.float().to(ctx.device).contiguous(memory_format=torch.channels_last)
    return x, ctx.clean.y.long().to(ctx.device)


def batches(n: int, size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """One shuffled pass over ``n`` indices in batches of ``size`` (a last batch of one image is
    dropped: a BatchNorm in train mode cannot normalise a 1x1 map of one image)."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, size):
        idx = perm[i:i + size]
        if len(idx) >= 2:
            yield idx.to(device)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``x``, ``y``."""
    model.eval()
    hits = sum(int((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum())
               for i in range(0, len(x), EVAL_BATCH))
    return hits / max(len(x), 1)


def _below(masks: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """Channels whose mask is ``<= t``, by BN name (layers with none are left out)."""
    out = {k: (v <= t).nonzero().flatten() for k, v in masks.items()}
    return {k: v for k, v in out.items() if len(v)}


def prune_by_mask(model: nn.Module, units: list[BNUnit], masks: dict[str, torch.Tensor], threshold: float,
                  max_acc_drop: float | None, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """A copy of ``model`` (FP32, eval mode) with every channel whose mask is ``<= threshold`` pruned.

    With ``max_acc_drop`` set, the threshold is instead the largest of 0, 0.05, ..., 0.9 such that
    this and every smaller threshold keep the clean holdout accuracy (``x``, ``y``) within
    ``max_acc_drop`` of the unpruned model's (no channel is pruned if even 0 does not). Returns the
    pruned model, the pruned channels by BN name and facts for the row.
    """
    base = copy.deepcopy(model).eval()
    acc0 = accuracy(base, x, y)
    if max_acc_drop is not None:
        chosen, work = None, copy.deepcopy(base)
        for k in range(round(GRID_MAX / GRID_STEP) + 1):
            t = round(k * GRID_STEP, 10)
            prune_units_(work, units, _below(masks, t))  # thresholds grow: pruned sets are nested
            if acc0 - accuracy(work, x, y) > max_acc_drop + 1e-9:
                break
            chosen = t
        del work
        threshold_used = chosen
    else:
        threshold_used = threshold
    pruned = _below(masks, threshold_used) if threshold_used is not None else {}
    prune_units_(base, units, pruned)
    n = sum(len(v) for v in pruned.values())
    facts = {"channels_pruned": n, "channels_total": sum(u.channels for u in units),
             "layers_pruned": sum(len(v) > 0 for v in pruned.values()), "layers_total": len(units),
             "prune_threshold": threshold_used, "max_acc_drop": max_acc_drop,
             "holdout_acc_before": acc0, "holdout_acc_pruned": accuracy(base, x, y)}
    return base.eval(), pruned, facts


def check_threshold(who: str, threshold: Any, max_acc_drop: Any) -> None:
    """One-line errors for the pruning rule's settings."""
    check(isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold < 1,
          f"{who}: threshold must be a number in [0, 1) (masks lie in [0, 1]), got {threshold!r}")
    check(max_acc_drop is None or (isinstance(max_acc_drop, (int, float)) and not isinstance(max_acc_drop, bool)
                                   and 0 < max_acc_drop < 1),
          f"{who}: max_acc_drop must be a number in (0, 1) or null, got {max_acc_drop!r}")


def check_int(who: str, name: str, v: Any, lo: int) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"{who}: {name} must be an integer >= {lo}, got {v!r}")


def check_number(who: str, name: str, v: Any, lo: float, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    where = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi is None else \
        f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    check(ok, f"{who}: {name} must be a number {where}, got {v!r}")


def fp32_copy(ctx: DefenseContext, who: str, channels_last: bool = False) -> nn.Module:
    """A float32 copy of the FP32 model the artifact was deployed from, on ``ctx.device``
    (``channels_last``: in that memory format, ~1.4x faster to train on CPUs, as :func:`fit` does)."""
    if ctx.model is None:
        raise BackdoorLabError(f"{who} needs the FP32 model the artifact was deployed from")
    model = copy.deepcopy(ctx.model).float().to(ctx.device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


__all__ = ["BNUnit", "NeuronMasks", "accuracy", "batches", "bn_units", "holdout", "prune_by_mask",
           "prune_units_"]
