"""The compression registry: a config dataclass per compression, a handler per config.

In the manner of torchao's ``quantize_(model, config)`` (a frozen config dataclass dispatched
to a registered handler), every compression is a :class:`CompressionConfig` subclass with a
``validate()`` that checks its values, and a handler
``handler(cfg, model, *, calib, device, artifact) -> Classifier``. Names may be aliases with
fixed parameters (``prune-l1-50`` is ``prune-l1`` with ``sparsity=0.5``).

A spec is a name (``"int8-ort"``), a mapping (``{"name": "int8-ort", "calibration":
"entropy"}``), a ``+``-joined chain (``"prune-l1-50+int8-torch"``) or a list of specs, applied
left to right. Only stages that return a plain float module (``fp32``, ``prune-*``) may feed
another stage.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..classifier import Classifier
from ..config import from_dict
from ..errors import BackdoorLabError, check
from ..registry import Registry, split_spec

Handler = Callable[..., Classifier]
DEFAULT_CALIB_SIZE = 512


@dataclass(frozen=True)
class CompressionConfig:
    """Base of every compression config. ``chainable``: whether the handler's result wraps a
    plain float module another compression can take (pruning does; INT8 artifacts do not)."""

    name: ClassVar[str] = ""
    chainable: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise :class:`BackdoorLabError` (one line) for a bad value."""

    def tag(self) -> str:
        """The precision label of this stage (e.g. ``prune-l1-50``)."""
        return self.name


@dataclass(frozen=True)
class CalibratedConfig(CompressionConfig):
    """A compression that calibrates on the first ``calib_size`` clean images of the defender's
    split (the default 512 follows common PTQ practice; PyTorch's and ONNX Runtime's tutorials use
    a few hundred images)."""

    calib_size: int = DEFAULT_CALIB_SIZE

    def validate(self) -> None:
        check(isinstance(self.calib_size, int) and not isinstance(self.calib_size, bool) and self.calib_size > 0,
              f"{self.name}: calib_size must be a positive integer, got {self.calib_size!r}")


@dataclass(frozen=True)
class _Entry:
    config: type[CompressionConfig]
    handler: Handler
    fixed: Mapping[str, Any]


class CompressionRegistry(Registry[Classifier]):
    """A :class:`~backdoorlab.registry.Registry` whose entries are (config class, handler)
    pairs; :meth:`validate` checks names, parameter names *and* values, and chains."""

    def __init__(self) -> None:
        super().__init__("compression")
        self._specs: dict[str, _Entry] = {}

    def add(self, name: str, config: type[CompressionConfig], handler: Handler, **fixed: Any) -> None:
        """Register ``name`` for ``config`` handled by ``handler``; ``fixed`` pins parameters."""
        self._specs[name] = _Entry(config, handler, dict(fixed))
        self.register(name)(handler)

    def check_params(self, name: str, params: Mapping[str, Any]) -> None:
        entry = self._entry(name)
        allowed = [f.name for f in dataclasses.fields(entry.config) if f.name not in entry.fixed]
        for key in params:
            if key in entry.fixed:
                base = entry.config.name
                hint = f"; use {base!r} to set it" if base in self._specs and base != name else ""
                raise BackdoorLabError(f"compression {name!r} fixes {key}={entry.fixed[key]!r}{hint}")
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = f" (it takes: {', '.join(allowed)})" if allowed and not close else ""
                raise BackdoorLabError(f"compression {name!r} has no parameter {key!r}{hint}{known}")

    def _entry(self, name: str) -> _Entry:
        self.get(name)  # unknown name -> one line with did-you-mean
        return self._specs[name]

    def config(self, spec: str | Mapping[str, Any]) -> CompressionConfig:
        """The validated config of one stage."""
        name, params = split_spec(spec)
        self.check_params(name, params)
        entry = self._entry(name)
        cfg = from_dict(entry.config, {**entry.fixed, **params}, what=f"compression {name!r}")
        cfg.validate()
        return cfg

    def stages(self, spec: Any) -> list[tuple[CompressionConfig, Handler]]:
        """Split a (possibly chained) spec into validated ``(config, handler)`` stages."""
        parts = parse_chain(spec)
        out = []
        for part in parts:
            name, _ = split_spec(part)
            out.append((self.config(part), self._entry(name).handler))
        for cfg, _ in out[:-1]:
            check(cfg.chainable, f"compression {cfg.tag()!r} produces a deployed artifact and must be the last "
                                 f"step of a chain (only {', '.join(chainable_names(self))} can come first)")
        return out

    def validate(self, spec: Any) -> None:
        """Check names, parameter names, parameter values and chaining of ``spec`` (no work)."""
        self.stages(spec)

    def build(self, spec: Any, **extra: Any) -> Classifier:  # type: ignore[override]
        from . import compress

        return compress(spec, **extra)


def chainable_names(reg: CompressionRegistry) -> list[str]:
    return sorted(n for n, e in reg._specs.items() if e.config.chainable and not e.fixed)


def parse_chain(spec: Any) -> list[str | Mapping[str, Any]]:
    """``"a+b"`` or ``[a, b]`` -> ``[a, b]``; a single spec -> ``[spec]``."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split("+")]
        check(all(parts), f"compression {spec!r} has an empty step")
        return parts  # type: ignore[return-value]
    if isinstance(spec, Mapping):
        name, params = split_spec(spec)
        if "+" in name:
            check(not params, f"compression {name!r} chains several steps; give parameters per step as a list "
                              f"of specs, e.g. [{{name: prune-l1, sparsity: 0.5}}, int8-torch]")
            return parse_chain(name)
        return [spec]
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        check(len(spec) > 0, "a compression chain must have at least one step")
        out: list[str | Mapping[str, Any]] = []
        for s in spec:
            check(isinstance(s, (str, Mapping)), f"a compression step must be a name or a mapping, got {s!r}")
            out.extend(parse_chain(s))
        return out
    raise BackdoorLabError(f"a compression spec must be a name, a mapping or a list, got {spec!r}")


class DualOutput(nn.Module):
    """Wraps a module returning ``(logits, features)`` as an ``ImageClassifier``-like module:
    ``forward(x)`` -> logits ``(N, K)``, ``forward_features(x)`` -> features ``(N, D)``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, x):
        return self.inner(x)[0]

    def forward_features(self, x):
        return self.inner(x)[1]


class LogitsAndFeatures(nn.Module):
    """``ImageClassifier`` -> module returning ``(logits, penultimate features)``, so exported and
    quantized graphs keep FEATURES (one graph, two outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        f = self.model.forward_features(x)
        return self.model.head(f), f
