"""``int8-pt2e``: PT2E post-training static quantization, lowered by Inductor to oneDNN int8 kernels.

Follows the tutorial "PyTorch 2 Export Quantization with X86 Backend through Inductor"
(pytorch.org/tutorials/prototype/pt2e_quant_x86_inductor.html) with the PT2E API that moved into
torchao (``torchao.quantization.pt2e``, docs.pytorch.org/ao/stable/tutorials_source/pt2e_quant_ptq.html):

1. ``torch.export.export`` of the model wrapped in :class:`~backdoorlab.compress.base.LogitsAndFeatures`
   (one graph, two outputs: logits ``(N, K)`` and penultimate features ``(N, D)``), batch dynamic;
   Normalize is part of the graph.
2. ``prepare_pt2e`` with ``X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())``:
   weights per-channel symmetric int8 (``PerChannelMinMaxObserver``), activations per-tensor affine
   **uint8** over the full [0, 255] (``HistogramObserver``, ``reduce_range=False``: the tutorial's
   default, for CPUs with VNNI); calibration on ``calib_size`` clean images; ``convert_pt2e`` gives
   a graph of ``quantized_decomposed`` quantize/dequantize pairs around float ``conv2d``/``linear``
   with int8 weight constants. (``reduce_range=True`` is not offered: Inductor's fused kernels
   then still saturate at 255, not at the 127 the graph says, which no surrogate replaying the
   graph would reproduce.)
3. The converted model is exported again (``torch.export.save`` of it is the artifact: int8
   weights, scales, zero-points, graph) and run as the tutorial deploys it:
   ``torch.compile`` with Inductor's ``freezing`` on, which pattern-matches each dq -> conv/linear
   -> q into ``onednn::qconv_pointwise`` / ``onednn::qlinear_pointwise`` (uint8 x int8, BatchNorm
   already folded by ``convert_pt2e``, ReLU fused as the post-op). The profiler proves it
   (``tests/compress/test_pt2e_executorch.py``): no ``aten::convolution`` or ``aten::addmm`` runs.

Compilation is lazy (first :meth:`Pt2eClassifier.logits`), once per classifier, with the batch
marked dynamic. Dynamo still specialises the batch into at most three graphs: batch 1 (its 0/1
specialisation), 2-15 and >= 16 (the float reference conv's backend choice in ATen changes at
batch 16 and becomes a guard). Each is compiled on first use; ``info["compile_s"]`` sums the
seconds of the calls that compiled and ``info["compiles"]`` counts them. On the 2-core AVX-512
test machine (1 thread) the small CNN's first graph took 22 s with Inductor's on-disk cache
(``/tmp/torchinductor_$USER``) cold and ~5 s with it warm; each further batch range 2-5 s.
Inductor generates C++ for the glue between the oneDNN calls, so it needs a C++ compiler.

**The same artifact classifies differently on CPUs without VNNI.** oneDNN's u8 x s8 kernels use
VNNI's ``vpdpbusd`` where the CPU has it (AVX512-VNNI, AVX-VNNI, AMX) and otherwise AVX2's
``vpmaddubsw``, whose pairwise int16 sums saturate over full-range uint8 activations (the reason
``reduce_range=True`` exists for such CPUs). On a VNNI CPU the artifact agrees with its surrogate
on every GTSRB test image; with oneDNN held to AVX2 (an AVX2-only CPU, or
``ONEDNN_MAX_CPU_ISA=AVX2``) on 97.9% of them, with clean accuracy 0.6 points lower and BadNets
ASR 0.81 -> 0.72 (BENCHMARKS.md, "int8-pt2e depends on the CPU it runs on"). ``info["onednn_vnni"]``
records which kind of kernel this process runs (:func:`onednn_vnni`).

:func:`pt2e_surrogate` turns a converted PT2E graph (this module's, and ``int8-executorch``'s,
whose XNNPACK quantizer emits the same ``quantized_decomposed`` ops with int8 activations) into a
differentiable float module: every quantize/dequantize pair becomes
:func:`~backdoorlab.compress.fakequant.fake_quant` at the artifact's own scale and zero-point,
every constant int8 weight its dequantised float value.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check, require_extra
from .base import CalibratedConfig, DualOutput, LogitsAndFeatures
from .calib import batches, calibration_images
from .fakequant import FakeQuant
from .layers import count_layers, describe_int8

_CONV = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten._convolution")
_LINEAR = ("aten.linear", "aten.addmm", "aten.mm", "aten.matmul")
_TRANSPOSE = ("aten.t.", "aten.permute", "aten.transpose", "aten.permute_copy", "aten.t_copy")


@dataclass(frozen=True)
class Pt2eInt8Config(CalibratedConfig):
    """Only ``calib_size``: the quantizer is ``get_default_x86_inductor_quantization_config()``."""

    name = "int8-pt2e"


# ----------------------------------------------------------------------------- shared PT2E steps
@contextlib.contextmanager
def pt2e_quiet() -> Iterator[None]:
    """Silence export/quantization/Inductor warnings that say nothing to a user here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def example_batch(x: torch.Tensor) -> torch.Tensor:
    """Two images (a batch of 1 would be specialised as a constant by ``torch.export``); a copy,
    so that the saved program's sample input does not drag the whole calibration tensor along."""
    ex = x[:2].detach().cpu().float().clone().contiguous()
    return ex.repeat(2, 1, 1, 1) if ex.shape[0] < 2 else ex


