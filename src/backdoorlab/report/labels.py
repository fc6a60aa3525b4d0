"""Short labels of specs for tables, and the full settings they stand for.

A row's axis labels are whole specs (``gtsrb(test_limit=2000,train_limit=6000)``,
``neural-cleanse(batch_size=4,batches_per_step=1,steps=100)``); printed in every cell of a table
they crush it. Tables print a short label instead and list the full settings once:

* a dataset keeps its name and its training-set size: ``gtsrb[6k]``;
* any other spec keeps its name (each part of a ``+`` chain: ``prune-l1-50+int8-torch``);
* when two different specs of one table share a short label, they are told apart minimally:
  by the parameters in which they differ (``badnets(target=0)``, ``badnets(target=3)``) when
  that stays short, else by a numbered suffix (``neural-cleanse#1``, ``neural-cleanse#2``) that
  the settings list resolves.

``results --wide`` and ``export`` keep the full specs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..bench.store import Row

AXES = ("dataset", "model", "attack", "compression", "defense")
MAX_DISAMBIGUATED = 24  # longest label "name(differing=params)" before numbering takes over


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets, braces and parentheses."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_label(label: str) -> tuple[str, dict[str, str]]:
    """``badnets(rate=0.1,target=3)`` -> ``("badnets", {"rate": "0.1", "target": "3"})``; a label
    without parameters (or a ``+`` chain) gives ``(label, {})``."""
    if "+" in label and len(_split_top(label, "+")) > 1:
        return label, {}
    if not label.endswith(")") or "(" not in label:
        return label, {}
    name, inner = label.split("(", 1)
    params = {}
    for part in _split_top(inner[:-1], ","):
        k, sep, v = part.partition("=")
        if sep:
            params[k] = v
    return name, params


def _count(v: str) -> str:
    """``6000`` -> ``6k``, ``2500`` -> ``2.5k``, ``50000`` -> ``50k``, ``1234`` -> ``1234``."""
    try:
        n = int(v)
    except ValueError:
        return v
    for unit, size in (("M", 1_000_000), ("k", 1000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def short_label(axis: str, label: str) -> str:
    """The short form of one axis label (see the module docstring)."""
    parts = _split_top(label, "+")
    if len(parts) > 1:
        return "+".join(short_label(axis, p) for p in parts)
    name, params = parse_label(label)
    if axis == "dataset" and "train_limit" in params:
        return f"{name}[{_count(params['train_limit'])}]"
    return name


def _disambiguate(axis: str, short: str, keys: list[str]) -> dict[str, str]:
    """Labels for ``keys`` (different specs sharing ``short``): the differing parameters, or numbers."""
    parsed = {k: parse_label(k)[1] for k in keys}
    names = set()
    for k in keys:
        parts = _split_top(k, "+")
        names.add(parse_label(k)[0] if len(parts) == 1 else None)
    if None not in names:
        all_keys = sorted({p for ps in parsed.values() for p in ps})
        if axis == "dataset":
            all_keys = [p for p in all_keys if p != "train_limit"]  # already in the short label
        differ = [p for p in all_keys if len({parsed[k].get(p) for k in keys}) > 1]
        cand = {k: short + (f"({','.join(f'{p}={parsed[k][p]}' for p in differ if p in parsed[k])})"
                            if any(p in parsed[k] for p in differ) else "") for k in keys}
        if len(set(cand.values())) == len(keys) and max(map(len, cand.values())) <= MAX_DISAMBIGUATED:
            return cand
    return {k: f"{short}#{i}" for i, k in enumerate(sorted(keys), 1)}


@dataclass
class Labels:
    """Short labels of one table (or report) and the full specs each stands for.

    ``key`` is the label a table groups by (for the report's attacks, the pooled label without
    ``target=``); ``specs`` holds the row labels behind each key (all targets of a pooled attack).
    """

    short: dict[tuple[str, str], str] = field(default_factory=dict)
    specs: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    studies: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def __call__(self, axis: str, key: str) -> str:
        return self.short.get((axis, key), key)

    def settings(self, study: str | None = None) -> list[tuple[str, str, str]]:
        """``(axis, short label, full spec(s) joined by "; ")`` for every label that is not the whole
        spec, in axis order (only those of ``study`` when given)."""
        out = []
        for axis in AXES:
            for (ax, key), short in sorted(self.short.items(), key=lambda kv: kv[1]):
                if ax != axis or (study is not None and study not in self.studies.get((ax, key), [])):
                    continue
                specs = self.specs.get((ax, key), [key])
                if specs != [short]:
                    out.append((axis, short, "; ".join(specs)))
        return out


def build_labels(rows: Sequence[Row], key: Callable[[str, Row], str] | None = None) -> Labels:
    """Short labels for the axis labels of ``rows``, unique within each axis. ``key(axis, row)``
    is what a table groups by (default: the row's own label)."""
    labels = Labels()
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    studies: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        for axis in AXES:
            k = key(axis, r) if key else getattr(r, axis)
            keys[(axis, k)].add(getattr(r, axis))
            studies[(axis, k)].add(r.study)
    by_short: dict[tuple[str, str], list[str]] = defaultdict(list)
    for axis, k in keys:
        by_short[(axis, short_label(axis, k))].append(k)
    for (axis, short), ks in by_short.items():
        names = {ks[0]: short} if len(ks) == 1 else _disambiguate(axis, short, ks)
        for k, s in names.items():
            labels.short[(axis, k)] = s
            labels.specs[(axis, k)] = sorted(keys[(axis, k)])
            labels.studies[(axis, k)] = sorted(studies[(axis, k)])
    return labels


def settings_lines(labels: Labels, wide_hint: str = "") -> list[str]:
    """A plain-text footnote listing the full settings behind the short labels (empty if none)."""
    rows = labels.settings()
    if not rows:
        return []
    from .table import render

    head = "settings (short label = full spec" + (f"; {wide_hint}" if wide_hint else "") + "):"
    return ["", head, *("  " + ln for ln in render(("axis", "label", "full spec"), [list(r) for r in rows])
                        .splitlines())]


def identity() -> Labels:
    """Labels that print every spec whole (``--wide``): no label is shortened."""
    return Labels()


__all__ = ["Labels", "build_labels", "identity", "parse_label", "settings_lines", "short_label"]
