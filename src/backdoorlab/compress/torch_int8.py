"""``int8-torch``: post-training static quantization with real int8 kernels (PyTorch FX flow).

Follows PyTorch's "(prototype) FX Graph Mode Post Training Static Quantization" tutorial and the
``torch.ao.quantization`` x86 backend docs: ``prepare_fx`` with
``get_default_qconfig_mapping("x86")`` (weights per-channel symmetric int8 via
``PerChannelMinMaxObserver``, activations per-tensor affine quint8 via ``HistogramObserver`` with
``reduce_range=True``, i.e. 7-bit, as the x86/fbgemm kernels need on CPUs without VNNI),
Conv-BatchNorm(-ReLU) fused so **BatchNorm is folded** into the conv weights, calibration on
``calib_size`` clean images, then ``convert_fx``: quantized ``Conv2d``/``ConvReLU2d``/``Linear``
modules running ``quantized::conv2d(_relu)`` / ``quantized::linear`` on CPU.

Kernels: PyTorch's x86 int8 stack has two kernel libraries, FBGEMM and oneDNN. By default
(``backend="onednn"``) the weights are packed for, and run by, oneDNN, the library PT2E's
``X86InductorQuantizer`` also lowers to; the qconfig stays the x86 one above. The ``x86`` engine's
own heuristic picks FBGEMM on CPUs without VNNI, which ran batch 256 1.5x slower than oneDNN on
the AVX2 machine of ``benchmarks/bench_compress.py`` (same integers; logits differ by at most
~1e-3 from requantization rounding). ``backend="x86"`` or ``"fbgemm"`` selects FBGEMM.

Normalize stays inside the graph (FP32 ``sub``/``div`` before the first ``quantize_per_tensor``).
The graph returns ``(logits, features)``, so the artifact keeps FEATURES; it has no input
gradient, so it carries a surrogate built from the artifact itself
(:func:`backdoorlab.compress.surrogate.fx_surrogate`).

PT2E (``X86InductorQuantizer``) moved out of PyTorch into torchao; FX is the flow PyTorch
itself still ships, so it is the one used here (no extra dependency).

The artifact to cache is the converted model's ``state_dict`` (int8 packed weights, scales and
zero-points); :func:`int8_torch` rebuilds the module from it without calibrating again.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check
from .base import CalibratedConfig, DualOutput, LogitsAndFeatures
from .calib import batches, calibration_images, input_shape
from .layers import count_layers, describe_int8

# backend -> (quantized engine that packs and runs the kernels, default qconfig of torch.ao)
BACKENDS = {"x86": ("x86", "x86"), "fbgemm": ("fbgemm", "fbgemm"), "onednn": ("onednn", "x86")}


@dataclass(frozen=True)
class TorchInt8Config(CalibratedConfig):
    """``backend``: which of PyTorch's x86 int8 kernel libraries runs the model.

    * ``onednn`` (default): oneDNN kernels (those PT2E's ``X86InductorQuantizer`` lowers to) with
      the **x86 qconfig**, i.e. the same 7-bit activations and per-channel weights as ``x86``.
      PyTorch's own ``onednn`` qconfig uses 8-bit activations, which can saturate the int16
      accumulation of ``vpmaddubsw`` on CPUs without VNNI; 7 bits cannot. Same integers as
      ``x86`` up to kernel rounding, faster on AVX2 machines (see BENCHMARKS.md).
    * ``x86``: PyTorch's x86 engine and qconfig; the engine picks FBGEMM or oneDNN per op by its
      own heuristic (FBGEMM on CPUs without VNNI).
    * ``fbgemm``: FBGEMM kernels and qconfig.
    """

    name = "int8-torch"
    backend: str = "onednn"

    def validate(self) -> None:
        super().validate()
        check(self.backend in BACKENDS, f"int8-torch: backend must be one of {', '.join(BACKENDS)}, "
                                        f"got {self.backend!r}")


@contextlib.contextmanager
def ao_quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation and observer warnings (they say nothing to a user here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*quantize_per_tensor.*")
        yield


@contextlib.contextmanager
def quant_engine(name: str) -> Iterator[None]:
    """Use quantized engine ``name`` inside the block (restores the previous one)."""
    if name not in torch.backends.quantized.supported_engines:
        raise BackdoorLabError(f"this PyTorch build has no {name!r} quantized engine "
                               f"(has: {', '.join(torch.backends.quantized.supported_engines)})")
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = prev


def _convert(model: nn.Module, cfg: TorchInt8Config, calib_x: torch.Tensor | None,
             example: torch.Tensor) -> torch.fx.GraphModule:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    wrapped = LogitsAndFeatures(copy.deepcopy(model).cpu().float().eval())
    try:
        prepared = prepare_fx(wrapped, get_default_qconfig_mapping(BACKENDS[cfg.backend][1]),
                              example_inputs=(example,))
    except Exception as exc:  # symbolic tracing failed: data-dependent control flow etc.
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackdoorLabError(f"int8-torch: the model cannot be traced by torch.fx: {line}") from None
    if calib_x is not None:
        with torch.no_grad():
            for xb in batches(calib_x, 64):
                prepared(xb)
    return convert_fx(prepared)


def int8_torch(cfg: TorchInt8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
               artifact: dict | None = None) -> Classifier:
    from torch.ao.nn import quantized as nnq

    from .surrogate import fx_surrogate

    shape = input_shape(calib)
    with ao_quiet(), quant_engine(BACKENDS[cfg.backend][0]):
        if artifact is not None:
            example = torch.zeros(1, *artifact["input_shape"])
            q = _convert(model, cfg, None, example)
            q.load_state_dict(artifact["state_dict"])
            shape = tuple(artifact["input_shape"])
        else:
            x = calibration_images(calib, cfg.calib_size, "int8-torch")
            shape = tuple(x.shape[1:])
            q = _convert(model, cfg, x, x[:1])
        sur = fx_surrogate(q)
    mods = list(q.modules())
    int8 = {"conv": sum(isinstance(m, nnq.Conv2d) for m in mods),
            "linear": sum(isinstance(m, nnq.Linear) for m in mods)}
    clf = TorchClassifier(DualOutput(q), precision=cfg.tag(), device=torch.device("cpu"),
                          capabilities=frozenset({Capability.FEATURES}))
    clf.int8_layers = describe_int8(int8, count_layers(model))
    clf.input_shape = shape
    clf.surrogate = TorchClassifier(DualOutput(sur), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    clf.artifact = {"state_dict": q.state_dict(), "input_shape": list(shape), "backend": cfg.backend}
    clf.info = {"backend": cfg.backend, "calib_size": cfg.calib_size}
    return clf