def export_float(model: nn.Module, example: torch.Tensor, max_batch: int | None = None,
                 who: str = "int8-pt2e") -> torch.export.ExportedProgram:
    """``torch.export`` of ``LogitsAndFeatures(model)`` (FP32, CPU, NCHW) with a dynamic batch
    (``1 .. max_batch``); one-line error if the model cannot be captured."""
    wrapped = LogitsAndFeatures(copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format))
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    try:
        with pt2e_quiet(), torch.no_grad():
            return torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise BackdoorLabError(f"{who}: the model cannot be captured by torch.export: {_one_line(exc)}") from None


def quantize_graph(gm: fx.GraphModule, quantizer: Any, x: torch.Tensor) -> fx.GraphModule:
    """``prepare_pt2e`` -> calibration on ``x`` (batches of 64) -> ``convert_pt2e``; the converted
    graph keeps only the constants it reads (the float weights it replaced are dropped)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with pt2e_quiet():
        prepared = prepare_pt2e(gm, quantizer)
        with torch.no_grad():
            for xb in batches(x, 64):
                prepared(xb)
        converted = convert_pt2e(prepared)
    return strip_unused(converted)


def strip_unused(gm: fx.GraphModule) -> fx.GraphModule:
    """Delete parameters and buffers of ``gm`` that no ``get_attr`` node reads (``convert_pt2e``
    leaves the float weights it replaced by int8 constants registered)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]:
        if name in used:
            continue
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        elif leaf in mod._buffers:
            del mod._buffers[leaf]
    return gm


