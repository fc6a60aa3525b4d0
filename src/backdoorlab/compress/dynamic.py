"""``int8-dynamic``: PyTorch dynamic quantization (``torch.ao.quantization.quantize_dynamic``).

As in PyTorch's "Dynamic Quantization" tutorial: only ``nn.Linear`` layers are replaced by
int8 versions (per-tensor symmetric int8 weights; activations quantised per call from the
batch's own min/max, 7-bit on x86); **every convolution stays FP32**. It is kept deliberately,
because a published backdoor-quantization study called this configuration "INT8"; the row's
``int8_layers`` (e.g. ``conv:0/7, linear:1/1``) says what actually runs in int8.

The artifact runs on CPU. It has no input gradient (the dynamic int8 linear has no backward),
so it carries a surrogate: the same model with each int8 Linear replaced by
:class:`~backdoorlab.compress.fakequant.DynamicFakeQuant` (same per-batch qparams rule) and the
artifact's own dequantised int8 weights. Features (the FP32 conv body) are exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from .base import CompressionConfig
from .fakequant import DynamicFakeQuant
from .layers import count_layers, describe_int8
from .torch_int8 import ao_quiet


@dataclass(frozen=True)
class DynamicConfig(CompressionConfig):
    """No parameters: what ``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` does."""

    name = "int8-dynamic"


def int8_dynamic(cfg: DynamicConfig, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                 artifact: dict | None = None) -> Classifier:
    with ao_quiet():
        from torch.ao.nn.quantized import dynamic as nnqd
        from torch.ao.quantization import quantize_dynamic

        q = quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
    qlinears = {n: m for n, m in q.named_modules() if isinstance(m, nnqd.Linear)}
    clf = TorchClassifier(q, precision=cfg.tag(), device=torch.device("cpu"),
                          capabilities=frozenset({Capability.FEATURES}))
    clf.int8_layers = describe_int8({"linear": len(qlinears)}, count_layers(model))
    sur = copy.deepcopy(model).cpu().eval()
    for name, qm in qlinears.items():
        lin = nn.Linear(qm.in_features, qm.out_features, bias=qm.bias() is not None)
        with torch.no_grad():
            lin.weight.copy_(qm.weight().dequantize())
            if qm.bias() is not None:
                lin.bias.copy_(qm.bias())
        _set_submodule(sur, name, nn.Sequential(DynamicFakeQuant(reduce_range=True), lin))
    clf.surrogate = TorchClassifier(sur, precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    return clf


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
