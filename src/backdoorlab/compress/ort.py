"""``fp32-ort`` and ``int8-ort``: the model exported to ONNX and run by ONNX Runtime on CPU.

* Export: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter; opset
  18 by default, >= 17 required), with a dynamic batch axis and two outputs, ``logits`` ``(N, K)``
  and ``features`` ``(N, D)``, so FEATURES survives deployment. Normalize is part of the graph.
  The exported graph is checked against PyTorch on calibration images before use; a model the
  exporter cannot capture (data-dependent control flow, unsupported ops) is one
  :class:`BackdoorLabError` line.
* ``fp32-ort``: that FP32 graph in an ``InferenceSession`` (CPUExecutionProvider): the fair FP32
  baseline for ORT speed.
* ``int8-ort``: ONNX Runtime static quantization as its docs prescribe ("Quantize ONNX models",
  onnxruntime.ai/docs/performance/model-optimizations/quantization.html): ``quant_pre_process``
  (shape inference + graph optimisation, which folds BatchNorm into Conv), then
  ``quantize_static`` in **QDQ** format with **per-channel** int8 weights, uint8 activations and,
  by default, ``reduce_range=True`` (the docs' advice for x86 CPUs without VNNI), calibrated on
  ``calib_size`` clean images with ``CalibrationMethod`` MinMax, Entropy or Percentile. ORT fuses
  the QDQ pairs into QLinearConv / QGemm kernels at session creation.

The artifact is the serialised ONNX model (bytes), cached as such; the surrogate of ``int8-ort``
is the same QDQ graph replayed in PyTorch with fake-quant
(:func:`backdoorlab.compress.surrogate.onnx_surrogate`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check
from .base import CalibratedConfig, CompressionConfig, DualOutput, LogitsAndFeatures
from .calib import batches, calibration_images
from .layers import count_layers, describe_int8

CALIBRATIONS = ("minmax", "entropy", "percentile")
EXPORT_ATOL = 1e-4


@dataclass(frozen=True)
class OrtFP32Config(CompressionConfig):
    """``opset``: ONNX opset (>= 17); ``threads``: ORT intra-op threads (``None``: torch's)."""

    name = "fp32-ort"
    opset: int = 18
    threads: int | None = None

    def validate(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class OrtInt8Config(CalibratedConfig):
    """``calibration``: ``minmax`` | ``entropy`` | ``percentile`` (ORT ``CalibrationMethod``);
    ``percentile``: kept share for Percentile (ORT default 99.999); ``per_channel``: per-channel
    weights (the issue asks for it; ``False`` only for comparison); ``reduce_range``: 7-bit
    weights (ORT's advice for non-VNNI x86)."""

    name = "int8-ort"
    calibration: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    reduce_range: bool = True
    opset: int = 18
    threads: int | None = None

    def validate(self) -> None:
        super().validate()
        _check_common(self)
        check(self.calibration in CALIBRATIONS, f"{self.name}: calibration must be one of {', '.join(CALIBRATIONS)}, "
                                                f"got {self.calibration!r}")
        check(isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100,
              f"{self.name}: percentile must be in (0, 100], got {self.percentile!r}")


@dataclass(frozen=True)
class OrtQOpConfig(OrtInt8Config):
    """``int8-ort-qop``: the same quantization as ``int8-ort`` (same parameters and defaults),
    written in ONNX Runtime's **QOperator** form (``QLinearConv``, ``QGemm`` nodes in the file)
    instead of QDQ."""

    name = "int8-ort-qop"


def _check_common(cfg: Any) -> None:
    check(isinstance(cfg.opset, int) and 17 <= cfg.opset <= 23, f"{cfg.name}: opset must be an integer in [17, 23], "
                                                               f"got {cfg.opset!r}")
    check(cfg.threads is None or (isinstance(cfg.threads, int) and cfg.threads > 0),
          f"{cfg.name}: threads must be a positive integer, got {cfg.threads!r}")


# ----------------------------------------------------------------------------- the classifier
class OrtClassifier(Classifier):
    """An ONNX model in an ONNX Runtime CPU ``InferenceSession``.

    ``logits(x)``: ``(N, C, H, W)`` float in [0, 1] -> ``(N, K)`` float32 (CPU). FEATURES when the
    graph has a ``features`` output. No GRAD: see ``surrogate``.
    """

    def __init__(self, model_bytes: bytes, precision: str, threads: int | None = None):
        import onnxruntime as ort

        self.model_bytes = bytes(model_bytes)
        self.precision = precision
        self.device = torch.device("cpu")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # ORT's worker threads spin after each run by default. Next to another session (fp32-ort
        # and int8-ort of one study) or PyTorch's own threads, the spinning pool takes the cores
        # the next call needs: in bench_compress's interleaved rounds it slowed the small CNN's
        # int8-ort batch of 256 from 71 to 101 ms. Blocking waits, like OMP_WAIT_POLICY=PASSIVE.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.model_bytes, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.capabilities = frozenset({Capability.FEATURES} if "features" in self.output_names else set())
        self.info = {}

    def _run(self, x: torch.Tensor, name: str) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run([name], {self.input_name: arr})[0]
        return torch.from_numpy(out)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.output_names[0])

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        if layer != "penultimate" or "features" not in self.output_names:
            raise BackdoorLabError(f"{self.precision} classifier exposes only the penultimate features")
        return self._run(x, "features")

    @property
    def size_bytes(self) -> int:
        return len(self.model_bytes)

    def op_types(self) -> list[str]:
        """Op types of the stored graph (before ORT's own fusions)."""
        import onnx

        return [n.op_type for n in onnx.load_from_string(self.model_bytes).graph.node]

    def session_model(self) -> bytes:
        """The graph as ONNX Runtime runs it: the model this classifier's session options optimise
        (QDQ pairs fused into ``QLinearConv`` / ``QGemm`` at session creation, NCHWc layouts),
        written out with ``SessionOptions.optimized_model_filepath`` (kernel truth, not assumed)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3  # "hardware-specific optimisations" warning: expected here
        so.intra_op_num_threads = 1
        with tempfile.TemporaryDirectory(prefix="backdoorlab-ort-") as tmp:
            so.optimized_model_filepath = os.path.join(tmp, "session.onnx")
            ort.InferenceSession(self.model_bytes, so, providers=["CPUExecutionProvider"])
            with open(so.optimized_model_filepath, "rb") as fh:
                return fh.read()

    def session_op_types(self) -> list[str]:
        """Op types of :meth:`session_model` (what ONNX Runtime's kernels really execute)."""
        import onnx

        return [n.op_type for n in onnx.load_from_string(self.session_model()).graph.node]


def runtime_info() -> dict[str, Any]:
    """``runtime``, ``runtime_version`` and ``simulated`` of an ONNX Runtime artifact."""
    import onnxruntime as ort

    return {"runtime": "onnxruntime", "runtime_version": ort.__version__, "simulated": False}


# ----------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress to stdout and logs warnings; keep a library call silent."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model: nn.Module, example: torch.Tensor, opset: int = 18) -> bytes:
    """ONNX bytes of ``model`` (an ``ImageClassifier``) with input ``images`` ``(N, C, H, W)``
    (dynamic N) and outputs ``logits``, ``features``; one-line error if it cannot be exported."""
    # contiguous (NCHW) weights and input: a channels_last model, as fit() leaves it, exports
    # with as_strided -> Shape/Range/Gather index arithmetic, which no surrogate replays
    wrapped = LogitsAndFeatures(copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format))
    example = example[:2].cpu().float().contiguous()
    if example.shape[0] < 2:  # a batch of 1 would be specialised as a constant
        example = example.repeat(2, 1, 1, 1)
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(wrapped, (example,), None, dynamo=True, opset_version=opset,
                                     input_names=["images"], output_names=["logits", "features"],
                                     dynamic_shapes=({0: torch.export.Dim("batch")},), optimize=True,
                                     verbose=False)
            data = prog.model_proto.SerializeToString()
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise BackdoorLabError(f"the model cannot be exported to ONNX: {msg}") from None
    return data


def check_export(model_bytes: bytes, model: nn.Module, x: torch.Tensor, atol: float = 1e-3) -> float:
    """Max |ORT - PyTorch| logit difference on ``x``; one-line error above ``atol``."""
    clf = OrtClassifier(model_bytes, "fp32-ort")
    with torch.no_grad():
        ref = copy.deepcopy(model).cpu().float().eval()(x)
    diff = float((clf.logits(x) - ref).abs().max())
    if not diff <= atol * max(1.0, float(ref.abs().max())):
        raise BackdoorLabError(f"the ONNX export does not reproduce the PyTorch logits (max difference {diff:.3g})")
    return diff


# ----------------------------------------------------------------------------- handlers
def _count_int8(model_bytes: bytes) -> dict[str, int]:
    """Conv / Gemm-MatMul nodes whose weight comes from a DequantizeLinear of an int8 constant
    (QDQ), or QLinearConv / QGemm nodes (QOperator, and QDQ once ORT has fused it)."""
    import onnx

    g = onnx.load_from_string(model_bytes).graph
    inits = {t.name for t in g.initializer}
    dq_const = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    out = {"conv": 0, "linear": 0}
    for n in g.node:
        if n.op_type in ("QLinearConv", "ConvInteger") or (n.op_type == "Conv" and n.input[1] in dq_const):
            out["conv"] += 1
        elif n.op_type in ("QGemm", "QLinearMatMul", "MatMulInteger") or (
                n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dq_const):
            out["linear"] += 1
    return out


def _export_checked(model: nn.Module, x: torch.Tensor, opset: int) -> bytes:
    """Export, then check the ONNX logits against PyTorch's on (up to 64 of) the images ``x``."""
    data = export_onnx(model, x, opset)
    check_export(data, model, x[:64])
    return data


def fp32_ort(cfg: OrtFP32Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
             artifact: dict | None = None) -> Classifier:
    if artifact is not None:
        data, shape = artifact["onnx"].numpy().tobytes(), tuple(artifact["input_shape"])
    else:
        x = calibration_images(calib, 64, "fp32-ort")
        data, shape = _export_checked(model, x, cfg.opset), tuple(x.shape[1:])
    clf = OrtClassifier(data, cfg.tag(), cfg.threads)
    clf.input_shape = shape
    clf.info = runtime_info()
    clf.int8_layers = describe_int8({}, count_layers(model))
    clf.artifact = {"onnx": torch.frombuffer(bytearray(data), dtype=torch.uint8), "input_shape": list(shape)}
    clf.surrogate = TorchClassifier(copy.deepcopy(model), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    return clf


def quantize_ort(fp32_bytes: bytes, x: torch.Tensor, cfg: OrtInt8Config) -> bytes:
    """Run ORT's pre-processing and ``quantize_static`` (QDQ) on an FP32 model; returns bytes."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"images": np.ascontiguousarray(b.numpy())} for b in batches(x, 64)])

        def get_next(self):
            return next(self._it, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    extra = {"CalibPercentile": float(cfg.percentile)} if cfg.calibration == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="backdoorlab-ort-") as tmp, _quiet():
        src, pre, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as fh:
            fh.write(fp32_bytes)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        fmt = QuantFormat.QOperator if isinstance(cfg, OrtQOpConfig) else QuantFormat.QDQ
        quantize_static(pre, out, Reader(), quant_format=fmt, per_channel=cfg.per_channel,
                        reduce_range=cfg.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra)
        with open(out, "rb") as fh:
            return fh.read()


def int8_ort(cfg: OrtInt8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
             artifact: dict | None = None) -> Classifier:
    import onnx

    from .surrogate import onnx_surrogate, qoperator_to_qdq

    if artifact is not None:
        data, shape = artifact["onnx"].numpy().tobytes(), tuple(artifact["input_shape"])
    else:
        x = calibration_images(calib, cfg.calib_size, cfg.name)
        data = quantize_ort(_export_checked(model, x, cfg.opset), x, cfg)
        shape = tuple(x.shape[1:])
    clf = OrtClassifier(data, cfg.tag(), cfg.threads)
    clf.input_shape = shape
    # kernel truth: int8 layers counted in the graph the session runs, after ORT's QDQ fusion
    clf.int8_layers = describe_int8(_count_int8(clf.session_model()), count_layers(model))
    clf.artifact = {"onnx": torch.frombuffer(bytearray(data), dtype=torch.uint8), "input_shape": list(shape)}
    qop = isinstance(cfg, OrtQOpConfig)
    clf.info = {**runtime_info(), "format": "QOperator" if qop else "QDQ", "calibration": cfg.calibration,
                "calib_size": cfg.calib_size, "per_channel": cfg.per_channel, "reduce_range": cfg.reduce_range}
    proto = onnx.load_from_string(data)
    sur = onnx_surrogate(qoperator_to_qdq(proto) if qop else proto)
    clf.surrogate = TorchClassifier(DualOutput(sur), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}),
                                    channels_last=False)
    return clf
