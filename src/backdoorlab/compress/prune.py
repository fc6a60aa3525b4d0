"""``prune-l1`` and ``prune-channel``: magnitude pruning with the masks folded into the weights.

* ``prune-l1``: unstructured magnitude pruning (Han et al., "Learning both Weights and
  Connections for Efficient Neural Networks", NeurIPS 2015): the ``sparsity`` share of weights
  with the smallest ``|w|`` in every conv and linear layer (``scope="layer"``, Han et al.'s
  per-layer thresholds) or across all of them (``scope="global"``) is set to zero, via
  ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` then ``prune.remove``.
  No fine-tuning (post-training, as deployed without retraining).
* ``prune-channel``: structured L1 filter pruning (Li et al., "Pruning Filters for Efficient
  ConvNets", ICLR 2017): in every conv, the ``sparsity`` share of output filters with the
  smallest L1 norm ``sum |W_i|`` is zeroed (``torch.nn.utils.prune.ln_structured(n=1, dim=0)``),
  with the filter's bias and, where a BatchNorm directly consumes the conv, that channel's BN
  scale and shift, so the feature map is exactly zero, as if the filter were removed.

Sparsity must be in [0, 1); the aliases ``prune-l1-30/50/70`` and ``prune-channel-30/50/70`` fix
it. The result is a float module of the same architecture (GRAD, FEATURES, TRAINABLE), dense in
memory and on disk (``size_bytes`` does not shrink; ``info["sparsity"]`` is the achieved share
of zero weights among the pruned tensors). Both can come first in a chain
(``prune-l1-50+int8-torch``).
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

from ..classifier import Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import check
from .base import CompressionConfig
from .calib import input_shape
from .layers import CONV, LINEAR

SCOPES = ("layer", "global")


def _check_sparsity(name: str, s: object) -> None:
    check(isinstance(s, numbers.Real) and not isinstance(s, bool) and 0 <= float(s) < 1,
          f"{name}: sparsity must be a number in [0, 1), got {s!r}")


@dataclass(frozen=True)
class PruneL1Config(CompressionConfig):
    """``sparsity`` in [0, 1): share of conv/linear weights set to zero; ``scope``: ``layer`` or
    ``global`` threshold."""

    name = "prune-l1"
    chainable = True
    sparsity: float = 0.5
    scope: str = "layer"

    def validate(self) -> None:
        _check_sparsity(self.name, self.sparsity)
        check(self.scope in SCOPES, f"prune-l1: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    def tag(self) -> str:
        return f"prune-l1-{round(100 * self.sparsity)}"


@dataclass(frozen=True)
class PruneChannelConfig(CompressionConfig):
    """``sparsity`` in [0, 1): share of each conv's output filters removed (zeroed)."""

    name = "prune-channel"
    chainable = True
    sparsity: float = 0.5

    def validate(self) -> None:
        _check_sparsity(self.name, self.sparsity)

    def tag(self) -> str:
        return f"prune-channel-{round(100 * self.sparsity)}"


def _contiguous(model: nn.Module) -> nn.Module:
    """Weights in the default memory format (``torch.nn.utils.prune`` flattens with ``view``;
    models trained in ``channels_last`` have non-contiguous conv weights)."""
    for m in model.modules():
        if isinstance(m, CONV + LINEAR):
            m.weight.data = m.weight.data.contiguous()
    return model


def weight_sparsity(model: nn.Module, kinds: tuple[type, ...] = CONV + LINEAR) -> float:
    """Share of exactly-zero weights over all ``kinds`` layers' weights."""
    ws = [m.weight for m in model.modules() if isinstance(m, kinds)]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws)) / max(total, 1)


def prune_l1(cfg: PruneL1Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
             artifact: dict | None = None) -> Classifier:
    pruned = _contiguous(copy.deepcopy(model).cpu().eval())
    params = [(m, "weight") for m in pruned.modules() if isinstance(m, CONV + LINEAR)]
    if cfg.sparsity > 0:
        if cfg.scope == "global":
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(cfg.sparsity))
        else:
            for m, p in params:
                prune.l1_unstructured(m, p, amount=float(cfg.sparsity))
        for m, p in params:
            prune.remove(m, p)  # fold the mask into the weight
    clf = TorchClassifier(pruned, precision=cfg.tag(), device=device)
    clf.input_shape = input_shape(calib)
    clf.info = {"sparsity": weight_sparsity(pruned), "scope": cfg.scope}
    return clf


def _bn_after_conv(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """conv module -> the BatchNorm that consumes its output directly (fx graph, else
    consecutive modules of an ``nn.Sequential``)."""
    pairs: dict[nn.Module, nn.Module] = {}
    try:
        gm = torch.fx.symbolic_trace(model)
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(mods[node.target], CONV) and len(node.users) == 1:
                user = next(iter(node.users))
                if user.op == "call_module" and isinstance(mods[user.target], nn.modules.batchnorm._BatchNorm):
                    pairs[model.get_submodule(node.target)] = model.get_submodule(user.target)
    except Exception:  # untraceable model: fall back to Sequential neighbours
        for seq in (m for m in model.modules() if isinstance(m, nn.Sequential)):
            kids = list(seq)
            for a, b in zip(kids, kids[1:]):
                if isinstance(a, CONV) and isinstance(b, nn.modules.batchnorm._BatchNorm):
                    pairs[a] = b
    return pairs


def prune_channel(cfg: PruneChannelConfig, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                  artifact: dict | None = None) -> Classifier:
    pruned = _contiguous(copy.deepcopy(model).cpu().eval())
    bns = _bn_after_conv(pruned)
    for m in [m for m in pruned.modules() if isinstance(m, CONV)]:
        if cfg.sparsity == 0:
            break
        prune.ln_structured(m, "weight", amount=float(cfg.sparsity), n=1, dim=0)
        prune.remove(m, "weight")
        dead = m.weight.detach().flatten(1).abs().sum(1) == 0
        with torch.no_grad():
            if m.bias is not None:
                m.bias[dead] = 0
            bn = bns.get(m)
            if bn is not None and bn.affine:
                bn.weight[dead] = 0
                bn.bias[dead] = 0
    clf = TorchClassifier(pruned, precision=cfg.tag(), device=device)
    clf.input_shape = input_shape(calib)
    clf.info = {"sparsity": weight_sparsity(pruned, CONV)}
    return clf
