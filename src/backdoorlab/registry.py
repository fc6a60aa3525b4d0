"""A small typed registry: ``register(name)``, ``get(name)`` with did-you-mean, ``build(spec)``.

Modelled on timm's ``list_models`` / ``create_model`` pattern. A *spec* is a name, or a mapping
``{"name": ..., **params}``; :meth:`Registry.build` calls the registered factory with the params.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from .errors import BackdoorLabError

T = TypeVar("T")


def split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return ``(name, params)`` for a spec given as ``"name"`` or ``{"name": ..., ...}``."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise BackdoorLabError(f"spec {dict(spec)!r} has no 'name' key")
        params = {k: v for k, v in spec.items() if k != "name"}
        return str(spec["name"]), params
    raise BackdoorLabError(f"a spec must be a name or a mapping with 'name', got {spec!r}")


@functools.cache
def config_class(fn: Callable[..., Any]) -> type:
    """The config dataclass of a registered method: one frozen field per keyword parameter of
    ``fn`` (a factory, or a class's ``__init__``) that has a default, with the parameter's
    annotation and default (the paper's hyperparameters, house rule 7). Parameters without a
    default are the ones the runner injects (``info``, ``num_classes`` ...), and ``**kwargs``
    pass through unchecked. Generated from the signature, so a method's settings are written
    once, in its signature, and every method gets a validated config for free."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    fields = []
    for p in inspect.signature(target).parameters.values():
        if p.name == "self" or p.default is p.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = p.default
        if isinstance(default, (list, dict, set)):  # a mutable default: a factory, as dataclasses require
            default = dataclasses.field(default_factory=functools.partial(type(default), default))
        else:
            default = dataclasses.field(default=default)
        ann = p.annotation if p.annotation is not p.empty else Any
        fields.append((p.name, ann, default))
    name = f"{getattr(fn, '__name__', 'Method')}Config"
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = getattr(target, "__module__", __name__)  # string annotations resolve in fn's module
    return cls


class Registry(Generic[T]):
    """Maps names to factories returning ``T``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BackdoorLabError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})"
            ) from None

    def check_params(self, name: str, params: Mapping[str, Any]) -> None:
        """Raise a one-line error for parameters the factory does not take."""
        fn = self.get(name)
        sig = inspect.signature(fn)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return
        for key in params:
            if key not in sig.parameters:
                close = difflib.get_close_matches(key, list(sig.parameters), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise BackdoorLabError(f"{self.kind} {name!r} has no parameter {key!r}{hint}")

    def validate(self, spec: str | Mapping[str, Any]) -> None:
        """Check that ``spec`` names a registered entry and passes only parameters it takes."""
        name, params = split_spec(spec)
        self.check_params(name, params)

    def config(self, spec: str | Mapping[str, Any]) -> Any:
        """The validated config dataclass of ``spec`` (:func:`config_class`): every parameter with
        its value or default, each type-checked against the method's annotation (one line naming
        the parameter otherwise)."""
        from .config import from_dict

        name, params = split_spec(spec)
        self.check_params(name, params)
        cls = config_class(self.get(name))
        known = {f.name for f in dataclasses.fields(cls)}
        return from_dict(cls, {k: v for k, v in params.items() if k in known}, what=f"{self.kind} {name!r}")

    def build(self, spec: str | Mapping[str, Any], **extra: Any) -> T:
        """Build ``spec`` with ``extra`` (injected by the runner). Names and types of the spec's
        parameters are a user's mistake (one line); a ``TypeError`` raised *inside* the method is
        a bug and keeps its traceback (house rule 9)."""
        name, params = split_spec(spec)
        self.config(spec)
        fn = self.get(name)
        try:
            inspect.signature(fn).bind(**params, **extra)
        except TypeError as exc:
            raise BackdoorLabError(f"{self.kind} {name!r}: {exc}") from None
        return fn(**params, **extra)
