"""Detection rates over seeds and target labels, with their spread, from result rows.

One :class:`Group` per (dataset, model, attack, compression, defense), where the attack label
has its ``target=`` parameter removed so that runs with different target labels pool (the
question is "does the defense find *a* BadNets backdoor at int8", not "target 3 in
particular"). Per group:

* ``n_runs``: rows with ``status == "ok"``; ``n_errors``: rows that failed (listed separately
  with their message and **never** counted as "not detected"); ``n_na``: ok rows whose
  ``detected`` is ``None`` (the method makes no verdict there, e.g. a remover on a clean model).
* ``rate``: ``n_detected / (n_runs - n_na)`` with a **Wilson score 95% interval**
  ``(rate_low, rate_high)`` (binomial; sound for a handful of seeds, where a normal std is
  not). On clean models (attack ``none``) the rate is the **false-positive rate**. Groups
  without a detector (defense ``none``) have **no** rate (``None``): nothing ran that could
  detect, so they are neither "detected" nor "not detected" (``has_detector`` is false).
* ``score``, ``asr``, ``ca``, ``ra``: mean (and sample standard deviation over runs) of
  ``defense_score`` and of the deployed model's ASR, CA and RA; ``asr_after`` / ``ca_after`` /
  ``ra_after`` for removers; ``target_share``: for methods that name labels (scanners, filters),
  the share of runs whose flagged labels include the true target (over runs where that is defined).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..bench.store import Row

AXES = ("dataset", "model", "attack", "compression", "defense")
Z95 = 1.959963984540054
_TARGET = re.compile(r"(?<=[(,])target=[^,()]*(,|(?=\)))")


def pooled_attack(label: str) -> str:
    """``badnets(rate=0.1,target=3)`` -> ``badnets(rate=0.1)``; ``badnets(target=3)`` -> ``badnets``."""
    out = _TARGET.sub("", label).replace(",)", ")").replace("()", "")
    return out


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``(nan, nan)`` when ``n == 0``)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


@dataclass
class Stat:
    """Mean and sample standard deviation of the numeric values of one metric (``n`` of them)."""

    mean: float | None = None
    std: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        vals = [v for v in (_num(x) for x in values) if v is not None]
        if not vals:
            return cls()
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


@dataclass
class Group:
    """Aggregate of the rows of one (dataset, model, attack, compression, defense)."""

    dataset: str
    model: str
    attack: str
    compression: str
    defense: str
    kind: str | None = None
    n_runs: int = 0
    n_errors: int = 0
    n_na: int = 0
    n_detected: int = 0
    rate: float | None = None
    rate_low: float | None = None
    rate_high: float | None = None
    score: Stat = field(default_factory=Stat)
    asr: Stat = field(default_factory=Stat)
    ca: Stat = field(default_factory=Stat)
    ra: Stat = field(default_factory=Stat)
    asr_after: Stat = field(default_factory=Stat)
    ca_after: Stat = field(default_factory=Stat)
    ra_after: Stat = field(default_factory=Stat)
    target_share: float | None = None
    n_target: int = 0
    seeds: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.dataset, self.model, self.attack, self.compression, self.defense)

    @property
    def clean_model(self) -> bool:
        return self.attack == "none"

    @property
    def n_verdicts(self) -> int:
        return self.n_runs - self.n_na

    @property
    def has_detector(self) -> bool:
        """False for defense ``none``: no method ran, so there is no detection rate to report."""
        return self.defense != "none"


def aggregate(rows: Sequence[Row]) -> list[Group]:
    """Groups of ``rows`` (see the module docstring), sorted by their axes. Rows still
    ``running`` are ignored."""
    buckets: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status not in ("ok", "error"):
            continue
        buckets[(r.dataset, r.model, pooled_attack(r.attack), r.compression, r.defense)].append(r)
    out = []
    for key, rs in sorted(buckets.items()):
        ok = [r for r in rs if r.status == "ok"]
        g = Group(*key)
        g.n_runs, g.n_errors = len(ok), len(rs) - len(ok)
        g.errors = [r.error or "error" for r in rs if r.status != "ok"]
        g.seeds = sorted({r.seed for r in rs})
        kinds = {r.metrics.get("defense_kind") for r in ok} - {None}
        g.kind = kinds.pop() if len(kinds) == 1 else ("none" if key[4] == "none" else None)
        verdicts = [r.metrics.get("detected") for r in ok]
        g.n_na = 0 if key[4] == "none" else sum(v is None for v in verdicts)  # no defense: not a method's n/a
        g.n_detected = sum(v is True for v in verdicts)
        if g.n_verdicts and g.has_detector:  # no detector, no rate: 0/1 would read "not detected"
            g.rate = g.n_detected / g.n_verdicts
            g.rate_low, g.rate_high = wilson(g.n_detected, g.n_verdicts)
        for name in ("asr", "ca", "ra", "asr_after", "ca_after", "ra_after"):
            setattr(g, name, Stat.of(r.metrics.get(name) for r in ok))
        g.score = Stat.of(r.metrics.get("defense_score") for r in ok)
        tf = [r.metrics.get("target_flagged") for r in ok if isinstance(r.metrics.get("target_flagged"), bool)]
        g.n_target = len(tf)
        g.target_share = sum(tf) / len(tf) if tf else None
        out.append(g)
    return out


def false_positive_rates(groups: Sequence[Group]) -> list[Group]:
    """The groups on clean models (attack ``none``) with a defense: their ``rate`` is the FPR."""
    return [g for g in groups if g.clean_model and g.defense != "none"]


def precision_order(values: Iterable[str]) -> list[str]:
    """Precisions in a readable order: ``fp32`` first, then half precision, then the rest sorted."""
    first = ("fp32", "fp32-ort", "fp16", "bf16")
    vals = sorted(set(values))
    return [v for v in first if v in vals] + [v for v in vals if v not in first]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_stat(s: Stat, digits: int = 3) -> str:
    if s.mean is None:
        return "-"
    return _fmt(s.mean, digits) + (f" ± {_fmt(s.std, digits)}" if s.std is not None else "")


def fmt_rate(g: Group) -> str:
    """``0.667 [0.208, 0.939] (2/3)``: rate, Wilson 95% interval, detections/verdicts."""
    if g.rate is None:
        return "-"
    return f"{g.rate:.3f} [{g.rate_low:.3f}, {g.rate_high:.3f}] ({g.n_detected}/{g.n_verdicts})"


DETECTION_HEADER = ("dataset", "model", "attack", "compression", "defense", "runs", "errors", "n/a",
                    "detection rate [Wilson 95%]", "score", "ASR", "CA", "RA", "target share", "ASR after",
                    "CA after", "RA after")
NO_DETECTOR = "\u2014"  # the detection-rate cell of a row without a detector (defense none)


def group_labels(rows: Sequence[Row]):
    """Short labels (:mod:`.labels`) for the groups of ``rows``: attacks keyed by their pooled label."""
    from .labels import build_labels

    return build_labels(rows, key=lambda axis, r: pooled_attack(r.attack) if axis == "attack" else getattr(r, axis))


def detection_cells(g: Group, labels=None) -> list[str]:
    """One row of :data:`DETECTION_HEADER` for ``g``; ``labels(axis, key)`` shortens the axis labels.
    A group without a detector shows :data:`NO_DETECTOR` for its rate and ``-`` for n/a."""
    share = "-" if g.target_share is None else f"{g.target_share:.3f} ({g.n_target})"
    rate = fmt_rate(g) + (" FPR" if g.clean_model and g.rate is not None else "")
    key = [labels(a, k) for a, k in zip(AXES, g.key)] if labels is not None else list(g.key)
    if not g.has_detector:
        rate = NO_DETECTOR
    return [*key, str(g.n_runs), str(g.n_errors), str(g.n_na) if g.has_detector else "-", rate,
            fmt_stat(g.score), fmt_stat(g.asr), fmt_stat(g.ca), fmt_stat(g.ra), share, fmt_stat(g.asr_after),
            fmt_stat(g.ca_after), fmt_stat(g.ra_after)]


def detection_table(rows: Sequence[Row], wide: bool = False) -> str:
    """Plain-text detection table (one line per group with a defense), then failed runs. Axis
    labels are short, with a footnote of the full specs, unless ``wide``."""
    from .labels import identity, settings_lines
    from .table import WIDE_HINT, render

    groups = [g for g in aggregate(rows) if g.has_detector]
    labels = identity() if wide else group_labels([r for r in rows if r.defense != "none"])
    text = "\n".join([render(DETECTION_HEADER, [detection_cells(g, labels) for g in groups]),
                      *settings_lines(labels, WIDE_HINT)])
    errs = [r for r in rows if r.status == "error"]
    if errs:
        text += "\n\nfailed runs (not counted as 'not detected'):\n" + "\n".join(
            f"  {r.dataset} {r.model} {r.attack} {r.compression} {r.defense} seed={r.seed}: {r.error}"
            for r in errs)
    return text


__all__ = ["AXES", "DETECTION_HEADER", "NO_DETECTOR", "Group", "Stat", "aggregate", "detection_cells",
           "detection_table", "false_positive_rates", "fmt_rate", "fmt_stat", "group_labels", "pooled_attack",
           "precision_order", "wilson"]
