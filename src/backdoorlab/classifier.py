"""Classifier: a model as it is deployed, behind one interface every defense and metric uses.

``logits(x)`` takes ``(N, C, H, W)`` float in [0, 1] and returns ``(N, K)`` float32 logits;
``features(x, layer)`` returns a hidden representation; ``capabilities`` says which of GRAD,
FEATURES, TRAINABLE the artifact supports; ``precision`` names how it runs ("fp32",
"int8-torch", "int8-ort", ...). Defenses check ``capabilities`` before they run (as ART does).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from .errors import BackdoorLabError
from .utils import resolve_device


class Capability(str, Enum):
    GRAD = "grad"  # logits are differentiable w.r.t. the input
    FEATURES = "features"  # hidden activations can be read
    TRAINABLE = "trainable"  # weights can be updated (repair methods)


class Classifier:
    """Abstract deployed classifier. Subclasses implement :meth:`logits`."""

    precision: str = "fp32"
    capabilities: frozenset[Capability] = frozenset()
    device: torch.device = torch.device("cpu")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        raise BackdoorLabError(f"{self.precision} classifier does not expose features")

    def require(self, *caps: Capability, who: str = "this method") -> None:
        missing = [c.value for c in caps if c not in self.capabilities]
        if missing:
            raise BackdoorLabError(
                f"{who} needs {', '.join(missing)}, which the {self.precision} classifier lacks"
            )

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Top-1 labels ``(N,)`` for ``(N, C, H, W)`` float images in [0, 1], in batches."""
        out = [self.logits(x[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class TorchClassifier(Classifier):
    """A PyTorch module in eval mode (FP32 by default; also half/bf16, fake-quant, pruned)."""

    def __init__(self, module: nn.Module, precision: str = "fp32", device: str | torch.device = "auto",
                 dtype: torch.dtype = torch.float32):
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.module = module.to(self.device).eval()
        self.precision = precision
        self.dtype = dtype
        self.capabilities = frozenset({Capability.GRAD, Capability.FEATURES, Capability.TRAINABLE})

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.module(x).float()

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        if layer != "penultimate":
            return _hooked_output(self.module, layer, x.to(self.device, self.dtype)).float()
        x = x.to(self.device, self.dtype)
        return self.module.forward_features(x).float()


def _hooked_output(module: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    named = dict(module.named_modules())
    if layer not in named:
        raise BackdoorLabError(f"model has no layer {layer!r}")
    captured: list[torch.Tensor] = []
    handle = named[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        module(x)
    finally:
        handle.remove()
    return captured[0]
