"""Differentiable surrogates of INT8 artifacts, built from the artifacts themselves.

An int8 artifact (a converted PyTorch FX module, an ONNX Runtime QDQ graph) has no input
gradient. Its surrogate is a float PyTorch module that replays the artifact's computation with
every integer step replaced by :func:`~backdoorlab.compress.fakequant.fake_quant` at the
artifact's **own** scales and zero-points (read from the artifact, never re-calibrated), and
its own dequantised int8 weights. Gradient-based defenses run on it (straight-through
gradients through each rounding); what is left between the two is float accumulation order and
requantisation rounding inside the int8 kernels, which :func:`backdoorlab.classifier.agreement`
measures on the test set.

* :func:`fx_surrogate`: walks a ``convert_fx`` GraphModule node by node (quantize_per_tensor,
  quantized modules, ``quantized::add``, pools that re-round on quantized tensors).
* :func:`onnx_surrogate`: interprets a QDQ ONNX graph (ONNX Runtime ``quantize_static``
  output) in PyTorch: ``QuantizeLinear -> DequantizeLinear`` pairs become fake-quant, constant
  ``DequantizeLinear`` of int8 weights and int32 biases become float constants.

Shapes: both return modules mapping ``(N, C, H, W)`` float in [0, 1] to whatever the artifact
returns (here ``(logits, features)``).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import BackdoorLabError
from .fakequant import FakeQuant, qrange

_QDTYPE_RANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.qint32: (-(2**31), 2**31 - 1)}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                 nn.AdaptiveMaxPool3d, nn.Flatten, nn.ReLU, nn.Dropout, nn.Identity, nn.Unflatten)
_REROUND_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d)
_PASS_FUNCS = {"flatten", "reshape", "view", "relu", "relu_", "max_pool2d", "adaptive_max_pool2d", "squeeze",
               "unsqueeze", "permute", "transpose", "contiguous", "getitem", "dropout"}


# --------------------------------------------------------------------------------- FX artifacts
def _float_conv(qm: nn.Module) -> nn.Module:
    w = qm.weight().dequantize()
    b = qm.bias()
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[w.ndim - 2]
    conv = cls(qm.in_channels, qm.out_channels, qm.kernel_size, qm.stride, qm.padding, qm.dilation,
               qm.groups, bias=b is not None, padding_mode=qm.padding_mode)
    return _with_params(conv, w, b)


def _float_linear(qm: nn.Module) -> nn.Module:
    w = qm.weight().dequantize()
    b = qm.bias()
    return _with_params(nn.Linear(w.shape[1], w.shape[0], bias=b is not None), w, b)


def _with_params(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """Copy the artifact's dequantized weight (and bias) into a float ``layer``."""
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def _float_bn(qm: nn.Module) -> nn.Module:
    bn = nn.BatchNorm2d(qm.num_features, eps=qm.eps)
    with torch.no_grad():
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, k).copy_(getattr(qm, k))
    return bn.eval()


def _out_fq(qm: nn.Module) -> FakeQuant:
    return FakeQuant(float(qm.scale), int(qm.zero_point), 0, 255)


def _quantized_module(qm: nn.Module) -> nn.Module | None:
    """Float fake-quant replacement of a quantized module, or ``None`` if ``qm`` is not one."""
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.intrinsic import quantized as nniq

    if isinstance(qm, (nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d)):
        return nn.Sequential(_float_conv(qm), nn.ReLU(), _out_fq(qm))
    if isinstance(qm, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)):
        return nn.Sequential(_float_conv(qm), _out_fq(qm))
    if isinstance(qm, nniq.LinearReLU):
        return nn.Sequential(_float_linear(qm), nn.ReLU(), _out_fq(qm))
    if isinstance(qm, nnq.Linear) and not type(qm).__module__.startswith("torch.ao.nn.quantized.dynamic"):
        return nn.Sequential(_float_linear(qm), _out_fq(qm))
    if isinstance(qm, nniq.BNReLU2d):
        return nn.Sequential(_float_bn(qm), nn.ReLU(), _out_fq(qm))
    if isinstance(qm, nnq.BatchNorm2d):
        return nn.Sequential(_float_bn(qm), _out_fq(qm))
    if isinstance(qm, nnq.ReLU6):
        return nn.ReLU6()
    if isinstance(qm, nnq.Hardswish):
        return nn.Sequential(nn.Hardswish(), _out_fq(qm))
    if isinstance(qm, nnq.LeakyReLU):
        return nn.Sequential(nn.LeakyReLU(qm.negative_slope), _out_fq(qm))
    if type(qm).__module__.startswith("torch.ao.nn"):
        raise BackdoorLabError(f"no fake-quant surrogate for quantized module {type(qm).__name__}")
    return None


