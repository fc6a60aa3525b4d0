"""Load a model file the project did not train, without running anything the file carries.

What a scan accepts (issue 28), and how each is read:

* **ONNX** (``.onnx``, FP32, or INT8 in QDQ or QOperator form): parsed as protobuf (data only)
  and run by ONNX Runtime's CPU provider, which executes the standard operator set and nothing
  else (a custom-op domain needs a library registered by the caller, which a scan never does).
  Weights stored as external data are refused: they would make the loader read other paths.
  Gradients come from a PyTorch replay of the graph (:class:`~backdoorlab.compress.surrogate.OnnxQDQModule`):
  for FP32 it is the same computation, for QDQ INT8 a fake-quant copy at the file's own scales
  and zero points; the replay's logits are compared with ONNX Runtime's on the clean images and the
  difference (FP32) or top-1 agreement (INT8) is reported. A QOperator graph (``QLinearConv`` ...)
  is first rewritten into QDQ with the file's own integers and scales
  (:func:`~backdoorlab.compress.surrogate.qoperator_to_qdq`); an op outside what that rewrite
  knows leaves a black-box scan, which says so.
  (Why not onnx2torch: it imports torchvision, which has no CPU build beside torch 2.13 here; the
  replay is checked against ONNX Runtime on every scan instead.)
* **safetensors** (a JSON header and raw tensors, data only) with ``arch`` naming a registered
  architecture (``small-cnn``, ``preact-resnet18``, ... or a spec such as
  ``{"name": "small-cnn", "widths": [16, 32, 64, 128]}``); class count and input channels are read
  from the tensors' shapes.
* **A PyTorch state dict** (``torch.save`` zip or legacy file) with ``arch``: loaded only with
  ``torch.load(weights_only=True)``, whose unpickler builds tensors and containers and refuses
  every other global. Before that the pickle's opcodes are listed (:mod:`pickletools`, which reads
  and never executes) so that a refusal names what the file would have imported.

Refused with one line saying why and how to convert: pickled modules and any checkpoint whose
pickle imports anything but tensors (a ``__reduce__`` payload), TorchScript archives (loading one
deserialises and runs TorchScript code through a large C++ parser: export to ONNX instead),
unknown formats, truncated or empty files, files over ``BACKDOORLAB_MAX_MODEL_MB`` (default 2048).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classifier import Capability, Classifier, TorchClassifier, agreement
from ..errors import BackdoorLabError, check

FORMATS = ("onnx", "safetensors", "state-dict")
CONVERT = "export it to ONNX (torch.onnx.export) or save its state_dict as safetensors"
# globals a weights-only PyTorch checkpoint may name (what torch's weights_only unpickler allows
# for plain state dicts); anything else is reported by name before torch.load refuses it
_TENSOR_GLOBALS = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_parameter", "torch.",
                   "collections.OrderedDict",
                   "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.bytearray", "_codecs.encode",
                   "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                   "numpy.dtype")
_UNSAFE_TORCH = ("torch.nn.modules", "torch.jit", "torch._C._nn", "torch.fx", "torch.load", "torch.save",
                 "torch.hub", "torch.utils", "torch.ops", "torch.package")


def _max_model_bytes() -> int:
    raw = os.environ.get("BACKDOORLAB_MAX_MODEL_MB", "").strip()
    if not raw:
        return 2048 << 20
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    check(v > 0, f"BACKDOORLAB_MAX_MODEL_MB must be a positive number, got {raw!r}")
    return int(v * (1 << 20))


@dataclass
class LoadedModel:
    """A model file as the scan runs it.

    ``clf``: the classifier as deployed (ONNX Runtime for ONNX files, PyTorch for state dicts),
    with ``clf.surrogate`` the gradient path where the artifact has none (``None`` where no
    gradient path exists: then only black-box scanners run). ``format``: one of :data:`FORMATS`;
    ``precision``: ``fp32``, ``int8-qdq`` or ``int8-qop``; ``input_shape``: ``(C, H, W)`` or
    ``None`` when the file does not fix it; ``num_classes``; ``notes``: plain sentences for the
    report (which gradient path, why none).
    """

    path: Path
    format: str
    precision: str
    clf: Classifier
    num_classes: int
    input_shape: tuple[int, int, int] | None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def gradient_path(self) -> str:
        """``artifact`` (the file itself runs in PyTorch), ``surrogate`` or ``none``."""
        if Capability.GRAD in self.clf.capabilities:
            return "artifact"
        return "surrogate" if self.clf.surrogate is not None else "none"

    def check_surrogate(self, x: torch.Tensor) -> dict[str, float]:
        """Compare the gradient path with the artifact on clean images ``x`` ``(N, C, H, W)``:
        ``max_logit_diff`` and top-1 ``agreement`` (recorded in ``info`` and returned)."""
        sur = self.clf.surrogate
        if sur is None or len(x) == 0:
            return {}
        with torch.no_grad():
            a, b = self.clf.logits(x[:256]).float(), sur.logits(x[:256]).float().cpu()
        out = {"max_logit_diff": float((a - b).abs().max()), "agreement": agreement(self.clf, sur, x)}
        self.info["surrogate_check"] = out
        return out


# ----------------------------------------------------------------------------- format sniffing
def sniff(data: bytes, path: Path) -> str:
    """The format of ``data`` from its content (the suffix only breaks the tie for ONNX, which
    has no magic number); one-line error for anything else."""
    check(len(data) > 0, f"{path}: the file is empty")
    if data[:4] == b"PK\x03\x04":
        return "zip"
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        return "pickle"
    if len(data) >= 10:
        (n,) = struct.unpack("<Q", data[:8])
        if 2 <= n <= len(data) - 8 and data[8:9] == b"{":
            return "safetensors"
    if path.suffix.lower() == ".onnx" or data[:1] == b"\x08":  # ModelProto starts with ir_version (field 1)
        return "onnx"
    raise BackdoorLabError(f"{path}: unknown model format (expected ONNX, safetensors or a PyTorch state dict)")


def pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle would import, read from its opcodes without
    executing anything (``GLOBAL``, and ``STACK_GLOBAL`` with the two strings pushed before it)."""
    out: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                out.append(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name in ("MEMOIZE",) and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int) and arg in memo:
                strings.append(memo[arg])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                out.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - a truncated pickle: torch.load reports it below
        pass
    return out