def export_converted(converted: fx.GraphModule, example: torch.Tensor,
                     max_batch: int | None = None) -> torch.export.ExportedProgram:
    """The converted model as an ``ExportedProgram`` (dynamic batch ``1 .. max_batch``)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    with pt2e_quiet(), torch.no_grad():
        return torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))


def save_program(ep: torch.export.ExportedProgram) -> bytes:
    """``torch.export.save`` bytes (graph, int8 weights, scales and zero-points)."""
    buf = io.BytesIO()
    with pt2e_quiet():
        torch.export.save(ep, buf)
    return buf.getvalue()


def load_program(data: bytes) -> torch.export.ExportedProgram:
    """Inverse of :func:`save_program` (read from backdoorlab's own artifact cache)."""
    with pt2e_quiet():
        return torch.export.load(io.BytesIO(data))


def to_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _is_qd(node: Any, *names: str) -> bool:
    """``node`` calls ``quantized_decomposed.<name>`` (ATen or ExecuTorch edge dialect)."""
    t = str(getattr(node, "target", ""))
    return isinstance(node, fx.Node) and node.op == "call_function" and "quantized_decomposed." in t and any(
        f"quantized_decomposed.{n}." in t or t.endswith(f"quantized_decomposed.{n}") for n in names)


def _weight_is_int8_const(node: Any) -> bool:
    """``node`` is a dequantize of an int8 constant (the weight of a quantized conv/linear);
    constants are ``get_attr`` nodes, or lifted ``placeholder`` nodes in an exported graph."""
    if not _is_qd(node, "dequantize_per_channel", "dequantize_per_tensor"):
        return False
    src = node.args[0]
    return isinstance(src, fx.Node) and src.op in ("get_attr", "placeholder") and torch.int8 in node.args[1:]


def count_quantized(graph: fx.Graph) -> dict[str, int]:
    """Conv / linear nodes of a PT2E (or ExecuTorch edge) graph whose activation comes from a
    ``dequantize_per_tensor`` and whose weight from a dequantize of an int8 constant: the
    patterns a backend runs as one int8 kernel."""
    out = {"conv": 0, "linear": 0}
    for n in graph.nodes:
        if n.op != "call_function" or len(n.args) < 2:
            continue
        t = str(n.target)
        kind = "conv" if any(k in t for k in _CONV) else "linear" if any(k in t for k in _LINEAR) else None
        if kind is None:
            continue
        x, w = (n.args[1], n.args[2]) if "addmm" in t else (n.args[0], n.args[1])
        if kind == "linear" and isinstance(w, fx.Node) and any(k in str(w.target) for k in _TRANSPOSE):
            w = w.args[0]  # mm/addmm read the weight through a transpose
        if _is_qd(x, "dequantize_per_tensor") and _weight_is_int8_const(w):
            out[kind] += 1
    return out


# ----------------------------------------------------------------------------- the surrogate
_FOLDABLE = ("quantize_per_tensor", "quantize_per_channel", "dequantize_per_tensor", "dequantize_per_channel")


def _attr(gm: nn.Module, target: str) -> Any:
    v: Any = gm
    for part in target.split("."):
        v = getattr(v, part)
    return v


def pt2e_surrogate(converted: fx.GraphModule) -> fx.GraphModule:
    """Differentiable float replay of a converted PT2E graph ``converted``.

    Each ``quantize_per_tensor`` (or ``quantize_per_channel``) of an activation becomes a
    :class:`~backdoorlab.compress.fakequant.FakeQuant` with that node's own scale, zero-point and
    integer range (uint8 for the x86 quantizer, int8 for XNNPACK), and its ``dequantize`` the
    identity; quantize/dequantize chains over constants (int8 weights) are folded into their
    dequantised float values. Every other op is replayed as it is (float conv, linear, pools, ...).
    Returns a plain ``fx.GraphModule`` mapping ``(N, C, H, W)`` float in [0, 1] to what the graph
    returns (here ``(logits, features)``); straight-through gradients.
    """
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    consts: dict[fx.Node, Any] = {}
    fq_of: set[fx.Node] = set()  # nodes whose value is an activation fake-quant output

    def arg(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n in consts:  # a constant read by a float op: a buffer of the surrogate
            name = f"c{len(root._buffers)}"
            v = consts[n]
            root.register_buffer(name, v.detach().clone() if isinstance(v, torch.Tensor) else torch.as_tensor(v))
            env[n] = graph.get_attr(name)
            return env[n]
        raise BackdoorLabError(f"no surrogate for PT2E graph node {n.name} ({n.op} {n.target})")

    def is_const(a: Any) -> bool:
        return not isinstance(a, fx.Node) or a in consts

    def const(a: Any) -> Any:
        return consts[a] if isinstance(a, fx.Node) else a

    n_fq = 0
    for node in converted.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.target)
        elif node.op == "get_attr":
            consts[node] = _attr(converted, node.target)
        elif node.op == "call_module":
            if str(node.target).startswith("_guards"):  # torch.export's input-shape guard: no value
                continue
            raise BackdoorLabError(f"no surrogate for module call {node.target} in a PT2E graph")
        elif node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], arg))
        elif _is_qd(node, *_FOLDABLE) and all(is_const(a) for a in node.args):
            with torch.no_grad():  # int8 weight: fold (de)quantize of constants into a float constant
                consts[node] = node.target(*[const(a) for a in node.args], **node.kwargs)
        elif _is_qd(node, "quantize_per_tensor", "quantize_per_channel"):
            if _is_qd(node, "quantize_per_channel"):
                x, s, z, axis, lo, hi, _ = node.args
            else:
                (x, s, z, lo, hi, _), axis = node.args, None
            fq = FakeQuant(torch.as_tensor(const(s)).float(), torch.as_tensor(const(z)), int(lo), int(hi), axis)
            fq.source = f"quantize({x.name})"  # the tensor it quantizes, named as in the artifact's graph
            name = f"fq{n_fq}"
            n_fq += 1
            root.add_module(name, fq)
            env[node] = graph.call_module(name, (arg(x),))
            fq_of.add(node)
        elif _is_qd(node, "dequantize_per_tensor", "dequantize_per_channel"):
            if node.args[0] not in fq_of:
                raise BackdoorLabError(f"no surrogate for {node.name}: a dequantize of a non-constant, "
                                       f"non-quantize input")
            env[node] = env[node.args[0]]
        elif "quantized_decomposed." in str(node.target) or "onednn." in str(node.target):
            raise BackdoorLabError(f"no surrogate for PT2E op {node.target}")
        elif node.op == "call_function":
            if node.target is operator.getitem and node.args[0] in consts:
                consts[node] = consts[node.args[0]][node.args[1]]
                continue
            env[node] = graph.call_function(node.target, fx.node.map_arg(node.args, arg),
                                            fx.node.map_arg(node.kwargs, arg))
        else:  # call_method
            env[node] = graph.create_node(node.op, node.target, fx.node.map_arg(node.args, arg),
                                          fx.node.map_arg(node.kwargs, arg))
    graph.lint()
    return fx.GraphModule(root, graph).eval()


