"""Frozen config dataclasses, ``to_dict`` / ``from_dict`` and stable content hashing.

Cache keys are ``sha256`` over a canonical JSON encoding (sorted keys, no whitespace), so the
same config yields the same key on every machine and Python version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, TypeVar

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
    """Build dataclass ``cls`` from ``data``; unknown keys raise a one-line error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        label = what or cls.__name__
        raise BackdoorLabError(f"{label} has no setting {unknown[0]!r}{hint}")
    try:
        return cls(**data)  # type: ignore[call-arg]
    except TypeError as exc:
        raise BackdoorLabError(f"{what or cls.__name__}: {exc}") from None


def canonical_json(obj: Any) -> str:
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Content hash of any JSON-able parts (dataclasses included), ``length`` hex digits."""
    h = hashlib.sha256()
    for p in parts:
        h.update(canonical_json(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]
