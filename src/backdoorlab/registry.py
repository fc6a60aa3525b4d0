"""A small typed registry: ``register(name)``, ``get(name)`` with did-you-mean, ``build(spec)``.

Modelled on timm's ``list_models`` / ``create_model`` pattern. A *spec* is a name, or a mapping
``{"name": ..., **params}``; :meth:`Registry.build` calls the registered factory with the params.
"""

from __future__ import annotations

import difflib
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

    def build(self, spec: str | Mapping[str, Any], **extra: Any) -> T:
        name, params = split_spec(spec)
        self.check_params(name, params)
        try:
            return self.get(name)(**params, **extra)
        except TypeError as exc:  # wrong argument types surface as one line
            raise BackdoorLabError(f"{self.kind} {name!r}: {exc}") from None
