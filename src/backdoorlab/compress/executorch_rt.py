"""``int8-executorch``: PT2E int8 quantization for ExecuTorch's XNNPACK backend, run by the
ExecuTorch runtime (the ``.pte`` program as it would ship to a phone); ``fp32-executorch``: the
same export and XNNPACK lowering without the quantizer (XNNPACK's FP32 kernels), its speed
reference.

Follows ExecuTorch's "Building and Running ExecuTorch with XNNPACK Backend" and "Quantization"
docs (docs.pytorch.org/executorch/stable/backends-xnnpack.html, tutorial-xnnpack-delegate-lowering):

1. ``torch.export.export`` of ``LogitsAndFeatures(model)`` (two outputs, logits and penultimate
   features) with a dynamic batch ``1 .. max_batch``. ExecuTorch has no
   ``adaptive_max_pool2d`` kernel and XNNPACK does not take it, so a global (or evenly dividing)
   ``adaptive_max_pool2d`` is rewritten as the ``max_pool2d`` it equals, before quantization, so
   the quantizer and the delegate see a pool they support (exact: same maximum).
2. ``prepare_pt2e`` with ``XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
   is_per_channel=True))``: weights per-channel symmetric int8 in [-127, 127], activations
   per-tensor affine int8 (``HistogramObserver``), calibrated on ``calib_size`` clean images;
   ``convert_pt2e``.
3. The converted model is exported again, ``to_edge_transform_and_lower(...,
   partitioner=[XnnpackPartitioner()])`` hands each quantized dq -> conv/linear -> q pattern to the
   XNNPACK delegate (int8 QS8 kernels), ``.to_executorch()`` plans memory and serialises: the
   ``.buffer`` is the ``.pte`` (``size_bytes``).
4. It runs in ExecuTorch's Python runtime (``executorch.runtime.Runtime.get().load_program``), with
   the XNNPACK thread pool set to ``threads`` (default: ``torch.get_num_threads()``).

Kernel truth: the edge program's delegated subgraphs (``LoweredBackendModule.original_module``, as
``executorch.devtools.backend_debug.get_delegation_info`` reads them) are inspected; a conv/linear
counts as int8 when it sits inside an XNNPACK delegate between a dequantized int8 activation and
a dequantized int8 constant weight. The counts are stored with the artifact.

Dynamic batch: ExecuTorch plans memory for the upper bound of every dynamic dimension. Lowering
re-traces the float reference convs, whose fake kernel picks an ATen conv backend by batch size
and so adds the guard ``batch < 16`` at the example batch; that would cap the plan at 15 images
although the convs run inside XNNPACK, which reshapes at run time. The declared range
``[1, max_batch]`` is therefore restored before memory planning, and the program's planned input
capacity read back from its metadata; larger batches run as consecutive chunks of at most that
many images (no padding). Tests check batches 1, 7, 16 and 256 against the converted graph.

The artifact is the ``.pte`` bytes plus the converted PT2E program (``torch.export.save``), from
which the surrogate (:func:`backdoorlab.compress.pt2e.pt2e_surrogate`) is built.

``fp32-executorch`` skips step 2: the float program (after the same pool rewrite) is exported with
the same dynamic batch and lowered by the same partitioner, so its convs and linears run in
XNNPACK's F32 kernels. It calibrates nothing (two images of ``calib`` are the export example);
its artifact is the ``.pte`` alone and its surrogate a copy of the float model.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..classifier import Capability, Classifier, TorchClassifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check, require_extra
from .base import CalibratedConfig, CompressionConfig
from .calib import calibration_images
from .layers import count_layers, describe_int8
from .pt2e import (
    TwoOutputClassifier,
    _one_line,
    count_quantized,
    example_batch,
    export_converted,
    export_float,
    load_program,
    pt2e_quiet,
    quantize_graph,
    save_program,
    surrogate_classifier,
    to_bytes_tensor,
)


@dataclass(frozen=True)
class ExecutorchInt8Config(CalibratedConfig):
    """``max_batch``: upper bound of the program's dynamic batch (ExecuTorch plans its memory for
    it; larger batches run in chunks); ``threads``: XNNPACK thread-pool size (``None``: torch's)."""

    name = "int8-executorch"
    max_batch: int = 256
    threads: int | None = None

    def validate(self) -> None:
        super().validate()
        _check_common(self)


@dataclass(frozen=True)
class ExecutorchFP32Config(CompressionConfig):
    """``fp32-executorch``: the float program lowered to XNNPACK, the fair FP32 baseline for
    ``int8-executorch``'s speed. ``max_batch`` and ``threads`` as there."""

    name = "fp32-executorch"
    max_batch: int = 256
    threads: int | None = None

    def validate(self) -> None:
        _check_common(self)


def _check_common(cfg: Any) -> None:
    check(isinstance(cfg.max_batch, int) and not isinstance(cfg.max_batch, bool) and 2 <= cfg.max_batch <= 4096,
          f"{cfg.name}: max_batch must be an integer in [2, 4096], got {cfg.max_batch!r}")
    check(cfg.threads is None or (isinstance(cfg.threads, int) and not isinstance(cfg.threads, bool)
                                  and cfg.threads > 0),
          f"{cfg.name}: threads must be a positive integer, got {cfg.threads!r}")


# ----------------------------------------------------------------------------- the classifier
class ExecutorchClassifier(TwoOutputClassifier):
    """A ``.pte`` program in ExecuTorch's Python runtime (XNNPACK delegate, CPU).

    ``logits(x)``: ``(N, C, H, W)`` float in [0, 1] -> ``(N, K)`` float32 (CPU), in chunks of at most
    ``max_batch`` images; ``features(x)``: the program's second output ``(N, D)``. No GRAD.
    """

    def __init__(self, pte: bytes, precision: str, threads: int | None = None):
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        self.pte = bytes(pte)
        self.precision = precision
        self.device = torch.device("cpu")
        self.capabilities = frozenset({Capability.FEATURES})
        self.threads = threads or torch.get_num_threads()
        if portable_lib._threadpool_get_thread_count() != self.threads:  # a process-wide pool
            portable_lib._unsafe_reset_threadpool(self.threads)
        self.program = Runtime.get().load_program(self.pte)
        self.method = self.program.load_method("forward")
        sizes = self.method.metadata.input_tensor_meta(0).sizes()
        self.max_batch = int(sizes[0])  # the planned (upper-bound) batch of the input
        self.info = {}

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().to("cpu", torch.float32).contiguous()
        if len(x) == 0:
            meta = self.method.metadata
            return tuple(torch.empty(0, *meta.output_tensor_meta(i).sizes()[1:]) for i in range(2))  # type: ignore
        logits, feats = [], []
        for i in range(0, len(x), self.max_batch):
            out = self.method.execute((x[i:i + self.max_batch].contiguous(),))
            logits.append(out[0].clone())
            feats.append(out[1].clone())
        return torch.cat(logits), torch.cat(feats)

    @property
    def size_bytes(self) -> int:
        return len(self.pte)


# ----------------------------------------------------------------------------- lowering
def adaptive_max_to_max_pool(gm: fx.GraphModule, who: str = "int8-executorch") -> fx.GraphModule:
    """Rewrite each ``adaptive_max_pool2d(x, (oh, ow))`` whose input size divides evenly into the
    equal ``max_pool2d(x, k, k)`` with ``k = (H // oh, W // ow)`` (in place; returns ``gm``)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.adaptive_max_pool2d.default:
            continue
        h, w = (int(s) for s in node.args[0].meta["val"].shape[-2:])
        oh, ow = (int(s) for s in node.args[1])
        if h % oh or w % ow:
            raise BackdoorLabError(f"{who}: adaptive_max_pool2d from {h}x{w} to {oh}x{ow} has no "
                                   f"ExecuTorch kernel (only evenly dividing sizes are rewritten to max_pool2d)")
        k = [h // oh, w // ow]
        with gm.graph.inserting_before(node):
            pool = gm.graph.call_function(torch.ops.aten.max_pool2d.default, (node.args[0], k, k))
        pool.meta = dict(node.meta)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise BackdoorLabError(f"{who}: unexpected use of adaptive_max_pool2d's result")
            if user.args[1] == 0:
                user.replace_all_uses_with(pool)
            elif user.users:
                raise BackdoorLabError(f"{who}: adaptive_max_pool2d's indices are used; no ExecuTorch kernel")
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _restore_batch_range(ep: Any, max_batch: int) -> None:
    """Give the program's batch symbol back its declared range ``[1, max_batch]`` (see the module
    docstring: lowering's re-trace of the float convs narrows it by a conv-backend guard)."""
    from torch.utils._sympy.value_ranges import ValueRanges

    for node in ep.graph.nodes:
        if node.op != "placeholder" or not isinstance(node.meta.get("val"), torch.Tensor) \
                or node.meta["val"].ndim == 0:  # a lifted scalar constant
            continue
        dim = node.meta["val"].shape[0]
        if isinstance(dim, torch.SymInt) and dim.node.expr.is_symbol:
            dim.node.shape_env.var_to_range[dim.node.expr] = ValueRanges(1, max_batch)


def _op_name(target: Any) -> str:
    """``aten.view_copy.default`` for an ATen or edge-dialect op."""
    return str(target).removeprefix("<EdgeOpOverload: ").split(">")[0]


def delegation(edge_gm: fx.GraphModule) -> dict[str, Any]:
    """Delegated subgraphs of a lowered edge program: their backends, how many conv/linear nodes
    went in quantized (int8 activation and int8 constant weight), and how many ops stayed out."""
    int8 = {"conv": 0, "linear": 0}
    backends, n_delegated = [], 0
    for node in edge_gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            lowered = getattr(edge_gm, node.name)
            backends.append(lowered.backend_id)
            graph = lowered.original_module.graph
            n_delegated += sum(n.op == "call_function" for n in graph.nodes)
            if lowered.backend_id == "XnnpackBackend":
                for k, v in count_quantized(graph).items():
                    int8[k] += v
    outside = [_op_name(n.target) for n in edge_gm.graph.nodes
               if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
               and n.target is not operator.getitem]
    return {"int8": int8, "subgraphs": len(backends), "backends": sorted(set(backends)),
            "delegated_nodes": n_delegated, "non_delegated_ops": outside}


def lower_to_pte(ep: torch.export.ExportedProgram, max_batch: int,
                 who: str = "int8-executorch") -> tuple[bytes, dict[str, Any]]:
    """XNNPACK-lowered ``.pte`` bytes of a converted PT2E (or float) program, and its delegation facts."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with pt2e_quiet():
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            facts = delegation(edge.exported_program().graph_module)
            _restore_batch_range(edge.exported_program(), max_batch)
            pte = edge.to_executorch().buffer
    except BackdoorLabError:
        raise
    except Exception as exc:
        what = "quantized" if who.startswith("int8") else "float"
        raise BackdoorLabError(f"{who}: the {what} model cannot be lowered to ExecuTorch/XNNPACK: "
                               f"{_one_line(exc)}") from None
    return pte, facts


# ----------------------------------------------------------------------------- handler
def build_pte(cfg: ExecutorchInt8Config | ExecutorchFP32Config, model: nn.Module, calib: TensorData | None,
              quantize: bool) -> tuple[bytes, bytes | None, tuple[int, ...], dict[str, Any], Any, dict[str, Any]]:
    """What ``int8-executorch`` (``quantize``: XNNPACK PT2E PTQ on ``calib_size`` images) and
    ``fp32-executorch`` share: export with a dynamic batch, rewrite the pools, (quantize,) lower.
    Returns ``(pte, converted program bytes or None, input shape, delegation facts, converted
    graph module or None, timings)``."""
    info: dict[str, Any] = {}
    x = calibration_images(calib, cfg.calib_size if quantize else 2, cfg.name)  # type: ignore[union-attr]
    shape = tuple(x.shape[1:])
    example = example_batch(x)
    t0 = time.perf_counter()
    gm = adaptive_max_to_max_pool(export_float(model, example, cfg.max_batch, cfg.name).module(), cfg.name)
    program, sur_gm = None, None
    if quantize:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        gm = quantize_graph(gm, quantizer, x)
    ep = export_converted(gm, example, cfg.max_batch)
    if quantize:
        program = save_program(ep)
        info["quantize_s"] = round(time.perf_counter() - t0, 3)
        sur_gm = ep.module()  # before lowering, which transforms the program
    else:
        info["export_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    pte, facts = lower_to_pte(ep, cfg.max_batch, cfg.name)
    info["lower_s"] = round(time.perf_counter() - t0, 3)
    return pte, program, shape, facts, sur_gm, info


def _classifier(cfg: ExecutorchInt8Config | ExecutorchFP32Config, model: nn.Module, pte: bytes,
                shape: tuple[int, ...], facts: dict[str, Any], artifact: dict[str, Any],
                info: dict[str, Any]) -> ExecutorchClassifier:
    import executorch.version

    clf = ExecutorchClassifier(pte, cfg.tag(), cfg.threads)
    clf.input_shape = shape
    clf.int8_layers = describe_int8(facts["int8"], count_layers(model))
    clf.artifact = {"pte": to_bytes_tensor(pte), "input_shape": list(shape), "delegation": facts, **artifact}
    clf.info = {"runtime": "executorch-xnnpack", "runtime_version": executorch.version.__version__,
                "simulated": False, **info, "max_batch": clf.max_batch, "threads": clf.threads,
                "delegated_subgraphs": facts["subgraphs"], "non_delegated_ops": facts["non_delegated_ops"]}
    return clf


def int8_executorch(cfg: ExecutorchInt8Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                    artifact: dict | None = None) -> Classifier:
    require_extra("executorch", "executorch", "int8-executorch")
    require_extra("torchao", "pt2e", "int8-executorch")

    info: dict[str, Any] = {}
    if artifact is not None:
        pte, program = artifact["pte"].numpy().tobytes(), artifact["program"].numpy().tobytes()
        shape, facts = tuple(artifact["input_shape"]), artifact["delegation"]
        sur_gm = load_program(program).module()
    else:
        pte, program, shape, facts, sur_gm, info = build_pte(cfg, model, calib, quantize=True)
    clf = _classifier(cfg, model, pte, shape, facts, {"program": to_bytes_tensor(program)},
                      {"calib_size": cfg.calib_size, "activations": "int8", "weights": "int8 per-channel", **info})
    clf.surrogate = surrogate_classifier(sur_gm, cfg.tag(), device)
    return clf


def fp32_executorch(cfg: ExecutorchFP32Config, model: nn.Module, *, calib: TensorData | None, device: torch.device,
                    artifact: dict | None = None) -> Classifier:
    import copy

    require_extra("executorch", "executorch", "fp32-executorch")
    info: dict[str, Any] = {}
    if artifact is not None:
        pte, shape, facts = artifact["pte"].numpy().tobytes(), tuple(artifact["input_shape"]), artifact["delegation"]
    else:
        pte, _, shape, facts, _, info = build_pte(cfg, model, calib, quantize=False)
    clf = _classifier(cfg, model, pte, shape, facts, {},
                      {"activations": "float32", "weights": "float32", **info})
    clf.surrogate = TorchClassifier(copy.deepcopy(model), precision=f"{cfg.tag()}/surrogate", device=device,
                                    capabilities=frozenset({Capability.GRAD, Capability.FEATURES}))
    return clf
