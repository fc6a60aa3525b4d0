"""Plain-text tables of result rows, one per cell or aggregated over seeds.

The axis columns print short labels (``gtsrb[6k]``, ``neural-cleanse``) and a footnote lists the
full spec behind each shortened one; ``wide=True`` (``backdoorlab results --wide``) prints the
full specs in the table instead.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

from ..bench.store import Row
from .labels import build_labels, identity, settings_lines

METRICS = ("ca", "asr", "ra")
AXES = ("dataset", "model", "attack", "compression", "defense")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


WIDE_HINT = "`backdoorlab results --wide` prints full specs in the table"


def results_table(rows: Sequence[Row], wide: bool = False) -> str:
    """One line per cell: the axes, seed, status, CA / ASR / RA and wall time (status reads
    ``ok (tta flip)`` when the scores use flip test-time augmentation)."""
    labels = identity() if wide else build_labels(rows)
    header = [*AXES, "seed", "status", "CA", "ASR", "RA", "int8 layers", "wall_s"]
    body = []
    for r in rows:
        status = r.status if r.status != "error" else f"error: {(r.error or '')[:60]}"
        if r.metrics.get("tta", "none") != "none":
            status += f" (tta {r.metrics['tta']})"
        body.append([*(labels(a, getattr(r, a)) for a in AXES), str(r.seed), status,
                     *(_fmt(r.metrics.get(m)) for m in METRICS), _fmt(r.metrics.get("int8_layers")),
                     _fmt(r.wall_time)])
    return "\n".join([render(header, body), *settings_lines(labels, WIDE_HINT)])


def aggregate_table(rows: Sequence[Row], wide: bool = False) -> str:
    """Mean ± standard deviation over seeds of CA / ASR / RA for each (axes) group of ok rows."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status == "ok":
            groups[tuple(getattr(r, a) for a in AXES)].append(r)
    labels = identity() if wide else build_labels([rs[0] for rs in groups.values()])
    header = [*AXES, "seeds", "CA", "ASR", "RA", "int8 layers"]
    body = []
    for key, rs in sorted(groups.items()):
        cells = []
        for m in METRICS:
            vals = [r.metrics[m] for r in rs if isinstance(r.metrics.get(m), (int, float))]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
        body.append([*(labels(a, k) for a, k in zip(AXES, key)), str(len(rs)), *cells,
                     _fmt(rs[0].metrics.get("int8_layers"))])
    return "\n".join([render(header, body), *settings_lines(labels, WIDE_HINT)])
