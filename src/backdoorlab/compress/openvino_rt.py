"""``int8-openvino``: NNCF post-training quantization, run by OpenVINO's CPU plugin (Intel's edge stack);
``fp32-openvino``: the FP32 export on the same plugin, its speed reference.

Flow (NNCF's documented PTQ: ``nncf.quantize(model, nncf.Dataset(...))``, with its defaults, as in
NNCF's ONNX example ``examples/post_training_quantization/onnx/mobilenet_v2``, which quantizes an
ONNX model with NNCF and runs it with OpenVINO):

1. The model is exported to ONNX (the project's checked exporter, :func:`~.ort.export_onnx`:
   outputs ``logits`` and ``features``, Normalize inside the graph, dynamic batch).
2. ``nncf.quantize`` on that ONNX model with NNCF's defaults: preset ``performance`` (symmetric
   int8 weights per output channel and symmetric activations), ``subset_size=300`` calibration
   images (``calib_size``, the first 300 of the defender's clean split, one per item, as NNCF's
   examples feed them), ``fast_bias_correction=True``. NNCF writes QuantizeLinear /
   DequantizeLinear pairs (QDQ) with its own scales.
3. OpenVINO reads that QDQ graph (its ONNX frontend turns each pair into ``FakeQuantize``) and
   its CPU plugin compiles it with low-precision transformations: convolutions and the fully
   connected layer run with u8 activations and i8 weights. ``INFERENCE_PRECISION_HINT=f32``
   keeps the rest in FP32 (on CPUs with AMX/AVX-512 BF16, OpenVINO would otherwise run float
   parts in bf16).

Kernel truth: ``int8_layers`` counts the compiled model's ``Convolution`` / ``FullyConnected`` /
``MatMul`` nodes whose ``runtimePrecision`` (runtime info of ``compiled.get_runtime_model()``) is
``u8`` or ``i8``, i.e. what the plugin really executes. ``size_bytes`` is the OpenVINO IR
(``.xml`` + ``.bin``, saved without FP16 compression: int8 weights as int8) as it would ship.

Surrogate: the same QDQ graph replayed in PyTorch with fake-quant at NNCF's scales
(:func:`~backdoorlab.compress.surrogate.onnx_surrogate`), so gradient defenses see the numbers
OpenVINO runs. The artifact cached is NNCF's QDQ ONNX (bytes); OpenVINO compiles it again on a
cache hit (well under a second for the default model), without calibrating.

Needs the ``openvino`` extra (``pip install 'backdoorlab[openvino]'``: openvino, nncf).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check, require_extra
from .base import CalibratedConfig, CompressionConfig, DualOutput
from .calib import calibration_images
from .layers import count_layers, describe_int8

PRESETS = ("performance", "mixed")
RANGES = ("mean-minmax", "minmax")
_INT8_TYPES = {"Convolution": "conv", "FullyConnected": "linear", "MatMul": "linear", "GroupConvolution": "conv"}


@dataclass(frozen=True)
class OpenVinoFP32Config(CompressionConfig):
    """``fp32-openvino``: the FP32 ONNX export compiled by OpenVINO's CPU plugin (FP32 inference
    precision): the fair FP32 baseline for OpenVINO's int8 speed. ``threads`` as below."""

    name = "fp32-openvino"
    opset: int = 18
    threads: int | None = None

    def validate(self) -> None:
        _check_common(self)


def _check_common(cfg: Any) -> None:
    check(isinstance(cfg.opset, int) and 17 <= cfg.opset <= 23,
          f"{cfg.name}: opset must be an integer in [17, 23], got {cfg.opset!r}")
    check(cfg.threads is None or (isinstance(cfg.threads, int) and cfg.threads > 0),
          f"{cfg.name}: threads must be a positive integer, got {cfg.threads!r}")


@dataclass(frozen=True)
class OpenVinoInt8Config(CalibratedConfig):
    """``calib_size``: NNCF's default ``subset_size`` (300); ``preset``: NNCF's
    ``QuantizationPreset`` (``performance``: symmetric activations, the default; ``mixed``:
    asymmetric activations); ``fast_bias_correction``: NNCF's default; ``activation_range``: how
    NNCF sets per-tensor activation ranges: ``mean-minmax`` (its default: the mean over calibration
    images of each image's min and max) or ``minmax`` (the extremes over all of them, as ONNX
    Runtime's and PyTorch's MinMax observers do); ``threads``: OpenVINO inference threads
    (``None``: torch's)."""

    name = "int8-openvino"
    calib_size: int = 300
    preset: str = "performance"
    fast_bias_correction: bool = True
    activation_range: str = "mean-minmax"
    opset: int = 18
    threads: int | None = None

    def validate(self) -> None:
        super().validate()
        check(self.preset in PRESETS, f"{self.name}: preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        check(self.activation_range in RANGES, f"{self.name}: activation_range must be one of {', '.join(RANGES)}, "
                                               f"got {self.activation_range!r}")
        check(isinstance(self.fast_bias_correction, bool),
              f"{self.name}: fast_bias_correction must be true or false, got {self.fast_bias_correction!r}")
        _check_common(self)


@contextlib.contextmanager
def _silent() -> Any:
    """NNCF logs at INFO and draws progress bars on stdout/stderr; keep a library call quiet."""
    from .ort import _quiet

    lg = logging.getLogger("nncf")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        lg.setLevel(level)