def _unsafe_globals(names: list[str]) -> list[str]:
    bad = []
    for g in names:
        ok = g.startswith(_TENSOR_GLOBALS) and not g.startswith(_UNSAFE_TORCH)
        if not ok and g not in bad:
            bad.append(g)
    return bad


def _refuse_pickle(path: Path, bad: list[str]) -> None:
    module = [g for g in bad if g.startswith("torch.nn.modules") or g.startswith("backdoorlab.")]
    what = "a pickled model object" if module else "a pickle that runs code when loaded"
    raise BackdoorLabError(f"{path}: refused: {what} (it imports {', '.join(bad[:3])}); nothing in it was run; "
                           f"{CONVERT}")


def _zip_members(data: bytes, path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise BackdoorLabError(f"{path}: corrupt or truncated PyTorch checkpoint ({exc})") from None


def _read_state_dict(data: bytes, path: Path, kind: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``torch.save`` file, via ``torch.load(weights_only=True)``."""
    import pickle

    if kind == "zip":
        names = _zip_members(data, path)
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise BackdoorLabError(f"{path}: refused: a TorchScript archive (loading it runs its TorchScript "
                                   f"code); {CONVERT}")
        pkl = [n for n in names if n.endswith("data.pkl")]
        check(len(pkl) == 1, f"{path}: a zip file but not a PyTorch checkpoint (no single data.pkl)")
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            bad = _unsafe_globals(pickle_globals(zf.read(pkl[0])))
    else:
        bad = _unsafe_globals(pickle_globals(data))
    if bad:
        _refuse_pickle(path, bad)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused by the weights-only unpickler"
        raise BackdoorLabError(f"{path}: refused: {first[:200]}; nothing in it was run; {CONVERT}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
        raise BackdoorLabError(f"{path}: corrupt or truncated PyTorch checkpoint "
                               f"({' '.join(str(exc).split())[:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} checkpoint
    check(isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()),
          f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel's prefix


def _read_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        sd = load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise BackdoorLabError(f"{path}: corrupt or truncated safetensors file ({' '.join(str(exc).split())[:160]})"
                               ) from None
    check(len(sd) > 0, f"{path}: the safetensors file holds no tensors")
    return sd


# ----------------------------------------------------------------------------- architectures
def _arch_spec(arch: str | dict | None, path: Path) -> dict[str, Any]:
    from ..models import MODELS
    from ..registry import split_spec

    check(arch is not None, f"{path}: a state dict holds weights only; name its architecture with --arch "
                            f"({', '.join(MODELS.names())})")
    if isinstance(arch, str) and arch.strip()[:1] in ("{", '"', "'"):  # a spec, or a quoted name
        import yaml

        try:
            arch = yaml.safe_load(arch)
        except yaml.YAMLError as exc:
            raise BackdoorLabError(f"--arch: not a valid spec ({' '.join(str(exc).split())[:120]})") from None
    name, params = split_spec(arch)
    check(name in MODELS.names(), f"--arch: unknown architecture {name!r} (registered: {', '.join(MODELS.names())})")
    MODELS.check_params(name, params)
    return {"name": name, **params}


def _classes_and_channels(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Output classes (the ``head`` layer's rows, else the last linear weight's) and input
    channels (the model's ``normalize`` buffer, else the first convolution's) of a state dict
    (whose key order a file format may change: safetensors sorts them)."""
    lin = [k for k, v in sd.items() if k.endswith("weight") and v.ndim == 2]
    conv = [k for k, v in sd.items() if k.endswith("weight") and v.ndim == 4]
    head = "head.weight" if "head.weight" in sd else (lin[-1] if lin else None)
    if "normalize.mean" in sd:
        ch = sd["normalize.mean"].numel()
    else:
        ch = min((int(sd[k].shape[1]) for k in conv), default=0)
    return (int(sd[head].shape[0]) if head else 0), int(ch)


def _model_from_state(sd: dict[str, torch.Tensor], arch: str | dict | None, path: Path) -> nn.Module:
    """Build ``arch`` with the class count and input channels the tensors imply, then load
    ``sd`` strictly; a state dict that does not fit gives one line naming the first mismatch."""
    from ..models import build_model

    spec = _arch_spec(arch, path)
    num_classes, in_ch = _classes_and_channels(sd)
    check(num_classes > 0 and in_ch > 0, f"{path}: does not fit --arch {spec['name']}: no convolution or "
                                         "linear weights")
    model = build_model(spec, num_classes, in_ch, (0.5,) * in_ch, (0.25,) * in_ch)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or extra or shape:
        what = (f"size of {shape[0]} is {tuple(sd[shape[0]].shape)}, {spec['name']} has {tuple(own[shape[0]].shape)}"
                if shape else f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
        raise BackdoorLabError(f"{path}: the state dict does not fit --arch {spec['name']} ({what}; "
                               f"{len(missing)} missing, {len(extra)} unexpected, {len(shape)} of another size)")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


# ----------------------------------------------------------------------------- ONNX
def _onnx_input_shape(graph, path: Path) -> tuple[int, ...]:
    import onnx

    inits = {t.name for t in graph.initializer}
    ins = [i for i in graph.input if i.name not in inits]
    check(len(ins) == 1, f"{path}: the ONNX graph has {len(ins)} inputs; a classifier takes one image batch")
    t = ins[0].type.tensor_type
    check(t.elem_type == onnx.TensorProto.FLOAT, f"{path}: the ONNX input is not float32 "
          f"({onnx.TensorProto.DataType.Name(t.elem_type)}); export the model with float input in [0, 1]")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    check(len(dims) == 4, f"{path}: the ONNX input has rank {len(dims)}; expected (N, C, H, W)")
    check(dims[1] in (-1, 1, 3), f"{path}: the ONNX input is {dims}: expected channels first (N, C, H, W) "
                                 "with 1 or 3 channels")
    return tuple(dims[1:])


class _Logits(nn.Module):
    """The replayed graph's first output (its logits)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out[0] if isinstance(out, tuple) else out


def _load_onnx(data: bytes, path: Path) -> LoadedModel:
    import onnx
    from google.protobuf.message import DecodeError

    from ..compress.ort import OrtClassifier
    from ..compress.surrogate import OnnxQDQModule, qoperator_to_qdq

    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BackdoorLabError(f"{path}: corrupt or truncated ONNX file ({' '.join(str(exc).split())[:120]})") from None
    g = proto.graph
    check(proto.ir_version > 0 and len(g.node) > 0, f"{path}: not an ONNX model (no graph)")
    check(not any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer),
          f"{path}: refused: weights stored as external data files; save the model as one ONNX file")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own ValidationError subclasses
        raise BackdoorLabError(f"{path}: invalid ONNX model ({' '.join(str(exc).split())[:160]})") from None
    shape = _onnx_input_shape(g, path)
    ops = {n.op_type for n in g.node}
    qop = bool(ops & {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "QLinearAdd"})
    qdq = "DequantizeLinear" in ops and not qop
    precision = "int8-qop" if qop else "int8-qdq" if qdq else "fp32"
    try:
        clf = OrtClassifier(data, f"{precision}-onnx")
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise BackdoorLabError(f"{path}: ONNX Runtime cannot run it ({' '.join(str(exc).split())[:160]})") from None
    if all(d > 0 for d in shape):
        clf.input_shape = shape  # type: ignore[assignment]
    out_dims = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    notes: list[str] = []
    try:
        replay = _Logits(OnnxQDQModule(qoperator_to_qdq(proto) if qop else proto).eval())
    except BackdoorLabError as exc:
        replay = None
        notes.append(f"no gradient path ({exc}): black-box scanners only")
    if replay is not None:
        clf.surrogate = TorchClassifier(replay, precision=f"{precision}-onnx/replay", device="cpu",
                                        capabilities=frozenset({Capability.GRAD}), channels_last=False)
        notes.append("gradients from a PyTorch replay of the ONNX graph" +
                     (" (QOperator nodes rewritten as QDQ)" if qop else "") +
                     (" with fake-quant at the file's own scales and zero points" if qdq or qop else ""))
    num_classes = out_dims[-1] if out_dims and out_dims[-1] > 0 else -1
    opset = max((o.version for o in proto.opset_import), default=0)
    return LoadedModel(path, "onnx", precision, clf, num_classes, shape if all(d > 0 for d in shape) else None,
                       notes, {"onnx_ops": sorted(ops), "opset": opset})


# ----------------------------------------------------------------------------- entry point
def load_model(path: str | os.PathLike, arch: str | dict | None = None) -> LoadedModel:
    """Load the model file ``path`` safely (see the module docstring); one-line
    :class:`~backdoorlab.errors.BackdoorLabError` for anything that cannot or must not be loaded."""
    path = Path(path)
    check(path.exists(), f"{path}: no such file")
    check(path.is_file(), f"{path}: not a file")
    size, cap = path.stat().st_size, _max_model_bytes()
    check(size <= cap, f"{path}: {size >> 20} MiB, over the {cap >> 20} MiB limit (set BACKDOORLAB_MAX_MODEL_MB)")
    data = path.read_bytes()
    kind = sniff(data, path)
    if kind == "onnx":
        return _load_onnx(data, path)
    sd = _read_safetensors(data, path) if kind == "safetensors" else _read_state_dict(data, path, kind)
    model = _model_from_state(sd, arch, path)
    clf = TorchClassifier(model, precision="fp32", device="cpu")
    fmt = "safetensors" if kind == "safetensors" else "state-dict"
    in_ch = _classes_and_channels(sd)[1]
    lm = LoadedModel(path, fmt, "fp32", clf, int(model.head.out_features), None,
                     ["gradients from the model itself (PyTorch)"], {"arch": json.dumps(_arch_spec(arch, path))})
    lm.info["in_channels"] = in_ch
    return lm


__all__ = ["CONVERT", "FORMATS", "LoadedModel", "load_model", "pickle_globals", "sniff"]
