"""``int8-tflite``: full-integer int8 LiteRT (TensorFlow Lite), run by the LiteRT interpreter;
``fp32-tflite``: the same conversion without quantization (float32 ``.tflite``), its speed reference.

The deployment Ma et al. attack ("Quantization Backdoors to Deep Learning Commercial
Frameworks", IEEE TDSC 2023): TFLite post-training full-integer quantization with a
representative dataset of 100 images, int8 weights *and* activations, int8 model inputs and
outputs, as the LiteRT docs prescribe for integer-only accelerators ("Post-training integer
quantization", ai.google.dev/edge/litert/models/post_training_integer_quant).

Route: litert-torch's PT2E static quantization (``litert_torch.quantize.pt2e_quantizer`` and
``QuantConfig``, as its own conversion tests ``test_convert_resnet18_pt2e_per_channel`` use it):

1. The ``ImageClassifier`` wrapped in :class:`~backdoorlab.compress.base.LogitsAndFeatures`
   (two outputs: logits ``(N, K)`` and penultimate features ``(N, D)``) is rewritten into ops
   the PT2E quantizer annotates and litert-torch lowers, each exact in float: ``Normalize``
   ``(x - mean) / std`` becomes ``x * (1 / std) + (-mean / std)`` (int8 MUL and ADD; TFLite has
   no int8 DIV, and an unannotated SUB/DIV would leave a float island in front of the first
   quantize, i.e. a float input), and ``AdaptiveMaxPool2d(1)`` becomes a max pool over the whole
   map (litert-torch has no lowering for ``adaptive_max_pool2d``).
2. ``torch.export`` at batch 1, ``prepare_pt2e`` with litert-torch's
   ``PT2EQuantizer(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))``
   (int8 symmetric per-channel weights in [-127, 127], int8 affine per-tensor activations),
   calibration on the first ``calib_size`` (100, as in Ma et al.) images of the defender's clean
   split, one image per call as a TFLite representative dataset yields them; ``convert_pt2e``
   (Q/DQ graph); ``litert_torch.convert(..., quant_config=
   QuantConfig(pt2e_quantizer=...))``, whose STATIC QDQ conversion folds every Q/DQ pair into
   int8 TFLite kernels. The result is already full-integer: the input and both outputs are int8
   tensors (no QUANTIZE/DEQUANTIZE ops at the edges), so neither ``ai_edge_quantizer`` nor TF's
   ``modify_model_interface`` is needed. The handler checks this (kernel truth below).

   Activation ranges: ``calibration="minmax"`` (default) replaces the quantizer's
   HistogramObserver with a MinMaxObserver, so the ranges are the min/max over the
   representative dataset, as TensorFlow's ``TFLiteConverter`` (which Ma et al. used)
   calibrates. ``"histogram"`` keeps litert-torch's default, which clips outliers: on the
   BadNets GTSRB test model it keeps clean accuracy (0.959 vs 0.960 FP32) but cuts the ASR from
   0.939 to 0.850, because the trigger's activations lie outside the clean images' clipped
   ranges; MinMax keeps it (0.939).
3. The ``.tflite`` bytes run in ``ai_edge_litert.interpreter.Interpreter`` (builtin kernels
   with the default XNNPACK delegate). :class:`TfliteClassifier` quantizes NCHW float input in
   [0, 1] with the input tensor's own scale/zero-point (the model keeps NCHW input; litert-torch
   inserts the TRANSPOSE to NHWC inside) and dequantizes the int8 outputs with theirs. The model
   is converted at batch 1 and run one image per ``invoke``: litert-torch writes batch-specific
   RESHAPE shapes (``[1, D]``), so ``resize_tensor_input`` fails in XNNPACK; with a dynamic batch
   (``dynamic_shapes``) litert-torch 0.10 cannot lower ``flatten`` (a symbolic view), and with a
   static ``reshape(-1, D)`` it still fixes the batch of every tensor after the first MUL. On the
   small CNN at 32x32 one image takes about 0.4 ms on one core.

Kernel truth: ``int8_layers`` counts CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops of the
flatbuffer whose input and weight tensors are int8 (``Interpreter._get_ops_details``); ``info``
records ``io_dtype`` from the input/output tensors.

Surrogate: :class:`TfliteInt8Module` replays the flatbuffer's own graph in PyTorch (ops, options,
int8 weights with their per-channel scales, int32 biases, every int8 tensor's scale/zero-point)
with :func:`~backdoorlab.compress.fakequant.fake_quant` (straight-through) at each int8 tensor,
so gradient defenses see the artifact's numerics; what differs is TFLite's fixed-point
requantization rounding.

The artifact is ``{"tflite": uint8 tensor of the flatbuffer, "input_shape": [C, H, W]}``.

``fp32-tflite`` takes steps 1 and 3 without the quantizer: the same :func:`_tflite_ready` rewrites,
``torch.export`` at batch 1 and ``litert_torch.convert`` with no ``quant_config`` give a float32
flatbuffer (float32 input and outputs, FP32 CONV_2D / FULLY_CONNECTED kernels, XNNPACK's F32
path), run by the same :class:`TfliteClassifier` (no quantize/dequantize at the edges). Its
logits are checked against PyTorch's at conversion. It has no calibration (the first image of
``calib`` only gives the input shape) and its surrogate is a copy of the float model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata
import io
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check, require_extra
from .base import CalibratedConfig, CompressionConfig, DualOutput, LogitsAndFeatures
from .calib import calibration_images
from .fakequant import FakeQuant, qrange
from .layers import count_layers, describe_int8

TFLITE_CALIB_SIZE = 100  # Ma et al.'s representative dataset; the LiteRT docs use "around 100-500"


CALIBRATIONS = ("minmax", "histogram")


@dataclass(frozen=True)
class TfliteInt8Config(CalibratedConfig):
    """``calib_size``: images in the representative dataset (Ma et al.: 100); ``calibration``:
    activation ranges from ``minmax`` (the min/max over the representative dataset, as TFLite's
    converter calibrates) or ``histogram`` (litert-torch's PT2E default, HistogramObserver, which
    clips outliers to minimise the L2 rounding error); ``per_channel``: per-channel int8 weights
    (the default of both converters; ``False`` for comparison); ``threads``: interpreter threads
    (``None``: torch's)."""

    name = "int8-tflite"
    calib_size: int = TFLITE_CALIB_SIZE
    calibration: str = "minmax"
    per_channel: bool = True
    threads: int | None = None

    def validate(self) -> None:
        super().validate()
        check(self.calibration in CALIBRATIONS, f"int8-tflite: calibration must be one of "
                                                f"{', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        check(isinstance(self.per_channel, bool), f"int8-tflite: per_channel must be true or false, "
                                                  f"got {self.per_channel!r}")
        _check_threads(self)


@dataclass(frozen=True)
class TfliteFP32Config(CompressionConfig):
    """``fp32-tflite``: the float32 ``.tflite`` of the same litert-torch conversion, in the same
    LiteRT interpreter: the fair FP32 baseline for ``int8-tflite``'s speed. ``threads``:
    interpreter threads (``None``: torch's)."""

    name = "fp32-tflite"
    threads: int | None = None

    def validate(self) -> None:
        _check_threads(self)


def _check_threads(cfg: Any) -> None:
    check(cfg.threads is None or (isinstance(cfg.threads, int) and not isinstance(cfg.threads, bool)
                                  and cfg.threads > 0),
          f"{cfg.name}: threads must be a positive integer, got {cfg.threads!r}")


# ----------------------------------------------------------------------------- quiet library calls
@contextlib.contextmanager
def _quiet() -> Any:
    """litert-torch, JAX, absl and the LiteRT runtime log to the process's stdout/stderr from C++
    and through ``rich``; silence both file descriptors and Python's loggers for one call."""
    loggers = [logging.getLogger(n) for n in ("", "absl", "jax", "torch.export", "torch._dynamo", "litert_torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- conversion
class _MulAdd(nn.Module):
    """``Normalize`` as ``x * (1 / std) + (-mean / std)``: int8 MUL and ADD in TFLite."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", (1.0 / std).detach().clone())
        self.register_buffer("shift", (-mean / std).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(torch.mul(x, self.scale), self.shift)


class _GlobalMaxPool(nn.Module):
    """``AdaptiveMaxPool2d(1)`` as a max pool over the whole (static) map: MAX_POOL_2D in TFLite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, tuple(x.shape[-2:]))


def _tflite_ready(model: nn.Module) -> nn.Module:
    """A float copy of ``model`` (eval, NCHW) with the ops litert-torch cannot quantize or lower
    replaced by exact equivalents it can (see the module docstring)."""
    from ..models.common import Normalize

    model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Normalize):
                setattr(parent, name, _MulAdd(child.mean, child.std))
            elif isinstance(child, nn.AdaptiveMaxPool2d) and child.output_size in (1, (1, 1)) \
                    and not child.return_indices:
                setattr(parent, name, _GlobalMaxPool())
    return model


def _quant_config(pq: Any, cfg: TfliteInt8Config) -> Any:
    """litert-torch's static int8 config (symmetric int8 weights, affine int8 activations), with
    MinMax activation observers for ``calibration="minmax"``."""
    qc = pq.get_symmetric_quantization_config(is_per_channel=cfg.per_channel, is_dynamic=False)
    if cfg.calibration == "minmax":
        from torchao.quantization.pt2e.observer import MinMaxObserver

        act = dataclasses.replace(qc.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        qc = dataclasses.replace(qc, input_activation=act, output_activation=act)
    return qc


def convert_tflite(model: nn.Module, x: torch.Tensor, cfg: TfliteInt8Config | TfliteFP32Config,
                   quantize: bool) -> bytes:
    """``.tflite`` bytes of ``model`` by litert-torch: full-integer int8 calibrated on ``x``
    ``(n, C, H, W)`` in [0, 1] when ``quantize`` (PT2E route), else float32 (only ``x[:1]`` is
    used, as the example input). One-line error if the model cannot be converted."""
    who = cfg.name
    with _quiet():  # importing litert-torch (JAX, torchao) logs from C++
        require_extra("litert_torch", "tflite", who)
        if quantize:
            require_extra("torchao", "tflite", who)
        import litert_torch

    wrapped = LogitsAndFeatures(_tflite_ready(model)).eval()
    args = (x[:1].cpu().float().contiguous(),)
    try:
        with _quiet(), torch.no_grad():
            gm = torch.export.export(wrapped, args).module()
            quant_config = None
            if quantize:
                from litert_torch.quantize import pt2e_quantizer as pq
                from litert_torch.quantize.quant_config import QuantConfig
                from torchao.quantization.pt2e import move_exported_model_to_eval
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = pq.PT2EQuantizer().set_global(_quant_config(pq, cfg))
                gm = prepare_pt2e(gm, quantizer)
                for i in range(len(x)):  # a representative dataset yields one image at a time
                    gm(x[i:i + 1].cpu().float().contiguous())
                gm = move_exported_model_to_eval(convert_pt2e(gm, fold_quantize=False))
                gm.training = False
                quant_config = QuantConfig(pt2e_quantizer=quantizer)
            edge = litert_torch.convert(gm, args, quant_config=quant_config)
            data = edge.model_content()
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300] or type(exc).__name__
        kind = "int8" if quantize else "float32"
        raise BackdoorLabError(f"the model cannot be converted to {kind} TFLite with litert-torch: {msg}") from None
    return bytes(data)


def convert_int8(model: nn.Module, x: torch.Tensor, cfg: TfliteInt8Config) -> bytes:
    """Full-integer int8 ``.tflite`` bytes of ``model`` calibrated on ``x`` (:func:`convert_tflite`)."""
    return convert_tflite(model, x, cfg, quantize=True)


# ----------------------------------------------------------------------------- the classifier
def _interpreter(model_bytes: bytes, threads: int | None, who: str = "int8-tflite") -> Any:
    with _quiet():
        Interpreter = require_extra("ai_edge_litert.interpreter", "tflite", who).Interpreter
        it = Interpreter(model_content=model_bytes, num_threads=threads or torch.get_num_threads())
        it.allocate_tensors()
    return it


def _quantize_np(x: np.ndarray, dtype: Any, q: tuple[float, int]) -> np.ndarray:
    """float -> the tensor's integer type with its (scale, zero_point), round half to even (as
    :func:`~backdoorlab.compress.fakequant.fake_quant`, which the surrogate uses)."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / q[0]) + q[1], info.min, info.max).astype(dtype)


def _dequantize_np(a: np.ndarray, q: tuple[float, int]) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer) or q[0] == 0:
        return a.astype(np.float32)
    return ((a.astype(np.float32) - q[1]) * np.float32(q[0])).astype(np.float32)


class TfliteClassifier(Classifier):
    """A ``.tflite`` model in the LiteRT interpreter (CPU, XNNPACK).

    ``logits(x)``: ``(N, C, H, W)`` float in [0, 1] -> ``(N, K)`` float32 (CPU): each image is
    quantized with the input tensor's scale/zero-point (an int8 model; a float32 model takes it
    as it is), transposed if the model takes NHWC, run by one ``invoke`` (the model has batch 1),
    and int8 outputs are dequantized with their own parameters (float32 outputs pass through).
    FEATURES when the signature has a second output. No GRAD: see ``surrogate``.
    """

    def __init__(self, model_bytes: bytes, precision: str, input_shape: tuple[int, int, int],
                 threads: int | None = None):
        self.model_bytes = bytes(model_bytes)
        self.precision = precision
        self.device = torch.device("cpu")
        self.input_shape = tuple(input_shape)
        self.interpreter = _interpreter(self.model_bytes, threads, precision)
        self.runner = self.interpreter.get_signature_runner()
        ins = self.runner.get_input_details()
        outs = self.runner.get_output_details()
        check(len(ins) == 1, f"{precision}: the TFLite model must have one input, it has {len(ins)}")
        (self.input_name, inp), = ins.items()
        self.output_names = sorted(outs, key=_natural)  # output_0 (logits), output_1 (features)
        self.input_dtype = inp["dtype"]
        self.input_q = tuple(inp["quantization"])
        self.output_q = {k: tuple(outs[k]["quantization"]) for k in self.output_names}
        self._out_shape = {k: tuple(int(d) for d in outs[k]["shape"][1:]) for k in self.output_names}
        self.io_dtypes = [np.dtype(self.input_dtype).name] + [np.dtype(outs[k]["dtype"]).name
                                                                for k in self.output_names]
        shape = tuple(int(s) for s in inp["shape"])
        c, h, w = self.input_shape
        if shape[1:] == (c, h, w):
            self.nhwc = False
        elif shape[1:] == (h, w, c):
            self.nhwc = True
        else:
            raise BackdoorLabError(f"{precision}: the TFLite model takes {list(shape)}, not images of {[c, h, w]}")
        check(shape[0] == 1, f"{precision}: the TFLite model must have batch 1, it has {shape[0]}")
        self.capabilities = frozenset({Capability.FEATURES} if len(self.output_names) > 1 else set())
        self.info = {}

    def _run(self, x: torch.Tensor, k: int) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32)
        if self.nhwc:
            arr = arr.permute(0, 2, 3, 1)
        arr = np.ascontiguousarray(arr.numpy())
        if np.issubdtype(self.input_dtype, np.integer):
            arr = _quantize_np(arr, self.input_dtype, self.input_q)
        name = self.output_names[k]
        out = [self.runner(**{self.input_name: arr[i:i + 1]})[name] for i in range(len(arr))]
        if not out:
            return torch.empty(0, *self._out_shape[name])
        return torch.from_numpy(_dequantize_np(np.concatenate(out), self.output_q[name]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, 0)

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        if layer != "penultimate" or Capability.FEATURES not in self.capabilities:
            raise BackdoorLabError(f"{self.precision} classifier exposes only the penultimate features")
        return self._run(x, 1)

    @property
    def size_bytes(self) -> int:
        return len(self.model_bytes)

    def ops(self) -> list[dict[str, Any]]:
        """The flatbuffer's ops in execution order (plus the ``DELEGATE`` node through which XNNPACK
        runs them): ``op_name`` and the dtype names of its inputs and outputs."""
        dtypes = {d["index"]: np.dtype(d["dtype"]).name for d in self.interpreter.get_tensor_details()}
        return [{"op_name": d["op_name"], "inputs": [dtypes.get(int(i)) for i in d["inputs"] if i >= 0],
                 "outputs": [dtypes.get(int(i)) for i in d["outputs"]]}
                for d in self.interpreter._get_ops_details()]


def count_int8(clf: TfliteClassifier) -> dict[str, int]:
    """CONV_2D / DEPTHWISE_CONV_2D and FULLY_CONNECTED ops whose input and weight are int8."""
    out = {"conv": 0, "linear": 0}
    for op in clf.ops():
        kind = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "conv", "FULLY_CONNECTED": "linear"}.get(op["op_name"])
        if kind and op["inputs"][:2] == ["int8", "int8"]:
            out[kind] += 1
    return out


# ----------------------------------------------------------------------------- the surrogate
def _enum_names(cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


_NP_TYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "UINT8": np.uint8, "INT64": np.int64,
             "INT16": np.int16, "INT8": np.int8, "BOOL": np.bool_}
_Q_RANGE = {"INT8": qrange(8, True), "UINT8": qrange(8, False), "INT16": qrange(16, True)}


def _act(y: torch.Tensor, code: int) -> torch.Tensor:
    """TFLite fused activation (``ActivationFunctionType``)."""
    if code == 0:
        return y
    if code == 1:
        return F.relu(y)
    if code == 2:
        return y.clamp(-1.0, 1.0)
    if code == 3:
        return F.relu6(y)
    if code == 4:
        return torch.tanh(y)
    raise BackdoorLabError(f"no surrogate for TFLite fused activation {code}")


def _same(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) of one spatial dimension."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pads_2d(x: torch.Tensor, o: Any, kh: int, kw: int, dh: int = 1, dw: int = 1) -> list[int]:
    """F.pad amounts ``[left, right, top, bottom]`` of an NCHW tensor for ``o.padding``."""
    if o.padding == 1:  # VALID
        return [0, 0, 0, 0]
    t, b = _same(x.shape[2], kh, o.strideH, dh)
    l, r = _same(x.shape[3], kw, o.strideW, dw)
    return [l, r, t, b]


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _conv(m: TfliteInt8Module, a: list, o: Any) -> torch.Tensor:
    x, w = _nchw(a[0]), a[1].permute(0, 3, 1, 2)  # OHWI -> OIHW
    dh, dw = getattr(o, "dilationHFactor", 1) or 1, getattr(o, "dilationWFactor", 1) or 1
    x = F.pad(x, _pads_2d(x, o, w.shape[2], w.shape[3], dh, dw))
    groups = x.shape[1] // w.shape[1]
    y = F.conv2d(x, w, a[2] if len(a) > 2 else None, (o.strideH, o.strideW), 0, (dh, dw), groups)
    return _act(_nhwc(y), o.fusedActivationFunction)


def _depthwise(m: TfliteInt8Module, a: list, o: Any) -> torch.Tensor:
    x, w = _nchw(a[0]), a[1].permute(3, 0, 1, 2)  # 1HW(C*mult) -> (C*mult)1HW
    dh, dw = getattr(o, "dilationHFactor", 1) or 1, getattr(o, "dilationWFactor", 1) or 1
    x = F.pad(x, _pads_2d(x, o, w.shape[2], w.shape[3], dh, dw))
    y = F.conv2d(x, w, a[2] if len(a) > 2 else None, (o.strideH, o.strideW), 0, (dh, dw), x.shape[1])
    return _act(_nhwc(y), o.fusedActivationFunction)


def _fully_connected(m: TfliteInt8Module, a: list, o: Any) -> torch.Tensor:
    x, w = a[0], a[1]
    lead = x.shape[:-1] if o.keepNumDims else (-1,)
    y = F.linear(x.reshape(-1, w.shape[1]), w, a[2] if len(a) > 2 else None)
    return _act(y.reshape(*lead, w.shape[0]), o.fusedActivationFunction)


def _pool(m: TfliteInt8Module, a: list, o: Any, kind: str) -> torch.Tensor:
    x = _nchw(a[0])
    k, s = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
    pads = _pads_2d(x, o, *k)
    if kind == "max":
        y = F.max_pool2d(F.pad(x, pads, value=float("-inf")) if any(pads) else x, k, s)
    elif any(pads):  # TFLite averages over the valid pixels only
        ones = torch.ones_like(x[:1, :1])
        y = F.avg_pool2d(F.pad(x, pads), k, s) / F.avg_pool2d(F.pad(ones, pads), k, s)
    else:
        y = F.avg_pool2d(x, k, s)
    return _act(_nhwc(y), o.fusedActivationFunction)


def _reshape(m: TfliteInt8Module, a: list, o: Any, out_shape: list[int]) -> torch.Tensor:
    """The static target shape with its batch dimension following the input's (the graph is
    converted at batch ``m.batch``; the surrogate runs any batch)."""
    x = a[0]
    if len(a) > 1 and a[1] is not None:
        shape = [int(v) for v in a[1].reshape(-1)]
    elif o is not None and getattr(o, "newShape", None) is not None and len(o.newShape):
        shape = [int(v) for v in o.newShape]
    else:
        shape = list(out_shape)
    if shape and shape[0] in (m.batch, -1):
        shape[0] = x.shape[0]
    return x.reshape(shape)


def _reduce_axes(x: torch.Tensor, axes: torch.Tensor) -> tuple[int, ...]:
    return tuple(sorted({int(v) % x.ndim for v in axes.reshape(-1)}))


def _pad(m: TfliteInt8Module, a: list, o: Any) -> torch.Tensor:
    x, p = a[0], a[1].reshape(-1, 2)
    pads = []
    for i in reversed(range(x.ndim)):
        pads += [int(p[i, 0]), int(p[i, 1])]
    return F.pad(x, pads, value=float(a[2].reshape(-1)[0]) if len(a) > 2 and a[2] is not None else 0.0)


def _squeeze(m: TfliteInt8Module, a: list, o: Any) -> torch.Tensor:
    x = a[0]
    dims = list(getattr(o, "squeezeDims", None) or [])
    if not dims:
        return x.squeeze()
    for d in sorted((d % x.ndim for d in dims), reverse=True):
        x = x.squeeze(d)
    return x


def _binary(fn):
    return lambda m, a, o: _act(fn(a[0], a[1]), getattr(o, "fusedActivationFunction", 0) if o else 0)


_OPS = {
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "MAX_POOL_2D": lambda m, a, o: _pool(m, a, o, "max"),
    "AVERAGE_POOL_2D": lambda m, a, o: _pool(m, a, o, "avg"),
    "MEAN": lambda m, a, o: a[0].mean(_reduce_axes(a[0], a[1]), keepdim=bool(o.keepDims)),
    "SUM": lambda m, a, o: a[0].sum(_reduce_axes(a[0], a[1]), keepdim=bool(o.keepDims)),
    "REDUCE_MAX": lambda m, a, o: a[0].amax(_reduce_axes(a[0], a[1]), keepdim=bool(o.keepDims)),
    "TRANSPOSE": lambda m, a, o: a[0].permute(*[int(v) for v in a[1].reshape(-1)]),
    "ADD": _binary(torch.add),
    "SUB": _binary(torch.sub),
    "MUL": _binary(torch.mul),
    "QUANTIZE": lambda m, a, o: a[0],  # the output's fake-quant does it
    "DEQUANTIZE": lambda m, a, o: a[0],  # values are already real numbers
    "RELU": lambda m, a, o: F.relu(a[0]),
    "RELU6": lambda m, a, o: F.relu6(a[0]),
    "CONCATENATION": lambda m, a, o: _act(torch.cat(a, o.axis), o.fusedActivationFunction),
    "PAD": _pad,
    "PADV2": _pad,
    "SQUEEZE": _squeeze,
}


class TfliteInt8Module(nn.Module):
    """The graph of a ``.tflite`` flatbuffer run by PyTorch ops, with fake-quant at every int8
    tensor's own scale/zero-point.

    Reads the first subgraph of the flatbuffer (``ai_edge_litert.tools.flatbuffer_utils``): its
    operators and their builtin options (padding, strides, fused activations), the constant
    buffers (int8 weights dequantized with their per-channel scales, int32 biases with theirs,
    int32 shapes/permutations/axes as they are) and the quantization parameters of every tensor.
    Tensors keep TFLite's layout (NHWC inside; convs and pools permute to NCHW and back).
    ``forward(x)``: ``(N, ...)`` the model input as float (for an int8 input: float in the
    input's real range, e.g. images in [0, 1], which it fake-quantizes first) -> the signature's
    outputs in order (a tuple when there are several), dequantized. Differentiable
    (straight-through at each rounding). Ops: ``sorted(_OPS)``; another op is one
    :class:`BackdoorLabError` line naming it (RESHAPE is handled in ``forward``).
    """

    def __init__(self, model_bytes: bytes):
        super().__init__()
        fb = require_extra("ai_edge_litert.tools.flatbuffer_utils", "tflite", "int8-tflite")
        from ai_edge_litert import schema_py_generated as schema

        model = fb.read_model_from_bytearray(bytearray(model_bytes))
        check(len(model.subgraphs) >= 1, "the TFLite model has no subgraph")
        g = model.subgraphs[0]
        op_names = _enum_names(schema.BuiltinOperator)
        type_names = _enum_names(schema.TensorType)
        self.tensor_types = [type_names.get(t.type, str(t.type)) for t in g.tensors]
        self.input = int(g.inputs[0])
        sig = model.signatureDefs[0].outputs if model.signatureDefs else None
        if sig:
            self.outputs = [int(t.tensorIndex) for t in sorted(sig, key=lambda t: _natural(t.name))]
        else:
            self.outputs = [int(i) for i in g.outputs]
        in_shape = list(g.tensors[self.input].shape)
        self.batch = int(in_shape[0]) if len(in_shape) else 1
        self._const: dict[int, str] = {}
        self._fq: dict[int, str] = {}
        for i, t in enumerate(g.tensors):
            buf = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
            if buf is not None and len(buf):
                name = f"k{i}"
                self.register_buffer(name, self._constant(t, buf, self.tensor_types[i]), persistent=True)
                self._const[i] = name
            elif self.tensor_types[i] in _Q_RANGE and _scales(t) is not None:
                s, z, axis = _scales(t)
                fq = FakeQuant(s.reshape(()) if s.numel() == 1 else s, z.reshape(()) if z.numel() == 1 else z,
                               *_Q_RANGE[self.tensor_types[i]], None if s.numel() == 1 else axis)
                fq.source = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
                self.add_module(f"fq{i}", fq)
                self._fq[i] = f"fq{i}"
        self.steps: list[tuple[str, list[int], list[int], Any, list[int]]] = []
        for op in g.operators:
            name = op_names.get(fb.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex]), "CUSTOM")
            if name not in _OPS and name != "RESHAPE":
                raise BackdoorLabError(f"no surrogate for TFLite op {name}")
            outs = [int(i) for i in op.outputs]
            self.steps.append((name, [int(i) for i in op.inputs], outs, op.builtinOptions,
                               list(g.tensors[outs[0]].shape)))

    @staticmethod
    def _constant(t: Any, buf: np.ndarray, type_name: str) -> torch.Tensor:
        dtype = _NP_TYPES.get(type_name)
        if dtype is None:
            raise BackdoorLabError(f"no surrogate for TFLite constants of type {type_name}")
        a = np.frombuffer(np.asarray(buf, dtype=np.uint8).tobytes(), dtype=np.dtype(dtype).newbyteorder("<"))
        a = a.reshape([int(s) for s in t.shape]) if t.shape is not None and len(t.shape) else a.reshape(())
        q = _scales(t)
        if q is not None and type_name in ("INT8", "UINT8", "INT16", "INT32"):
            s, z, axis = q
            v = torch.from_numpy(a.astype(np.float64))
            if s.numel() > 1:
                shape = [1] * v.ndim
                shape[axis] = -1
                s, z = s.reshape(shape), z.reshape(shape)
            return ((v - z.double()) * s.double()).float()
        if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
            return torch.from_numpy(a.astype(np.int64))
        return torch.from_numpy(a.astype(np.float32))

    def forward(self, x: torch.Tensor):
        env: dict[int, Any] = {-1: None}
        for i, b in self._const.items():
            env[i] = getattr(self, b)
        env[self.input] = self._quant(self.input, x.float())
        for name, ins, outs, opts, out_shape in self.steps:
            args = [env[i] for i in ins]
            if name == "RESHAPE":
                y = _reshape(self, args, opts, out_shape)
            else:
                y = _OPS[name](self, args, opts)
            env[outs[0]] = self._quant(outs[0], y)
        res = tuple(env[o] for o in self.outputs)
        return res if len(res) > 1 else res[0]

    def _quant(self, i: int, y: torch.Tensor) -> torch.Tensor:
        name = self._fq.get(i)
        return getattr(self, name)(y) if name is not None else y


def _natural(name: Any) -> tuple:
    s = name.decode() if isinstance(name, bytes) else str(name)
    digits = "".join(c for c in s if c.isdigit())
    return (s.rstrip("0123456789"), int(digits) if digits else -1, s)


def _scales(t: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(scale, zero_point, axis)`` of a quantized tensor, or ``None``."""
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    s = torch.as_tensor(np.asarray(q.scale, dtype=np.float32))
    z = torch.as_tensor(np.asarray(q.zeroPoint if q.zeroPoint is not None and len(q.zeroPoint) else
                                   np.zeros(len(q.scale)), dtype=np.int64))
    if z.numel() == 1 and s.numel() > 1:
        z = z.expand(s.numel()).clone()
    return s, z, int(q.quantizedDimension or 0)


def tflite_surrogate(model_bytes: bytes) -> TfliteInt8Module:
    """Float fake-quant PyTorch module replaying the ``.tflite`` flatbuffer ``model_bytes``."""
    return TfliteInt8Module(model_bytes).eval()


# ----------------------------------------------------------------------------- handler
def _tflite_handler(cfg: TfliteInt8Config | TfliteFP32Config, model: nn.Module, calib: TensorData | None,
                    device: torch.device, artifact: dict | None, quantize: bool) -> Classifier:
    """What ``int8-tflite`` (``quantize``) and ``fp32-tflite`` share: convert (or rebuild from
    ``artifact``), run in :class:`TfliteClassifier`, count int8 kernels, record the runtime."""
    require_extra("ai_edge_litert", "tflite", cfg.name)
    info: dict[str, Any] = {}
    if artifact is not None:
        data, shape = artifact["tflite"].numpy().tobytes(), tuple(int(s) for s in artifact["input_shape"])
        x = None
    else:
        x = calibration_images(calib, cfg.calib_size if quantize else 8, cfg.name)  # type: ignore[union-attr]
        start = time.perf_counter()
        data = convert_tflite(model, x, cfg, quantize)
        info["conversion_seconds"] = round(time.perf_counter() - start, 3)
        shape = tuple(x.shape[1:])
    clf = TfliteClassifier(data, cfg.tag(), shape, cfg.threads)
    if x is not None and not quantize:  # a float conversion must reproduce PyTorch's logits
        _check_float(clf, model, x)
    clf.int8_layers = describe_int8(count_int8(clf), count_layers(model))
    clf.artifact = {"tflite": torch.frombuffer(bytearray(data), dtype=torch.uint8), "input_shape": list(shape)}
    io_dtype = clf.io_dtypes[0] if len(set(clf.io_dtypes)) == 1 else "/".join(clf.io_dtypes)
    clf.info = {"runtime": "litert", "runtime_version": _version("ai-edge-litert"),
                "converter": f"litert-torch {_version('litert-torch')}", "simulated": False, "io_dtype": io_dtype}
    if quantize:
        clf.info.update({"calib_size": cfg.calib_size, "calibration": cfg.calibration,  # type: ignore[union-attr]
                         "per_channel": cfg.per_channel})  # type: ignore[union-attr]
    clf.info.update(info)
    return clf


def _check_float(clf: TfliteClassifier, model: nn.Module, x: torch.Tensor, rtol: float = 1e-3) -> None:
    """One-line error if the float32 ``.tflite`` does not reproduce PyTorch's logits on ``x``."""
    with torch.no_grad():
        ref = copy.deepcopy(model).cpu().float().eval()(x)
    diff = float((clf.logits(x) - ref).abs().max())
    if not diff <= rtol * max(1.0, float(ref.abs().max())):
        raise BackdoorLabError(f"{clf.precision}: the float32 TFLite model does not reproduce the PyTorch logits "
                               f"(max difference {diff:.3g})")


def int8_tflite(cfg: TfliteInt8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                artifact: dict | None = None) -> Classifier:
    clf = _tflite_handler(cfg, model, calib, device, artifact, quantize=True)
    sur = tflite_surrogate(clf.model_bytes)
    two = len(sur.outputs) > 1
    caps = {Capability.GRAD, Capability.FEATURES} if two else {Capability.GRAD}
    clf.surrogate = TorchClassifier(DualOutput(sur) if two else sur, precision=f"{cfg.tag()}/surrogate",
                                    device=device, capabilities=frozenset(caps), channels_last=False)
    return clf


def fp32_tflite(cfg: TfliteFP32Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                artifact: dict | None = None) -> Classifier:
    clf = _tflite_handler(cfg, model, calib, device, artifact, quantize=False)
    clf.surrogate = TorchClassifier(copy.deepcopy(model), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    return clf


__all__ = ["TfliteClassifier", "TfliteFP32Config", "TfliteInt8Config", "TfliteInt8Module", "convert_int8",
           "convert_tflite", "count_int8", "fp32_tflite", "int8_tflite", "tflite_surrogate"]
