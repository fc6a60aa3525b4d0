"""Half precisions: the model's parameters, buffers and activations in FP16 or BF16.

IEEE-754 binary16 (FP16: 5 exponent, 10 mantissa bits) and bfloat16 (BF16: 8 exponent,
7 mantissa bits; Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019), the
precisions GPUs and recent CPUs ship models in. The whole module is cast (``module.to(dtype)``,
PyTorch's ``Module.half()`` / ``bfloat16()``), including the Normalize buffers; inputs
``(N, C, H, W)`` in [0, 1] are cast on entry, logits come back as float32. Gradients flow, so
these keep GRAD and FEATURES and need no surrogate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from .base import CompressionConfig


@dataclass(frozen=True)
class FP32Config(CompressionConfig):
    """The FP32 PyTorch eager model, the reference every other precision is compared to."""

    name = "fp32"
    chainable = True


@dataclass(frozen=True)
class HalfConfig(CompressionConfig):
    """``dtype``: ``"float16"`` or ``"bfloat16"`` (fixed by the ``fp16`` / ``bf16`` names)."""

    name = "half"
    dtype: str = "float16"

    def tag(self) -> str:
        return {"float16": "fp16", "bfloat16": "bf16"}[self.dtype]

    def validate(self) -> None:
        from ..errors import check

        check(self.dtype in ("float16", "bfloat16"), f"half: dtype must be float16 or bfloat16, got {self.dtype!r}")


def fp32(cfg: FP32Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
         artifact: dict | None = None) -> Classifier:
    return TorchClassifier(model, precision="fp32", device=device)


def half(cfg: HalfConfig, model: nn.Module, *, calib: TensorData | None, device: torch.device,
         artifact: dict | None = None) -> Classifier:
    dtype = getattr(torch, cfg.dtype)
    module = copy.deepcopy(model).to(device=device, dtype=dtype)
    return TorchClassifier(module, precision=cfg.tag(), device=device, dtype=dtype,
                           capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