class OpenVinoClassifier(Classifier):
    """An ONNX (QDQ) model compiled by OpenVINO for its CPU plugin.

    ``logits(x)``: ``(N, C, H, W)`` float in [0, 1] -> ``(N, K)`` float32 (CPU); FEATURES from the
    graph's ``features`` output; no GRAD (see ``surrogate``).
    """

    def __init__(self, onnx_bytes: bytes, precision: str, threads: int | None = None):
        ov = require_extra("openvino", "openvino", precision)
        self.onnx_bytes = bytes(onnx_bytes)
        self.precision = precision
        self.device = torch.device("cpu")
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="backdoorlab-ov-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as fh:
                fh.write(self.onnx_bytes)
            model = core.read_model(path)
            ov.save_model(model, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
            self._ir_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in ("model.xml", "model.bin"))
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        names = [o.get_any_name() for o in self.compiled.outputs]
        self._out = {n: i for i, n in enumerate(names)}
        self.capabilities = frozenset({Capability.FEATURES} if "features" in self._out else set())
        self.info = {"runtime": "openvino", "runtime_version": ov.__version__.split("-")[0], "simulated": False}

    def _run(self, x: torch.Tensor, output: str) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        res = self.request.infer({0: arr})
        return torch.from_numpy(np.array(res[self.compiled.outputs[self._out[output]]], copy=True))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, "logits" if "logits" in self._out else next(iter(self._out)))

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        if layer != "penultimate" or "features" not in self._out:
            raise BackdoorLabError(f"{self.precision} classifier exposes only the penultimate features")
        return self._run(x, "features")

    @property
    def size_bytes(self) -> int:
        return self._ir_bytes

    def runtime_layers(self) -> list[tuple[str, str]]:
        """``(layer type, runtime precision)`` of every node the CPU plugin executes."""
        out = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            ri = op.get_rt_info()
            out.append((str(ri["layerType"].astype(str)), str(ri["runtimePrecision"].astype(str)).lower()))
        return out

    def count_int8(self) -> dict[str, int]:
        """Conv / linear nodes that run with 8-bit integer inputs (kernel truth)."""
        out = {"conv": 0, "linear": 0}
        for kind, prec in self.runtime_layers():
            if kind in _INT8_TYPES and prec in ("u8", "i8"):
                out[_INT8_TYPES[kind]] += 1
        return out


def quantize_nncf(fp32_bytes: bytes, x: torch.Tensor, cfg: OpenVinoInt8Config) -> bytes:
    """NNCF post-training quantization of an FP32 ONNX model on the images ``x``; QDQ ONNX bytes."""
    import onnx

    nncf = require_extra("nncf", "openvino", cfg.name)
    items = [{"images": np.ascontiguousarray(x[i:i + 1].numpy())} for i in range(len(x))]
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[cfg.preset]
    extra = {}
    if cfg.activation_range == "minmax":
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        extra["advanced_parameters"] = AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    with _silent():
        q = nncf.quantize(onnx.load_from_string(fp32_bytes), nncf.Dataset(items), preset=preset,
                          subset_size=len(items), fast_bias_correction=cfg.fast_bias_correction, **extra)
    return q.SerializeToString()


def fp32_openvino(cfg: OpenVinoFP32Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                  artifact: dict | None = None) -> Classifier:
    import copy

    from .ort import _export_checked

    require_extra("openvino", "openvino", cfg.name)
    if artifact is not None:
        data, shape = artifact["onnx"].numpy().tobytes(), tuple(artifact["input_shape"])
    else:
        x = calibration_images(calib, 64, cfg.name)
        data, shape = _export_checked(model, x, cfg.opset), tuple(x.shape[1:])
    clf = OpenVinoClassifier(data, cfg.tag(), cfg.threads)
    clf.input_shape = shape
    clf.int8_layers = describe_int8(clf.count_int8(), count_layers(model))
    clf.artifact = {"onnx": torch.frombuffer(bytearray(data), dtype=torch.uint8), "input_shape": list(shape)}
    clf.surrogate = TorchClassifier(copy.deepcopy(model), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    return clf


def int8_openvino(cfg: OpenVinoInt8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                  artifact: dict | None = None) -> Classifier:
    import onnx

    from .ort import _export_checked
    from .surrogate import onnx_surrogate

    require_extra("openvino", "openvino", cfg.name)
    if artifact is not None:
        data, shape = artifact["onnx"].numpy().tobytes(), tuple(artifact["input_shape"])
    else:
        require_extra("nncf", "openvino", cfg.name)
        x = calibration_images(calib, cfg.calib_size, cfg.name)
        data = quantize_nncf(_export_checked(model, x, cfg.opset), x, cfg)
        shape = tuple(x.shape[1:])
    clf = OpenVinoClassifier(data, cfg.tag(), cfg.threads)
    clf.input_shape = shape
    clf.int8_layers = describe_int8(clf.count_int8(), count_layers(model))
    clf.artifact = {"onnx": torch.frombuffer(bytearray(data), dtype=torch.uint8), "input_shape": list(shape)}
    nncf_version = None
    with contextlib.suppress(ImportError):
        import nncf

        nncf_version = nncf.__version__
    clf.info = {**clf.info, "quantizer": f"nncf {nncf_version}" if nncf_version else "nncf", "preset": cfg.preset,
                "activation_range": cfg.activation_range, "calib_size": cfg.calib_size,
                "fast_bias_correction": cfg.fast_bias_correction}
    sur = onnx_surrogate(onnx.load_from_string(data))
    clf.surrogate = TorchClassifier(DualOutput(sur), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}),
                                    channels_last=False)
    return clf