def fx_surrogate(q: fx.GraphModule) -> fx.GraphModule:
    """Float fake-quant copy of a ``convert_fx`` GraphModule ``q`` with ``q``'s own qparams."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    qp: dict[fx.Node, tuple[float, int] | None] = {}  # qparams of quantized values
    n_mod = 0

    def val(a: Any) -> Any:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            v = q
            for part in a.target.split("."):
                v = getattr(v, part)
            return v
        return a

    def add_module(m: nn.Module, arg: fx.Node, source: str) -> fx.Node:
        nonlocal n_mod
        name = f"m{n_mod}"
        n_mod += 1
        for fq in m.modules():  # name each activation quantizer after the artifact node it replays
            if isinstance(fq, FakeQuant):
                fq.source = source
        root.add_module(name, m)
        return graph.call_module(name, (arg,))

    def mapped(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for node in q.graph.nodes:
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.target)
            qp[node] = None
        elif node.op == "get_attr":
            env[node] = None  # constants are read with val(); not needed in the float graph
            t = val(node)
            if isinstance(t, torch.Tensor) and not t.is_quantized:
                name = f"c{n_mod}"
                n_mod += 1
                root.register_buffer(name, t.detach().clone())
                env[node] = graph.get_attr(name)
            qp[node] = None
        elif node.op == "call_function" and node.target is torch.quantize_per_tensor:
            x, s, z, dt = node.args
            lo, hi = _QDTYPE_RANGE[dt]
            scale, zp = float(val(s)), int(val(z))
            env[node] = add_module(FakeQuant(scale, zp, lo, hi), env[x], f"quantize({x.name})")
            qp[node] = (scale, zp)
        elif node.op == "call_method" and node.target == "dequantize":
            env[node] = env[first]
            qp[node] = None
        elif node.op == "call_function" and str(node.target).startswith("quantized."):
            op = str(node.target).split(".")[1]
            a, b = node.args[0], node.args[1]
            scale, zp = float(val(node.args[2])), int(val(node.args[3]))
            fns = {"add": operator.add, "add_relu": lambda u, v: F.relu(u + v), "mul": operator.mul,
                   "mul_relu": lambda u, v: F.relu(u * v)}
            if op not in fns:
                raise BackdoorLabError(f"no fake-quant surrogate for quantized op {node.target}")
            y = graph.call_function(fns[op], (env[a], mapped(b)))
            env[node] = add_module(FakeQuant(scale, zp, 0, 255), y, node.name)
            qp[node] = (scale, zp)
        elif node.op == "call_module":
            m = q.get_submodule(node.target)
            rep = _quantized_module(m)
            if rep is not None:
                env[node] = add_module(rep, env[first], str(node.target))
                qp[node] = (float(m.scale), int(m.zero_point)) if hasattr(m, "scale") else qp.get(first)
            else:
                y = add_module(copy.deepcopy(m), env[first], str(node.target))
                qin = qp.get(first)
                if qin is not None and isinstance(m, _REROUND_MODULES):
                    # a quantized average pool re-rounds
                    y = add_module(FakeQuant(qin[0], qin[1], 0, 255), y, str(node.target))
                env[node] = y
                qp[node] = qin if isinstance(m, _PASS_MODULES + _REROUND_MODULES) else None
        elif node.op in ("call_function", "call_method"):
            env[node] = graph.create_node(node.op, node.target, mapped(node.args), mapped(node.kwargs))
            name = getattr(node.target, "__name__", str(node.target))
            qp[node] = qp.get(first) if name in _PASS_FUNCS else None
        elif node.op == "output":
            graph.output(mapped(node.args[0]))
        else:  # pragma: no cover - fx has no other node kinds
            raise BackdoorLabError(f"unexpected fx node {node.op}")
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()  # the qparam get_attr nodes are read at build time only
    gm.recompile()
    return gm.eval()


# --------------------------------------------------------------------------------- ONNX artifacts
def _np_to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32):
        return torch.from_numpy(a.astype(np.int64))
    return torch.from_numpy(np.array(a, copy=True))


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int] | None, nd: int) -> tuple[list[int], bool]:
    if not pads:
        return [0] * nd, True
    begin, end = pads[:nd], pads[nd:]
    return begin, begin == end


class OnnxQDQModule(nn.Module):
    """A QDQ ONNX graph run by PyTorch ops, with fake-quant in place of Q/DQ pairs.

    Supports the ops the exporter and ``quantize_static`` emit for CNN classifiers: Conv, Gemm,
    MatMul, Add, Sub, Mul, Div, Relu, Clip, Max/AveragePool, Global*Pool, ReduceMax/Mean,
    Reshape, Flatten, BatchNormalization, Concat, Identity, Constant, Shape, Gather, Unsqueeze,
    Squeeze, Cast, Transpose. Outputs: a tuple in the graph's output order.
    """

    def __init__(self, model_proto):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        g = model_proto.graph
        self.inputs = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
        self.outputs = [o.name for o in g.output]
        consts: dict[str, torch.Tensor] = {t.name: _np_to_torch(numpy_helper.to_array(t)) for t in g.initializer}
        self._names: dict[str, str] = {}
        self.steps: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
        signed = {t.name: t.data_type == onnx.TensorProto.INT8 for t in g.initializer}
        fq_of: dict[str, str] = {}  # QuantizeLinear output -> fake-quant module name
        for n in g.node:
            a = _attrs(n)
            if n.op_type == "Constant":
                consts[n.output[0]] = _np_to_torch(numpy_helper.to_array(a["value"]))
                continue
            if n.op_type == "DequantizeLinear" and n.input[0] in consts:  # int8 weight / int32 bias
                q = consts[n.input[0]].double()
                s = consts[n.input[1]].double()
                z = consts[n.input[2]].double() if len(n.input) > 2 and n.input[2] else torch.zeros(())
                axis = a.get("axis", 1)
                if s.numel() > 1:
                    shape = [1] * q.ndim
                    shape[axis] = -1
                    s, z = s.reshape(shape), z.reshape(shape)
                consts[n.output[0]] = ((q - z) * s).float()
                continue
            if n.op_type == "QuantizeLinear":
                s = consts[n.input[1]].float()
                lo, hi = qrange(8, signed.get(n.input[2], False) if len(n.input) > 2 else False)
                zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] else torch.zeros((), dtype=torch.int64)
                name = f"fq{len(fq_of)}"
                fq = FakeQuant(s.reshape(()) if s.numel() == 1 else s, zp.reshape(()) if zp.numel() == 1 else zp,
                               lo, hi, None if s.numel() == 1 else a.get("axis", 1))
                fq.source = f"quantize({n.input[0]})"  # the tensor it quantizes, named as in the graph
                self.add_module(name, fq)
                fq_of[n.output[0]] = name
                self.steps.append(("FakeQuant", [n.input[0]], [n.output[0]], {"module": name}))
                continue
            if n.op_type == "DequantizeLinear":
                if n.input[0] not in fq_of:
                    raise BackdoorLabError("no surrogate for a DequantizeLinear of a non-constant, "
                                           "non-QuantizeLinear input")
                self.steps.append(("Identity", [n.input[0]], [n.output[0]], {}))
                continue
            if n.op_type not in _ONNX_OPS:
                raise BackdoorLabError(f"no surrogate for ONNX op {n.op_type}")
            self.steps.append((n.op_type, list(n.input), list(n.output), a))
        # constants become buffers so .to(device) moves them
        for i, (k, v) in enumerate(consts.items()):
            name = f"k{i}"
            self._names[k] = name
            self.register_buffer(name, v, persistent=True)

    def forward(self, x: torch.Tensor):
        env: dict[str, Any] = {"": None, self.inputs[0]: x}
        for k, b in self._names.items():
            env[k] = getattr(self, b)
        for op, ins, outs, a in self.steps:
            args = [env[i] for i in ins]
            if op == "FakeQuant":
                res = getattr(self, a["module"])(args[0])
            else:
                res = _ONNX_OPS[op](args, a)
            if isinstance(res, tuple):
                for o, r in zip(outs, res):
                    env[o] = r
            else:
                env[outs[0]] = res
        out = tuple(env[o] for o in self.outputs)
        return out if len(out) > 1 else out[0]


def _conv(args, a):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = w.ndim - 2
    begin, sym = _pads(a.get("pads"), nd)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise BackdoorLabError("no surrogate for Conv with auto_pad")
    if not sym:
        pads = []
        for i in reversed(range(nd)):
            pads += [a["pads"][i], a["pads"][i + nd]]
        x, begin = F.pad(x, pads), [0] * nd
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, a.get("strides", [1] * nd), begin, a.get("dilations", [1] * nd), a.get("group", 1))


def _pool(args, a, kind):
    x = args[0]
    k = a["kernel_shape"]
    nd = len(k)
    begin, sym = _pads(a.get("pads"), nd)
    if not sym:
        raise BackdoorLabError(f"no surrogate for asymmetric {kind} padding")
    strides = a.get("strides", [1] * nd)
    if kind == "max":
        return F.max_pool2d(x, k, strides, begin, a.get("dilations", [1] * nd), bool(a.get("ceil_mode", 0)))
    return F.avg_pool2d(x, k, strides, begin, bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))


def _reduce(args, a, fn):
    x = args[0]
    axes = a.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = [int(v) for v in args[1].reshape(-1)]
    keep = bool(a.get("keepdims", 1))
    if axes is None:
        axes = list(range(x.ndim))
    out = x
    for ax in sorted((ax % x.ndim for ax in axes), reverse=True):
        out = fn(out, ax, keep)
    return out


def _gemm(args, a):
    x, w = args[0], args[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(args) > 2 and args[2] is not None:
        y = y + a.get("beta", 1.0) * args[2]
    return y


def _reshape(args, a):
    x, shape = args[0], [int(v) for v in args[1].reshape(-1)]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _clip(args, a):
    lo = args[1] if len(args) > 1 and args[1] is not None else a.get("min")
    hi = args[2] if len(args) > 2 and args[2] is not None else a.get("max")
    return torch.clamp(args[0], None if lo is None else float(lo), None if hi is None else float(hi))


def _bn(args, a):
    x, s, b, m, v = args
    return F.batch_norm(x, m, v, s, b, False, 0.0, a.get("epsilon", 1e-5))


def _axes_arg(args, a):
    if len(args) > 1 and args[1] is not None:
        return [int(v) for v in args[1].reshape(-1)]
    return list(a.get("axes", []))


def _unsqueeze(args, a):
    x = args[0]
    for ax in sorted(_axes_arg(args, a)):
        x = x.unsqueeze(ax)
    return x


def _squeeze(args, a):
    x = args[0]
    axes = _axes_arg(args, a)
    if not axes:
        return x.squeeze()
    for ax in sorted((ax % x.ndim for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


_ONNX_OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda args, a: args[0] @ args[1],
    "Add": lambda args, a: args[0] + args[1],
    "Sub": lambda args, a: args[0] - args[1],
    "Mul": lambda args, a: args[0] * args[1],
    "Div": lambda args, a: args[0] / args[1],
    "Relu": lambda args, a: F.relu(args[0]),
    "Clip": _clip,
    "MaxPool": lambda args, a: _pool(args, a, "max"),
    "AveragePool": lambda args, a: _pool(args, a, "avg"),
    "GlobalAveragePool": lambda args, a: args[0].mean(dim=tuple(range(2, args[0].ndim)), keepdim=True),
    "GlobalMaxPool": lambda args, a: args[0].amax(dim=tuple(range(2, args[0].ndim)), keepdim=True),
    "ReduceMax": lambda args, a: _reduce(args, a, lambda t, d, k: t.amax(d, keepdim=k)),
    "ReduceMean": lambda args, a: _reduce(args, a, lambda t, d, k: t.mean(d, keepdim=k)),
    "Reshape": _reshape,
    "Flatten": lambda args, a: args[0].flatten(a.get("axis", 1)) if a.get("axis", 1) > 0 else args[0].reshape(1, -1),
    "BatchNormalization": _bn,
    "Concat": lambda args, a: torch.cat(args, a["axis"]),
    "Identity": lambda args, a: args[0],
    "Shape": lambda args, a: torch.tensor(args[0].shape, dtype=torch.int64)[a.get("start", 0):a.get("end")],
    "Gather": lambda args, a: torch.index_select(args[0], a.get("axis", 0), args[1].reshape(-1)).reshape(
        args[0].shape[:a.get("axis", 0)] + args[1].shape + args[0].shape[a.get("axis", 0) + 1:]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Cast": lambda args, a: args[0],
    "Transpose": lambda args, a: args[0].permute(*a["perm"]) if "perm" in a else args[0].permute(
        *reversed(range(args[0].ndim))),
}


def onnx_surrogate(model_proto) -> OnnxQDQModule:
    """Float fake-quant PyTorch module replaying the QDQ ONNX graph ``model_proto``."""
    return OnnxQDQModule(model_proto).eval()


# ------------------------------------------------------------------------- QOperator -> QDQ
# QOperator op -> (float op, positions of (x, scale, zero point) activation inputs, position of the
# quantized weight triple or None, position of the int32 bias or None, position of (y_scale, y_zp))
_QOP = {
    "QLinearConv": ("Conv", [0], 3, 8, 6),
    "QLinearMatMul": ("MatMul", [0], 3, None, 6),
    "QGemm": ("Gemm", [0], 3, 6, 7),
    "QLinearAdd": ("Add", [0, 3], None, None, 6),
    "QLinearMul": ("Mul", [0, 3], None, None, 6),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [0], None, None, 3),
    "QLinearAveragePool": ("AveragePool", [0], None, None, 3),
}
# ops that act on int8 values as they would on the dequantised ones (order-preserving, no arithmetic)
_QOP_PASS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu",
             "GlobalMaxPool", "ReduceMax"}


def qoperator_to_qdq(model_proto):
    """Rewrite a QOperator ONNX graph (``QLinearConv``, ``QGemm``, ... as ONNX Runtime's
    ``quantize_static(quant_format=QOperator)`` writes it) into the QDQ form
    :class:`OnnxQDQModule` replays, with the file's **own** integers, scales and zero points.

    Each ``QLinearX(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias)`` becomes the float
    ``X`` on the dequantised input, with weights ``(w - w_zp) * w_scale`` and bias
    ``bias * x_scale * w_scale`` precomputed as float constants, followed by
    ``QuantizeLinear(y, y_scale, y_zp)``: the same integer computation as the kernel, up to the
    kernel's requantisation rounding. Tensors that already hold quantized values (outputs of
    ``QuantizeLinear`` or of another QLinear op, through max-pool / reshape) are represented by
    their dequantised floats, so their ``DequantizeLinear`` becomes ``Identity``. An op outside this
    set is one :class:`~backdoorlab.errors.BackdoorLabError` line.
    """
    import onnx
    from onnx import helper, numpy_helper

    src = model_proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in src.initializer}
    new_inits: dict[str, np.ndarray] = dict(inits)
    nodes = []
    quantized: set[str] = set()  # tensors holding (dequantised) quantized values

    def dq_const(name: str, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
        q = inits[name].astype(np.float64)
        s = scale.astype(np.float64)
        z = np.zeros_like(s) if zp is None else zp.astype(np.float64)
        if s.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return ((q - z) * s).astype(np.float32)

    def activation(name: str) -> str:
        if name in quantized:
            return name
        if name in inits:  # a quantized constant operand (e.g. of QLinearAdd) is dequantised below
            return name
        raise BackdoorLabError(f"no surrogate for a QOperator input {name!r} that is not a quantized tensor")

    for i, n in enumerate(src.node):
        op = n.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if op == "QuantizeLinear":
            nodes.append(n)
            quantized.add(n.output[0])
        elif op == "DequantizeLinear":
            if n.input[0] in quantized:
                nodes.append(helper.make_node("Identity", [n.input[0]], list(n.output)))
            else:
                nodes.append(n)  # a constant int8 tensor: OnnxQDQModule dequantises it
        elif op in _QOP:
            fop, acts, wpos, bpos, ypos = _QOP[op]
            ins = list(n.input) + [""] * 10
            fins = []
            for a in acts:
                x = ins[a]
                if x in inits and x not in quantized:  # quantized constant operand
                    cname = f"{x}__dq{i}"
                    new_inits[cname] = dq_const(x, inits[ins[a + 1]], inits.get(ins[a + 2]), 0)
                    fins.append(cname)
                else:
                    fins.append(activation(x))
            if wpos is not None:
                w, ws, wz = ins[wpos:wpos + 3]
                axis = 0 if op == "QLinearConv" or (op == "QGemm" and attrs.get("transB", 0)) else 1
                wname = f"{w}__dq{i}"
                new_inits[wname] = dq_const(w, inits[ws], inits.get(wz), axis)
                fins.append(wname)
                if bpos is not None and ins[bpos]:
                    xs = inits[ins[acts[0] + 1]].astype(np.float64)
                    bname = f"{ins[bpos]}__dq{i}"
                    new_inits[bname] = (inits[ins[bpos]].astype(np.float64) * xs
                                        * inits[ws].astype(np.float64).reshape(-1)).astype(np.float32)
                    fins.append(bname)
            fattrs = {k: v for k, v in attrs.items() if k not in ("channels_last",)}
            if attrs.get("channels_last", 0):
                raise BackdoorLabError(f"no surrogate for {op} with channels_last=1")
            if op == "QGemm" and fattrs.get("alpha", 1.0) != 1.0:
                raise BackdoorLabError("no surrogate for QGemm with alpha != 1")
            ys = ins[ypos] if ypos < len(n.input) else ""
            if ys:  # quantized output
                tmp = f"{n.output[0]}__float"
                nodes.append(helper.make_node(fop, fins, [tmp], **fattrs))
                nodes.append(helper.make_node("QuantizeLinear", [tmp, ys, ins[ypos + 1]], [n.output[0]]))
                quantized.add(n.output[0])
            else:  # QGemm without y_scale: float output
                nodes.append(helper.make_node(fop, fins, [n.output[0]], **fattrs))
        elif op.startswith("QLinear") or op in ("QGemm", "QAttention", "DynamicQuantizeLinear", "ConvInteger",
                                                "MatMulInteger"):
            raise BackdoorLabError(f"no surrogate for QOperator op {op}")
        else:
            nodes.append(n)
            if op in _QOP_PASS and n.input and n.input[0] in quantized:
                quantized.update(n.output)
    graph = helper.make_graph(nodes, src.name, list(src.input), list(src.output),
                              [numpy_helper.from_array(v, k) for k, v in new_inits.items()])
    return helper.make_model(graph, opset_imports=list(model_proto.opset_import),
                             ir_version=model_proto.ir_version or onnx.IR_VERSION)
