"""Frozen config dataclasses, ``to_dict`` / ``from_dict`` and stable content hashing.

Cache keys are ``sha256`` over a canonical JSON encoding (sorted keys, no whitespace), so the
same config yields the same key on every machine and Python version.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import numbers
import sys
import types
from collections import abc
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import BackdoorLabError

C = TypeVar("C")


OMIT_DEFAULT = {"omit_default": True}
"""``dataclasses.field(metadata=OMIT_DEFAULT)``: a setting added after configs were first hashed.
It enters ``to_dict`` (and so every cache key, run id and stored config) only when it differs
from its default, so adding it changes no existing key: cached artifacts stay valid and a
resumed study finds its finished rows."""


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return obj  # keep floats as floats; json writes 1.0
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a dataclass (nested dataclasses included)."""
    out = _plain(cfg)
    if not isinstance(out, dict):
        raise TypeError(f"to_dict expects a dataclass or mapping, got {type(cfg).__name__}")
    return out


def from_dict(cls: type[C], data: Mapping[str, Any], what: str | None = None) -> C:
    """Build dataclass ``cls`` from ``data``; an unknown key or a value of the wrong type (checked
    against the field's annotation, see :func:`check_value`) raises a one-line error naming the field.
    Values are kept as given (an int for a float field stays an int), so ``to_dict`` and cache keys
    are what they were before the check existed."""
    label = what or cls.__name__
    _check_mapping(cls, data, label)
    try:
        return cls(**data)  # type: ignore[call-arg]
    except TypeError as exc:
        raise BackdoorLabError(f"{label}: {exc}") from None


# --------------------------------------------------------------------------- type checks
_SEQUENCES = (list, tuple, abc.Sequence, abc.MutableSequence)  # what get_origin() gives
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def _resolve(annotations: Mapping[str, Any], module: str | None) -> dict[str, Any]:
    """Evaluate string annotations one by one in ``module``'s namespace; one that cannot be
    evaluated (a name imported only under ``TYPE_CHECKING``) is left out, i.e. not checked."""
    ns = dict(vars(sys.modules[module])) if module in sys.modules else {}
    out: dict[str, Any] = {}
    for name, hint in annotations.items():
        if isinstance(hint, str):
            try:
                hint = eval(hint, ns)  # noqa: S307 - our own source's annotations, never user data
            except (NameError, AttributeError, SyntaxError, TypeError):
                continue
        out[name] = hint
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls`` (modules here use
    ``from __future__ import annotations``, so annotations are strings until resolved)."""
    try:
        hints = get_type_hints(cls)
    except (NameError, AttributeError, TypeError):
        hints = {}
        for klass in reversed(cls.__mro__):
            hints.update(_resolve(getattr(klass, "__annotations__", {}), klass.__module__))
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}  # type: ignore[arg-type]


@functools.cache
def param_types(fn: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotation of every parameter of function ``fn``."""
    try:
        return {k: v for k, v in get_type_hints(fn).items() if k != "return"}
    except (NameError, AttributeError, TypeError):
        raw = {k: p.annotation for k, p in inspect.signature(fn).parameters.items()
               if p.annotation is not inspect.Parameter.empty}
        return _resolve(raw, getattr(fn, "__module__", None))


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from YAML) fits annotation ``hint``; kinds not handled here pass."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:  # an int is a number too (and is kept as given)
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return True
        if not isinstance(value, Mapping) or not set(value) <= {f.name for f in dataclasses.fields(hint)}:
            return False
        return all(_fits(v, field_types(hint).get(k, Any)) for k, v in value.items())
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    if origin in _MAPPINGS:
        if not isinstance(value, Mapping):
            return False
        k_hint, v_hint = args if len(args) == 2 else (Any, Any)
        return all(_fits(k, k_hint) and _fits(v, v_hint) for k, v in value.items())
    if hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if hint in (dict,):
        return isinstance(value, Mapping)
    return True  # an annotation kind not checked here (a class, a TypeVar, a callable ...)


def _describe(hint: Any) -> str:
    """What a value of ``hint`` is, in a user's words (``an integer or null``)."""
    if hint is None or hint is type(None):
        return "null"
    simple = {bool: "true or false", int: "an integer", float: "a number (float)", str: "a string"}
    if hint in simple:
        return simple[hint]
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return "a mapping of settings (" + ", ".join(f.name for f in dataclasses.fields(hint)) + ")"
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        parts = ["true, false" if a is bool else _describe(a) for a in args if a is not type(None)]
        parts = list(dict.fromkeys(parts + (["null"] if type(None) in args else [])))
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in _SEQUENCES or hint in (list, tuple):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(set(args)) == 1:
                return f"a list of {len(args)} items, each {_describe(args[0])}"
            return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
        return f"a list (each item {_describe(args[0])})" if args and args[0] is not Any else "a list"
    if origin in _MAPPINGS or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def check_value(value: Any, hint: Any, label: str) -> None:
    """Raise ``"{label} must be <what hint means>, got <value>"`` unless ``value`` fits ``hint``.

    Handles ``int``, ``float`` (an int fits; a bool fits neither), ``bool``, ``str``, ``X | None``,
    ``Literal[...]``, ``list[X]`` / ``tuple[X, ...]`` / ``Sequence[X]`` (a list or tuple, item by
    item), fixed ``tuple[X, Y]`` (that many items), ``dict[K, V]`` and nested config dataclasses
    (given as mappings); any other annotation is not checked."""
    if not _fits(value, hint):
        raise BackdoorLabError(f"{label} must be {_describe(hint)}, got {_short(value)}")


def _check_mapping(cls: type, data: Mapping[str, Any], label: str) -> None:
    """Unknown keys (with did-you-mean) and wrongly typed values of ``data`` for dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BackdoorLabError(f"{label} has no setting {unknown[0]!r}{hint}")
    hints = field_types(cls)
    for key, value in data.items():
        hint = hints.get(key, Any)
        if dataclasses.is_dataclass(hint) and isinstance(hint, type) and isinstance(value, Mapping):
            _check_mapping(hint, value, f"{label} {key}")  # names the nested field that is wrong
        else:
            check_value(value, hint, f"{label} {key}")


def check_fields(cfg: Any, what: str) -> None:
    """Type-check every field of config dataclass instance ``cfg`` against its annotation (for
    configs built in Python rather than read with :func:`from_dict`); errors read
    ``"{what} {field} must be ..."``."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.name in hints:
            check_value(getattr(cfg, f.name), hints[f.name], f"{what} {f.name}")


def check_params(fn: Callable[..., Any], params: Mapping[str, Any], what: str) -> None:
    """Type-check keyword ``params`` for function ``fn`` against its parameter annotations;
    errors read ``"{what} {param} must be ..."``. Parameters ``fn`` does not take are skipped
    (the registry reports those)."""
    hints = param_types(fn)
    for key, value in params.items():
        if key in hints:
            check_value(value, hints[key], f"{what} {key}")


def canonical_json(obj: Any) -> str:
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Content hash of any JSON-able parts (dataclasses included), ``length`` hex digits."""
    h = hashlib.sha256()
    for p in parts:
        h.update(canonical_json(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]
