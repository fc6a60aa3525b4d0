"""The last convolutional feature map of a classifier: the tensor its global pooling reduces.

Grad-CAM (SentiNet) and Gram-matrix statistics (Beatrix) need a spatial feature map ``(N, K, h, w)``,
not the pooled penultimate vector that :meth:`~backdoorlab.classifier.Classifier.features` returns.
Every registered model ends its body with a global pooling layer (``AdaptiveMaxPool2d(1)`` in
small-cnn, ``AdaptiveAvgPool2d(1)`` in the ResNet, VGG and MobileNet), and so do their deployed
forms: the int8 FX module calls the same pooling module on a quantized tensor, the fake-quant
surrogates call it (or, replaying an ONNX graph, ``amax`` / ``mean`` over the spatial dimensions).
:func:`pooled_map` runs a classifier's own forward pass under a
:class:`~torch.overrides.TorchFunctionMode` that records the input of the last such global spatial
reduction, so it reads the map without knowing layer names (an FX surrogate renames its modules).

Where the forward is not PyTorch (an ONNX Runtime, LiteRT, OpenVINO or ExecuTorch session) nothing
is recorded, and the caller falls back to the artifact's surrogate (:func:`map_reader`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..classifier import Capability, Classifier
from ..errors import BackdoorLabError

_ADAPTIVE = {"adaptive_max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d_with_indices",
             "_adaptive_max_pool2d"}
_REDUCE = {"amax", "mean", "max", "amin", "sum"}


def _is_one(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and all(s == 1 for s in size)


def _global_spatial(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``name(*args, **kwargs)`` reduces a 4-D tensor over both of its spatial dimensions."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 4:
        return False
    if name in _ADAPTIVE:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return _is_one(size)
    if name in _REDUCE:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            return False
        dims = {int(d) % 4 for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        return dims == {2, 3}
    return False


def _one_spatial(name: str, args: tuple, kwargs: dict) -> tuple[int, bool] | None:
    """``(dim, keepdim)`` when ``name(*args, **kwargs)`` is a reduction (amax, mean, ...) over one
    dimension of a tensor, else None."""
    if name not in _REDUCE or not args or not isinstance(args[0], torch.Tensor):
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return dim % args[0].ndim, bool(keep)


class _PoolSpy(TorchFunctionMode):
    """Records the input of every global spatial pooling a forward pass performs: one reduction over
    both spatial dimensions, or two in a row, one per dimension (ONNX graphs exported from
    ``AdaptiveMaxPool2d(1)`` reduce the width and then the height, as the replaying surrogate does)."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []
        # output of a one-dimension spatial reduction -> (its 4-D input, the input dim it reduced,
        # keepdim, the output itself: held so that its id is not reused while it is recorded)
        self._half: dict[int, tuple[torch.Tensor, int, bool, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _global_spatial(name, args, kwargs):
            self.maps.append(args[0])
            return func(*args, **kwargs)
        one = _one_spatial(name, args, kwargs)
        out = func(*args, **kwargs)
        if one is not None and isinstance(out, torch.Tensor):
            dim, keep = one
            src = args[0]
            if id(src) in self._half and self._half[id(src)][3] is src:
                orig, done, keep0, _ = self._half.pop(id(src))
                # the second reduction's dim in the first one's input (shifted where keepdim was false)
                d0 = dim if keep0 or dim < done else dim + 1
                if {done, d0} == {2, 3}:
                    self.maps.append(orig)
            elif src.ndim == 4 and dim in (2, 3):
                self._half[id(out)] = (src, dim, keep, out)
        return out


def pooled_map(clf: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, fmap)``: ``clf.logits(x)`` and the map its last global pooling reduced,
    ``(N, K, h, w)`` float (dequantized; in the autograd graph when ``x`` requires grad), or
    ``None`` when the forward pass is not PyTorch or pools nothing."""
    spy = _PoolSpy()
    with spy:
        logits = clf.logits(x)
    if not spy.maps:
        return logits, None
    fmap = spy.maps[-1]
    if fmap.is_quantized:
        fmap = fmap.dequantize()
    return logits, fmap.float()


def map_reader(clf: Classifier, probe: torch.Tensor, who: str) -> tuple[Classifier, str]:
    """The classifier to read feature maps from, and which it is: the artifact (``"artifact"``) when
    it exposes FEATURES and its forward is PyTorch, else its surrogate (``"surrogate"``), tried on
    ``probe`` (a few ``(n, C, H, W)`` images in [0, 1]). One-line error when neither yields a map."""
    candidates = []
    if Capability.FEATURES in clf.capabilities:
        candidates.append((clf, "artifact"))
    if clf.surrogate is not None and Capability.FEATURES in clf.surrogate.capabilities:
        candidates.append((clf.surrogate, "surrogate"))
    for cand, where in candidates:
        with torch.no_grad():
            _, fmap = pooled_map(cand, probe)
        if fmap is not None:
            return cand, where
    raise BackdoorLabError(f"{who} needs a convolutional feature map (the input of the model's global pooling), "
                           f"which neither the {clf.precision} artifact nor a surrogate exposes")
