"""Deployment: a compression config is handled by a registered function that returns a
:class:`~backdoorlab.classifier.Classifier` for the model as it ships.

Registered (``COMPRESSIONS.names()``):

============================  ==============================================================
``fp32``                      the PyTorch eager FP32 model (the reference)
``fp16``, ``bf16``            the whole model in half precision (:mod:`.half`)
``int8-dynamic``              ``quantize_dynamic``: Linear in int8, convs FP32 (:mod:`.dynamic`)
``int8-torch``                FX static PTQ, x86/fbgemm int8 kernels (:mod:`.torch_int8`)
``fp32-ort``, ``int8-ort``    ONNX Runtime FP32 / ``quantize_static`` QDQ int8 (:mod:`.ort`)
``int8-ort-qop``              the same int8 model in ONNX Runtime's QOperator form (:mod:`.ort`)
``fp32-openvino``             the FP32 export on OpenVINO's CPU plugin (:mod:`.openvino_rt`)
``int8-openvino``             NNCF PTQ int8 on OpenVINO's CPU plugin (:mod:`.openvino_rt`)
``fp32-tflite``               the same litert-torch conversion in float32, LiteRT (:mod:`.tflite`)
``int8-tflite``               LiteRT full-integer int8 (int8 I/O), litert-torch PT2E (:mod:`.tflite`)
``int8-pt2e``                 PT2E x86 PTQ (torchao), Inductor -> oneDNN int8 kernels (:mod:`.pt2e`)
``fp32-executorch``           the float ``.pte``, XNNPACK FP32 kernels (:mod:`.executorch_rt`)
``int8-executorch``           PT2E XNNPACK PTQ, ``.pte`` run by ExecuTorch (:mod:`.executorch_rt`)
``int4-w``, ``w4a8``          INT4 weights (+ 8-bit activations), fake-quant (:mod:`.lowbit`)
``prune-l1[-30|-50|-70]``     unstructured magnitude pruning (:mod:`.prune`)
``prune-channel[-30|-50|-70]`` L1 filter pruning (:mod:`.prune`)
============================  ==============================================================

A spec is a name, ``{name: ..., **params}``, a chain ``"prune-l1-50+int8-torch"`` or a list of
specs (applied left to right; the result's ``precision`` joins the steps with ``+``).
``COMPRESSIONS.validate(spec)`` checks names, parameter names, parameter values and chaining
without doing any work (``Study.validate`` calls it). Handlers import ONNX Runtime and
``torch.ao`` lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..classifier import Classifier
from ..data.tensordata import TensorData
from ..utils import resolve_device
from .base import DEFAULT_CALIB_SIZE, CompressionConfig, CompressionRegistry, parse_chain
from .calib import input_shape
from .layers import count_layers, describe_int8

COMPRESSIONS = CompressionRegistry()


def _register() -> None:
    from . import dynamic, half, lowbit, openvino_rt, ort, prune, tflite, torch_int8

    add = COMPRESSIONS.add
    add("fp32", half.FP32Config, half.fp32)
    add("fp16", half.HalfConfig, half.half, dtype="float16")
    add("bf16", half.HalfConfig, half.half, dtype="bfloat16")
    add("int8-dynamic", dynamic.DynamicConfig, dynamic.int8_dynamic)
    add("int8-torch", torch_int8.TorchInt8Config, torch_int8.int8_torch)
    add("fp32-ort", ort.OrtFP32Config, ort.fp32_ort)
    add("int8-ort", ort.OrtInt8Config, ort.int8_ort)
    add("int8-ort-qop", ort.OrtQOpConfig, ort.int8_ort)
    add("fp32-openvino", openvino_rt.OpenVinoFP32Config, openvino_rt.fp32_openvino)
    add("int8-openvino", openvino_rt.OpenVinoInt8Config, openvino_rt.int8_openvino)
    add("fp32-tflite", tflite.TfliteFP32Config, tflite.fp32_tflite)
    add("int8-tflite", tflite.TfliteInt8Config, tflite.int8_tflite)
    from . import executorch_rt, pt2e
    add("int8-pt2e", pt2e.Pt2eInt8Config, pt2e.int8_pt2e)
    add("fp32-executorch", executorch_rt.ExecutorchFP32Config, executorch_rt.fp32_executorch)
    add("int8-executorch", executorch_rt.ExecutorchInt8Config, executorch_rt.int8_executorch)
    add("int4-w", lowbit.Int4WeightConfig, lowbit.int4_w)
    add("w4a8", lowbit.W4A8Config, lowbit.w4a8)
    add("prune-l1", prune.PruneL1Config, prune.prune_l1)
    add("prune-channel", prune.PruneChannelConfig, prune.prune_channel)
    for pct in (30, 50, 70):
        add(f"prune-l1-{pct}", prune.PruneL1Config, prune.prune_l1, sparsity=pct / 100)
        add(f"prune-channel-{pct}", prune.PruneChannelConfig, prune.prune_channel, sparsity=pct / 100)


_register()


def validate_compression(spec: Any) -> None:
    """Raise a one-line :class:`~backdoorlab.errors.BackdoorLabError` if ``spec`` is not a valid
    (possibly chained) compression; does no work. Same as ``COMPRESSIONS.validate(spec)``."""
    COMPRESSIONS.validate(spec)


def compress(spec: Any, model: nn.Module, *, calib: TensorData | None = None,
             device: str | torch.device = "auto", artifact: dict[str, Any] | None = None) -> Classifier:
    """Deploy ``model`` (an ``ImageClassifier``, eval mode) as ``spec`` says.

    ``calib``: the defender's clean holdout (uint8 NHWC or float NCHW ``TensorData``); calibrated
    compressions use its first ``calib_size`` images. ``device``: where float modules and
    surrogates run (``auto``: CUDA if present); int8 artifacts always run on CPU.
    ``artifact``: what an earlier call returned as ``clf.artifact`` for the same spec, model and
    calibration set; the last step then rebuilds from it instead of calibrating.
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    stages = COMPRESSIONS.stages(spec)
    current = model
    infos = []
    clf: Classifier | None = None
    for i, (cfg, handler) in enumerate(stages):
        last = i == len(stages) - 1
        clf = handler(cfg, current, calib=calib, device=dev, artifact=artifact if last else None)
        infos.append({"precision": cfg.tag(), **getattr(clf, "info", {})})
        if not last:
            current = clf.module  # type: ignore[attr-defined]  # chainable steps return TorchClassifier
    assert clf is not None
    if len(stages) > 1:
        clf.precision = "+".join(cfg.tag() for cfg, _ in stages)
        clf.info = {**clf.info, "steps": infos}
        if clf.surrogate is not None:
            clf.surrogate.precision = f"{clf.precision}/surrogate"
    if clf.input_shape is None:
        clf.input_shape = input_shape(calib)
    if not clf.int8_layers:  # say "none" explicitly: conv:0/N, linear:0/M
        clf.int8_layers = describe_int8({}, count_layers(model))
    # every artifact says which runtime ran it, which version, and whether it was simulated
    info = getattr(clf, "info", None) or {}
    clf.info = {"runtime": "torch", "runtime_version": torch.__version__, "simulated": False, **info}
    if any(s.get("simulated") for s in clf.info.get("steps", [])):
        clf.info["simulated"] = True
    return clf


__all__ = ["COMPRESSIONS", "DEFAULT_CALIB_SIZE", "CompressionConfig", "compress", "parse_chain",
           "validate_compression"]
