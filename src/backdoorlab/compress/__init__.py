"""Deployment: a compression config is handled by a registered function that returns a
:class:`~backdoorlab.classifier.Classifier` for the model as it ships.

``fp32`` is the reference: the trained module itself, in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..classifier import Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..registry import Registry, split_spec

Handler = Callable[..., Classifier]
COMPRESSIONS: Registry[Classifier] = Registry("compression")


@COMPRESSIONS.register("fp32")
def fp32(model: nn.Module, *, calib: TensorData | None = None, device: Any = "auto") -> Classifier:
    """The FP32 PyTorch eager model (the reference every other precision is compared to)."""
    return TorchClassifier(model, precision="fp32", device=device)


def compress(spec: str | dict[str, Any], model: nn.Module, *, calib: TensorData | None = None,
             device: str | torch.device = "auto") -> Classifier:
    """Deploy ``model`` as ``spec`` says (e.g. ``"fp32"``); ``calib`` is clean calibration data."""
    name, params = split_spec(spec)
    return COMPRESSIONS.build({"name": name, **params}, model=model, calib=calib, device=device)


__all__ = ["COMPRESSIONS", "compress"]
