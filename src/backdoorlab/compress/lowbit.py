"""``int4-w`` and ``w4a8``: low-bit weights (and 8-bit activations), simulated by fake-quant.

* ``int4-w``: weight-only INT4, symmetric, per output channel or group-wise (``group_size``
  consecutive weights of each output channel's flattened ``I * kh * kw`` row share one scale),
  as in weight-only LLM/CNN quantizers (e.g. GPTQ's RTN baseline, Frantar et al. ICLR 2023;
  AWQ, Lin et al. MLSys 2024, group size 128). Round-to-nearest, no calibration. Every conv and
  linear weight is quantised after BatchNorm is folded into the preceding conv
  (:func:`~backdoorlab.compress.layers.fold_batchnorm`), as a deployment would.
* ``w4a8``: the same weights plus 8-bit asymmetric per-tensor activations at the input of every
  conv and linear, with MinMax ranges calibrated on ``calib_size`` clean images.

**Simulated, and the rows say so** (``info["simulated"] = True``, a column of its own in the
store; no latency is reported for them): no CPU runtime here provides int4 *convolution*
kernels. The int4 kernels that exist on CPU are for matrix products only (torchao's
``Int4WeightOnlyConfig`` with its CPU layout, ONNX Runtime's ``MatMulNBits``, NNCF's
``compress_weights`` INT4 modes for OpenVINO), written for language models; a CNN would run only
its last Linear in int4.

Both run as float PyTorch modules (weights hold the quantise-dequantise values, at most
``2^bits`` levels per channel or group), so they keep GRAD and FEATURES and need no surrogate.
``size_bytes`` is the size the artifact would have with packed ``bits``-bit weights plus one
float32 scale per channel/group (the other tensors as saved), not the simulation's FP32 size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier, state_dict_bytes
from ..data.tensordata import TensorData
from ..errors import check
from .base import CalibratedConfig, CompressionConfig
from .calib import batches, calibration_images, input_shape
from .fakequant import FakeQuant, quantize_weight
from .layers import CONV, LINEAR, count_layers, describe_int8, fold_batchnorm


def _check_group(name: str, group_size: int | None, bits: int) -> None:
    check(group_size is None or (isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0),
          f"{name}: group_size must be a positive integer or null (per channel), got {group_size!r}")
    check(isinstance(bits, int) and 2 <= bits <= 8, f"{name}: bits must be an integer in [2, 8], got {bits!r}")


@dataclass(frozen=True)
class Int4WeightConfig(CompressionConfig):
    """``group_size``: ``None`` = per output channel, else weights per group; ``bits``: 4."""

    name = "int4-w"
    group_size: int | None = None
    bits: int = 4

    def validate(self) -> None:
        _check_group(self.name, self.group_size, self.bits)


@dataclass(frozen=True)
class W4A8Config(CalibratedConfig):
    """INT4 weights (as ``int4-w``) + 8-bit activations calibrated on ``calib_size`` images."""

    name = "w4a8"
    group_size: int | None = None
    bits: int = 4

    def validate(self) -> None:
        super().validate()
        _check_group(self.name, self.group_size, self.bits)


def quantize_weights_(model: nn.Module, bits: int, group_size: int | None) -> int:
    """Replace every conv/linear weight of ``model`` by its fake-quant value, in place.
    Returns the packed size saving in bytes (FP32 weights -> ``bits``-bit + fp32 scales)."""
    saved = 0
    for m in model.modules():
        if isinstance(m, CONV + LINEAR):
            w_hat, scale = quantize_weight(m.weight, bits, group_size)
            with torch.no_grad():
                m.weight.copy_(w_hat)
            saved += packed_saving(m.weight.numel(), bits, scale.numel())
    return saved


def packed_saving(n: int, bits: int, n_scales: int) -> int:
    """Bytes saved by storing ``n`` FP32 weights as packed ``bits``-bit integers plus
    ``n_scales`` FP32 scales."""
    return n * 4 - (math.ceil(n * bits / 8) + n_scales * 4)


def _wrap_inputs_(model: nn.Module) -> list[FakeQuant]:
    """Put an observing :class:`FakeQuant` in front of every conv/linear; returns them."""
    fqs = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CONV + LINEAR):
                fq = FakeQuant(observe=True, bits=8)
                setattr(parent, name, nn.Sequential(fq, child))
                fqs.append(fq)
    return fqs


def _lowbit(cfg: Int4WeightConfig | W4A8Config, model: nn.Module, calib: TensorData | None,
            device: torch.device, act: bool) -> Classifier:
    sim = fold_batchnorm(model).cpu().float()
    saved = quantize_weights_(sim, cfg.bits, cfg.group_size)
    return lowbit_classifier(cfg, sim, count_layers(model), saved, calib, device, act)


def lowbit_classifier(cfg: Int4WeightConfig | W4A8Config, sim: nn.Module, total: dict, saved: int,
                      calib: TensorData | None, device: torch.device, act: bool) -> Classifier:
    """The deployed classifier around ``sim``, a BN-folded model whose weights already hold their
    quantised values (round-to-nearest here, or a repair's own rounding, e.g. EFRAP's)."""
    shape = input_shape(calib)
    if act:
        x = calibration_images(calib, cfg.calib_size, cfg.name)
        fqs = _wrap_inputs_(sim)
        with torch.no_grad():
            for xb in batches(x, 128):
                sim(xb)
        for fq in fqs:
            fq.freeze()
        shape = tuple(x.shape[1:])
    clf = TorchClassifier(sim, precision=cfg.tag(), device=device,
                          capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    clf._size_bytes = state_dict_bytes(sim) - saved
    clf.input_shape = shape
    clf.int8_layers = describe_int8({}, total)
    granularity = "per-channel" if cfg.group_size is None else f"group {cfg.group_size}"
    clf.info = {"weights": f"int{cfg.bits} symmetric {granularity}: {describe_int8(total, total)}",
                "activations": "uint8 per-tensor (MinMax)" if act else "fp32", "size": "packed estimate",
                "runtime": "torch", "runtime_version": torch.__version__, "simulated": True}
    return clf


def int4_w(cfg: Int4WeightConfig, model: nn.Module, *, calib: TensorData | None, device: torch.device,
           artifact: dict | None = None) -> Classifier:
    return _lowbit(cfg, model, calib, device, act=False)


def w4a8(cfg: W4A8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
         artifact: dict | None = None) -> Classifier:
    return _lowbit(cfg, model, calib, device, act=True)
