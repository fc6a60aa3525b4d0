"""Classifier: a model as it is deployed, behind one interface every defense and metric uses.

``logits(x)`` takes ``(N, C, H, W)`` float in [0, 1] and returns ``(N, K)`` float32 logits;
``features(x, layer)`` returns a hidden representation; ``capabilities`` says which of GRAD,
FEATURES, TRAINABLE the artifact supports; ``precision`` names how it runs ("fp32",
"int8-torch", "int8-ort", ...). Defenses check ``capabilities`` before they run (as ART does).

Deployment facts travel with the classifier: ``size_bytes`` (the serialised artifact),
:meth:`Classifier.latency_ms` (measured on demand, never on a study's hot path unless asked),
``int8_layers`` (which layers really run in int8), and ``surrogate``: for an artifact without
gradients, a differentiable fake-quant copy that reproduces its numerics with the artifact's own
scales and zero-points (see :mod:`backdoorlab.compress.surrogate`).
"""

from __future__ import annotations

import io
import statistics
import time
from enum import Enum
from typing import Any

import torch
from torch import nn

from .errors import BackdoorLabError
from .utils import resolve_device


class Capability(str, Enum):
    GRAD = "grad"  # logits are differentiable w.r.t. the input
    FEATURES = "features"  # hidden activations can be read
    TRAINABLE = "trainable"  # weights can be updated (repair methods)


ALL_CAPABILITIES = frozenset({Capability.GRAD, Capability.FEATURES, Capability.TRAINABLE})


class Classifier:
    """Abstract deployed classifier. Subclasses implement :meth:`logits` and ``size_bytes``.

    Attributes set by :func:`backdoorlab.compress.compress`:

    * ``surrogate``: a differentiable :class:`TorchClassifier` reproducing this artifact's
      numerics, or ``None`` (the artifact itself has GRAD, or no surrogate exists).
    * ``int8_layers``: which conv/linear layers run in int8, e.g. ``"conv:0/7, linear:1/1"``
      (empty when none is quantized).
    * ``input_shape``: ``(C, H, W)`` of one image, used by :meth:`latency_ms`.
    * ``artifact``: a dict of tensors and plain data from which the compression handler can
      rebuild this classifier without calibrating again (``None``: nothing worth caching).
    * ``info``: further plain facts about the artifact (calibration, sparsity, ...).
    """

    precision: str = "fp32"
    capabilities: frozenset[Capability] = frozenset()
    device: torch.device = torch.device("cpu")
    surrogate: Classifier | None = None
    int8_layers: str = ""
    input_shape: tuple[int, int, int] | None = None
    artifact: dict[str, Any] | None = None
    info: dict[str, Any]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        raise BackdoorLabError(f"{self.precision} classifier does not expose features")

    @property
    def size_bytes(self) -> int:
        """Bytes of the serialised artifact as it would ship."""
        raise NotImplementedError

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

    @torch.no_grad()
    def latency_ms(self, batch_size: int = 1, repeats: int = 10, warmup: int = 2,
                   x: torch.Tensor | None = None) -> float:
        """Median wall-clock milliseconds **per image** of :meth:`logits` on a batch of
        ``batch_size`` images (``repeats`` timed calls after ``warmup`` untimed ones).

        ``x``: the batch to time, ``(B, C, H, W)`` float in [0, 1]; by default a constant
        mid-grey batch of ``input_shape`` (no randomness; dense kernels do not depend on values).
        Uses the current ``torch.get_num_threads()``; synchronises CUDA around each call.
        """
        if x is None:
            if self.input_shape is None:
                raise BackdoorLabError(f"{self.precision} classifier has no input_shape; pass x to latency_ms")
            x = torch.full((batch_size, *self.input_shape), 0.5)
        batch_size = x.shape[0]
        if batch_size == 0 or repeats < 1:
            raise BackdoorLabError("latency_ms needs a non-empty batch and repeats >= 1")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        for _ in range(max(0, warmup)):
            self.logits(x)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.logits(x)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3 / batch_size


class TorchClassifier(Classifier):
    """A PyTorch module in eval mode (FP32 by default; also half/bf16, fake-quant, pruned, and
    torch quantized modules, which run on CPU only).

    ``capabilities`` defaults to GRAD, FEATURES and TRAINABLE; artifacts without gradients pass
    fewer. ``size_bytes`` defaults to the ``torch.save`` size of the module's ``state_dict``;
    simulated formats (e.g. INT4 fake-quant) pass the size they would have when packed.
    """

    def __init__(self, module: nn.Module, precision: str = "fp32", device: str | torch.device = "auto",
                 dtype: torch.dtype = torch.float32, *, capabilities: frozenset[Capability] | None = None,
                 size_bytes: int | None = None, channels_last: bool = True):
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.module = module.to(self.device).eval()
        self.precision = precision
        self.dtype = dtype
        self.capabilities = ALL_CAPABILITIES if capabilities is None else frozenset(capabilities)
        self.channels_last = channels_last
        self._size_bytes = size_bytes
        self.info = {}

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self._input(x)).float()

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        if Capability.FEATURES not in self.capabilities:
            return super().features(x, layer)
        if layer != "penultimate":
            out = _hooked_output(self.module, layer, self._input(x))
        else:
            out = self.module.forward_features(self._input(x))
        return (out.dequantize() if out.is_quantized else out).float()

    @property
    def size_bytes(self) -> int:
        if self._size_bytes is None:
            self._size_bytes = state_dict_bytes(self.module)
        return self._size_bytes


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())`` (what a PyTorch checkpoint occupies)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


@torch.no_grad()
def agreement(a: Classifier, b: Classifier, x: torch.Tensor, batch_size: int = 512) -> float:
    """Share of images ``x`` ``(N, C, H, W)`` in [0, 1] on which ``a`` and ``b`` agree at top-1."""
    if len(x) == 0:
        return float("nan")
    return float((a.predict(x, batch_size) == b.predict(x, batch_size)).float().mean())


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