# ----------------------------------------------------------------------------- the classifier
class TwoOutputClassifier(Classifier):
    """A deployed program returning ``(logits, penultimate features)``: subclasses implement
    ``_run(x) -> (logits (N, K), features (N, D))``; shared by the PT2E and ExecuTorch artifacts."""

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0].float()

    def features(self, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
        if layer != "penultimate":
            raise BackdoorLabError(f"{self.precision} classifier exposes only the penultimate features")
        return self._run(x)[1].float()


_NO_VNNI_CAPS = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def onednn_vnni() -> bool:
    """Whether oneDNN's int8 kernels in this process use VNNI dot products: the CPU has them
    (AVX512-VNNI, AVX-VNNI or AMX) and ``ONEDNN_MAX_CPU_ISA`` does not cap oneDNN below them."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if cap in _NO_VNNI_CAPS:
        return False
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


class Pt2eClassifier(TwoOutputClassifier):
    """A converted PT2E program compiled by Inductor (``freezing=True``): oneDNN int8 kernels.

    ``logits(x)``: ``(N, C, H, W)`` float in [0, 1] -> ``(N, K)`` float32 (CPU); ``features(x)``:
    the graph's second output ``(N, D)``. No GRAD: see ``surrogate``. Compiles at the first call.
    """

    def __init__(self, program: bytes, ep: torch.export.ExportedProgram, precision: str):
        self.program = bytes(program)
        self.precision = precision
        self.device = torch.device("cpu")
        self.capabilities = frozenset({Capability.FEATURES})
        self._module = ep.module()
        self._compiled: Any = None
        self.info = {"compile_s": 0.0, "compiles": 0}

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torch._dynamo.utils import counters
        from torch._inductor import config as inductor_config

        x = x.detach().to("cpu", torch.float32).contiguous()
        if self._compiled is None:
            self._compiled = torch.compile(self._module)
        if x.shape[0] > 1:
            torch._dynamo.mark_dynamic(x, 0)
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        with torch.no_grad(), pt2e_quiet(), inductor_config.patch(freezing=True):
            out = self._compiled(x)
        if counters["stats"]["unique_graphs"] != before:  # this call compiled a graph
            self.info["compile_s"] = round(self.info["compile_s"] + time.perf_counter() - t0, 3)
            self.info["compiles"] += 1
        return out[0], out[1]

    @property
    def size_bytes(self) -> int:
        return len(self.program)


def surrogate_classifier(graph_module: fx.GraphModule, precision: str, device: torch.device) -> TorchClassifier:
    """The differentiable surrogate of an artifact whose converted PT2E graph is ``graph_module``."""
    return TorchClassifier(DualOutput(pt2e_surrogate(graph_module)), precision=f"{precision}/surrogate",
                           device=device, capabilities=frozenset({Capability.GRAD, Capability.FEATURES}),
                           channels_last=False)


# ----------------------------------------------------------------------------- handler
def int8_pt2e(cfg: Pt2eInt8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
              artifact: dict | None = None) -> Classifier:
    require_extra("torchao", "pt2e", "int8-pt2e")
    # Inductor builds the fused int8 kernels with a C++ compiler at the first call: say so up front
    check(any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c),
          "int8-pt2e needs a C++ compiler (g++ or clang++, or $CXX) for Inductor to build its int8 kernels")
    info: dict[str, Any] = {}
    if artifact is not None:
        data, shape = artifact["program"].numpy().tobytes(), tuple(artifact["input_shape"])
        ep = load_program(data)
    else:
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        x = calibration_images(calib, cfg.calib_size, "int8-pt2e")
        shape = tuple(x.shape[1:])
        example = example_batch(x)
        t0 = time.perf_counter()
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config())
        converted = quantize_graph(export_float(model, example).module(), quantizer, x)
        ep = export_converted(converted, example)
        data = save_program(ep)
        info["quantize_s"] = round(time.perf_counter() - t0, 3)
    import torchao

    clf = Pt2eClassifier(data, ep, cfg.tag())
    clf.input_shape = shape
    clf.int8_layers = describe_int8(count_quantized(ep.graph), count_layers(model))
    clf.artifact = {"program": to_bytes_tensor(data), "input_shape": list(shape)}
    clf.info.update({"runtime": "torch-inductor", "runtime_version": torch.__version__,
                     "torchao_version": torchao.__version__, "simulated": False, "calib_size": cfg.calib_size,
                     "activations": "uint8", "weights": "int8 per-channel", "onednn_vnni": onednn_vnni(), **info})
    clf.surrogate = surrogate_classifier(ep.module(), cfg.tag(), device)
    return clf
