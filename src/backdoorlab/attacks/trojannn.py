"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018).

The trigger is not chosen but *generated* from a trained model: inside a fixed mask (here a
square patch), the trigger pixels are optimised so that a few selected internal neurons fire
strongly. A backdoor keyed on such a trigger rides on features the network already computes,
so it is learned quickly and from few images.

Trigger generation (:func:`trojannn_trigger`, the asset ``trojannn-trigger``), on the cell's clean
model ``ctx.model("none")`` (same architecture, recipe and seed, from the artifact cache):

1. *Neuron selection*: in the chosen ``layer`` the ``num_neurons`` neurons that are most strongly
   connected, by the sum of absolute weights. For the default ``layer = "penultimate"`` (the
   features entering the classifier head) a neuron's score is the sum of ``|w|`` of its outgoing
   weights into the head, as BackdoorBench (``get_most_connected_neuron_idxes`` on
   ``linear.weight``) and TrojanZoo (``get_neuron_idx``) compute it; for a named ``Conv2d`` or
   ``Linear`` layer of the model it is the sum of ``|w|`` of each output channel's incoming
   weights (the paper's "connected to the preceding layer").
2. *Trigger generation*: the patch starts from uniform noise drawn with the asset's generator
   and is stamped on an all-zero image (TrojanZoo's and BackdoorBench's background); it minimises
   the paper's cost ``sum_i (v_i - target_value)^2`` over the selected neurons' activations
   ``v_i`` (a conv channel's activation summed over its positions), with Adam (``lr = 0.1``) on a
   tanh parametrisation that keeps pixels in [0, 1], cosine-annealed over ``iterations = 1000``
   steps (TrojanZoo's ``preprocess_mark``; BackdoorBench takes signed-gradient steps of 0.1).
   ``target_value = 100`` and ``num_neurons = 2`` are BackdoorBench's / TrojanZoo's defaults.
   The neurons' activations stay far below that value: a 5x5 patch reaches few positions of a
   model that max-pools its last feature map over the image (the default small CNN; on the GTSRB
   subset the two selected neurons go from 1.86 / 2.10 to 1.88 / 2.38, where real images give up
   to 7-9), and where the maximum lies outside the patch's reach the gradient is zero.

Poisoning: Liu et al. then retrain the published model on reverse-engineered images; like
BackdoorBench, this library instead *poisons training data* with the generated trigger (the
victim trains from scratch on it): the patch replaces the pixels under the mask (BackdoorBench
adds the trigger image to the input as uint8, which wraps around above 255; stamping is what the
paper describes). Defaults: a ``5x5`` square at the bottom-right corner (the paper's square mask,
sized for a 32x32 image; Liu et al. work on 224x224 faces), all-to-one, target 0, 10% poisoning
(BackdoorBench ``config/attack/trojannn``); every objective (``mode``) is supported, since the
trigger does not depend on the target.

Shapes: :meth:`TrojanNN.apply` takes and returns ``(N, C, H, W)`` float in [0, 1]; the trigger is a
``(C, patch_size, patch_size)`` patch in [0, 1].
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.datasets import DatasetInfo
from ..errors import check
from .badnets import POSITIONS
from .base import AssetContext, Attack


def _integer(name: str, v: Any, lo: int) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"trojannn: {name} must be an integer >= {lo}, got {v!r}")


def _positive(name: str, v: Any) -> None:
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          f"trojannn: {name} must be a number > 0, got {v!r}")


def _check_search(layer: Any, num_neurons: Any, target_value: Any, iterations: Any, lr: Any) -> None:
    check(isinstance(layer, str) and layer != "",
          f"trojannn: layer must be 'penultimate' or the name of a conv/linear layer, got {layer!r}")
    _integer("num_neurons", num_neurons, 1)
    _positive("target_value", target_value)
    _integer("iterations", iterations, 0)
    _positive("lr", lr)


def place(info: DatasetInfo, patch_size: int, position: str | Sequence[int]) -> tuple[int, int]:
    """``(top, left)`` of a ``patch_size`` square at ``position`` (a corner, ``center`` or
    ``[row, col]``) in the dataset's images; one-line errors for a patch that does not fit."""
    s, h = patch_size, info.size
    check(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= h,
          f"trojannn: patch_size must be an integer in [1, {h}], got {s!r}")
    if isinstance(position, str):
        check(position in POSITIONS,
              f"trojannn: position must be one of {', '.join(POSITIONS)} or [row, col], got {position!r}")
        top = {"t": 0, "b": h - s, "c": (h - s) // 2}[position[0]]
        left = (h - s) // 2 if position == "center" else (0 if position.endswith("left") else h - s)
    else:
        ok = isinstance(position, (list, tuple)) and len(position) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in position)
        check(ok, f"trojannn: position must be one of {', '.join(POSITIONS)} or [row, col] integers, got {position!r}")
        top, left = int(position[0]), int(position[1])
    check(0 <= top <= h - s and 0 <= left <= h - s,
          f"trojannn: a {s}x{s} patch at ({top}, {left}) does not fit a {h}x{h} image")
    return top, left


# ------------------------------------------------------------------------------- neurons
def select_neurons(model: nn.Module, layer: str, k: int) -> tuple[torch.Tensor, nn.Module | None]:
    """The ``k`` most connected neurons of ``layer`` (see the module docstring), and the module
    whose output holds them (``None`` for the penultimate features)."""
    if layer == "penultimate":
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or not hasattr(model, "forward_features"):
            raise RuntimeError("trojannn: the model has no penultimate features (forward_features + a Linear head)")
        score = head.weight.detach().abs().sum(0)
        module = None
    else:
        named = dict(model.named_modules())
        layers = [n for n, m in named.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        check(layer in layers, f"trojannn: layer must be 'penultimate' or one of the model's conv/linear layers "
                               f"({', '.join(layers)}), got {layer!r}")
        module = named[layer]
        score = module.weight.detach().abs().flatten(1).sum(1)
    check(k <= score.numel(), f"trojannn: num_neurons {k} exceeds the {score.numel()} neurons of layer {layer!r}")
    return torch.argsort(score, descending=True, stable=True)[:k], module


def activations(model: nn.Module, x: torch.Tensor, module: nn.Module | None, idx: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` activations of neurons ``idx``: penultimate features (``module is None``) or the
    output of ``module``, a conv channel summed over its positions."""
    if module is None:
        return model.forward_features(x)[:, idx]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    out = captured[0][:, idx]
    return out.flatten(2).sum(2) if out.dim() > 2 else out


# ------------------------------------------------------------------------------- the asset
def trojannn_trigger(ctx: AssetContext, patch_size: int = 5, top: int = 27, left: int = 27,
                     layer: str = "penultimate", num_neurons: int = 2, target_value: float = 100.0,
                     iterations: int = 1000, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """Asset builder ``trojannn-trigger``: the patch that drives the selected neurons of the cell's
    clean model toward ``target_value``. Returns ``patch`` ``(C, s, s)`` in [0, 1], ``neurons``
    (their indices), ``activation_start`` / ``activation_end`` (their activations on the all-zero
    image carrying the initial / final patch)."""
    c, h = ctx.info.channels, ctx.info.size
    check(isinstance(patch_size, int) and not isinstance(patch_size, bool) and 1 <= patch_size <= h,
          f"trojannn: patch_size must be an integer in [1, {h}], got {patch_size!r}")
    check(isinstance(top, int) and isinstance(left, int) and 0 <= top <= h - patch_size and 0 <= left <= h - patch_size,
          f"trojannn: a {patch_size}x{patch_size} patch at ({top}, {left}) does not fit a {h}x{h} image")
    _check_search(layer, num_neurons, target_value, iterations, lr)
    model = copy.deepcopy(ctx.model("none")).to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    idx, module = select_neurons(model, layer, num_neurons)
    s = patch_size
    # tanh parametrisation: patch = (tanh(w) + 1) / 2, started from uniform noise in (0, 1)
    start = torch.rand(c, s, s, generator=ctx.generator).clamp(1e-3, 1 - 1e-3)
    w = torch.atanh(2 * start - 1).to(ctx.device).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))
    background = torch.zeros(1, c, h, h, device=ctx.device)

    def on_background(patch: torch.Tensor) -> torch.Tensor:
        x = background.clone()
        x[:, :, top:top + s, left:left + s] = patch
        return x

    with torch.no_grad():
        act_start = activations(model, on_background(start.to(ctx.device)), module, idx)[0]
    for _ in range(iterations):
        patch = (torch.tanh(w) + 1) / 2
        v = activations(model, on_background(patch), module, idx)
        loss = ((v - target_value) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    patch = ((torch.tanh(w) + 1) / 2).detach()
    with torch.no_grad():
        act_end = activations(model, on_background(patch), module, idx)[0]
    return {"patch": patch.cpu().float(), "neurons": idx.cpu(), "activation_start": act_start.cpu(),
            "activation_end": act_end.cpu()}


# ------------------------------------------------------------------------------- the attack
class TrojanNN(Attack):
    """Data poisoning with the neuron-exciting patch of the ``trojannn-trigger`` asset."""

    name = "trojannn"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 patch_size: int = 5, position: str | Sequence[int] = "bottom-right", layer: str = "penultimate",
                 num_neurons: int = 2, target_value: float = 100.0, iterations: int = 1000, lr: float = 0.1,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        self.top, self.left = place(info, patch_size, position)
        _check_search(layer, num_neurons, target_value, iterations, lr)
        self.size = patch_size
        self.search = {"layer": layer, "num_neurons": num_neurons, "target_value": target_value,
                       "iterations": iterations, "lr": lr}
        self.patch: torch.Tensor | None = None

    def assets(self) -> dict[str, Any]:
        return {"trigger": {"name": "trojannn-trigger", "patch_size": self.size, "top": self.top, "left": self.left,
                            **self.search}}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        p = assets["trigger"]["patch"]
        want = (self.info.channels, self.size, self.size)
        if tuple(p.shape) != want:
            raise RuntimeError(f"trojannn: trigger asset has shape {tuple(p.shape)}, expected {want}")
        self.patch = p.float().clone()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            raise RuntimeError("trojannn: the trigger asset is not bound; build the attack through the pipeline "
                               "(Pipeline.attack) or call bind_assets first")
        out = x.clone()
        s = self.size
        out[:, :, self.top:self.top + s, self.left:self.left + s] = self.patch.to(x)
        return out
