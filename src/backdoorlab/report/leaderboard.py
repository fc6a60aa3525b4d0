"""The deployed-precision leaderboard: ``leaderboard.html`` beside the report's ``index.html``.

For each setting (dataset, model) of a result store the page shows:

* **a ranking, "defenses that still work as deployed"** (:func:`ranking`). A (backdoored attack,
  precision) cell is *live* when the deployed model's mean ASR there is at least
  :data:`LIVE_ASR` (a backdoor that compression removed is no miss). A defense's *effectiveness*
  at precision ``p`` is ``E(p) = mean over live attacks of (detection rate - clean FPR)``, the FPR
  being the same defense's detection rate on the clean model (attack ``none``) at the same
  precision (taken as 0 where the defense gives no verdict on clean models, e.g. removers, or no
  clean model was run; marked). ``E`` is in [-1, 1]: 1 = detects every live backdoor and never
  flags a clean model, 0 = no better than its false alarms. Defenses are ranked by
  ``E_deployed = mean over the deployed precisions (every precision but fp32) of E(p)``; the table
  shows ``E(fp32)``, the change ``E_deployed - E(fp32)``, the worst precision and, for removers,
  the mean DER as deployed;
* **heatmaps** (CSS-coloured table cells), one pair per deployed precision: how each attack x
  defense cell moves from FP32 to that precision, as the paired difference over (attack spec,
  seed) of the *shipped ASR* (a remover's ASR after repair, redeployed; otherwise the deployed
  model's ASR) and of the detection verdict (for attack ``none``: of the false-positive verdict).
  Red = worse for the defender (ASR up, detection down, false alarms up), blue = better;
* **one table per precision**, rows = attack x defense, sortable by clicking a column header
  (inline JS): runs and failed runs; CA and ASR of the deployed model; CA / ASR after repair and
  DER (BackdoorBench's defense effectiveness rating, :func:`backdoorlab.metrics.der`, as the
  pipeline stores it) for removers; the detection rate with its Wilson 95% interval and the clean
  model's FPR beside it; and the two deltas against FP32.

Intervals: means over runs carry a **95% Student-t interval** ``mean ± t(0.975, n-1) · s / √n``
(``n=1`` is shown when there is one run: no interval), clipped to the metric's range ([0, 1]; [-1, 1]
for differences); detection rates and FPRs a **Wilson score
95% interval** (:func:`.aggregate.wilson`), as the report's detection tables. Deltas are paired
differences (the same trained model and seed at FP32 and at the precision) with a t-interval over
the pairs. Failed runs are counted apart and never as "not detected".

Everything is inline (CSS, JS, no image files), so the page stands alone; it is written with the
report, atomically (:func:`backdoorlab.report.html.write_report`).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..bench.store import Row
from .aggregate import NO_DETECTOR, Group, aggregate, group_labels, pooled_attack, precision_order
from .labels import Labels

BASELINE = "fp32"
LIVE_ASR = 0.5  # as defenses.evaluate.ASR_BACKDOORED: a model counts as backdoored from this ASR on
CLEAN = "none"


@functools.cache
def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # scikit-learn's dependency

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Est:
    """Mean of ``n`` values with its 95% t-interval, clipped to the metric's range ``bounds``
    (``low``/``high`` are ``None`` when ``n < 2``)."""

    mean: float | None = None
    low: float | None = None
    high: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Iterable[object], bounds: tuple[float, float] = (0.0, 1.0)) -> Est:
        vals = [float(v) for v in values
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
        if not vals:
            return cls()
        m = statistics.fmean(vals)
        if len(vals) == 1:
            return cls(m, None, None, 1)
        half = t_quantile(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
        return cls(m, max(bounds[0], m - half), min(bounds[1], m + half), len(vals))


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def shipped_asr(r: Row) -> float | None:
    """The ASR of what the defender ships: a remover's repaired (and redeployed) model, otherwise
    the deployed model."""
    after = _num(r.metrics.get("asr_after"))
    return after if after is not None else _num(r.metrics.get("asr"))


def row_der(r: Row) -> float | None:
    """A remover row's DER as stored by the pipeline, else from its before/after CA and ASR."""
    d = _num(r.metrics.get("der"))
    if d is not None:
        return d
    vals = [_num(r.metrics.get(k)) for k in ("ca", "ca_after", "asr", "asr_after")]
    if any(v is None for v in vals):
        return None
    from ..metrics import der

    return der(*vals)  # type: ignore[arg-type]


@dataclass
class Cell:
    """One (dataset, model, attack, precision, defense) of the leaderboard."""

    group: Group
    ca: Est = field(default_factory=Est)
    asr: Est = field(default_factory=Est)
    ca_after: Est = field(default_factory=Est)
    asr_after: Est = field(default_factory=Est)
    der: Est = field(default_factory=Est)
    fpr: Group | None = None  # the same defense on the clean model at this precision
    d_asr: Est = field(default_factory=Est)  # shipped ASR here - at fp32, paired by (attack spec, seed)
    d_det: Est = field(default_factory=Est)  # detected here - at fp32 (0/1), paired likewise

    @property
    def attack(self) -> str:
        return self.group.attack

    @property
    def defense(self) -> str:
        return self.group.defense

    @property
    def precision(self) -> str:
        return self.group.compression


@dataclass
class Rank:
    """One defense's line of the ranking (see the module docstring)."""

    defense: str
    kind: str | None
    e_fp32: float | None
    e_deployed: float | None
    worst: tuple[str, float] | None  # (precision, E) of the lowest deployed E
    n_cells: int  # live (attack, deployed precision) cells averaged
    n_failed: int  # failed runs of this defense at the deployed precisions
    der_deployed: float | None  # mean DER over live deployed cells (removers)
    fpr_assumed: bool  # some FPR taken as 0 (no verdict on clean models, or no clean model)

    @property
    def change(self) -> float | None:
        if self.e_fp32 is None or self.e_deployed is None:
            return None
        return self.e_deployed - self.e_fp32


@dataclass
class Setting:
    """The leaderboard of one (dataset, model): cells by precision, deployed precisions, ranking."""

    dataset: str
    model: str
    precisions: list[str]
    cells: dict[str, list[Cell]]
    ranking: list[Rank]

    @property
    def deployed(self) -> list[str]:
        return [p for p in self.precisions if p != BASELINE]

    @property
    def has_baseline(self) -> bool:
        return BASELINE in self.precisions


def _paired(here: Sequence[Row], base: Sequence[Row], value) -> Est:
    """Mean and t-interval of ``value(row here) - value(row at fp32)`` over the (attack spec, seed)
    pairs where both are ok and defined."""
    b = {(r.attack, r.seed): value(r) for r in base if r.status == "ok"}
    diffs = []
    for r in here:
        if r.status != "ok":
            continue
        v, w = value(r), b.get((r.attack, r.seed))
        if v is not None and w is not None:
            diffs.append(float(v) - float(w))
    return Est.of(diffs, bounds=(-1.0, 1.0))


def _detected(r: Row) -> float | None:
    d = r.metrics.get("detected")
    return float(d) if isinstance(d, bool) else None


def settings(rows: Sequence[Row]) -> list[Setting]:
    """The leaderboard of ``rows``, one :class:`Setting` per (dataset, model)."""
    groups = aggregate(rows)
    by_key: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r.status in ("ok", "error"):
            by_key[(r.dataset, r.model, pooled_attack(r.attack), r.compression, r.defense)].append(r)
    gmap = {g.key: g for g in groups}
    out = []
    for ds, model in sorted({(g.dataset, g.model) for g in groups}):
        gs = [g for g in groups if (g.dataset, g.model) == (ds, model)]
        precs = precision_order(g.compression for g in gs)
        cells: dict[str, list[Cell]] = {}
        for p in precs:
            row_cells = []
            for g in (g for g in gs if g.compression == p):
                rs = [r for r in by_key[g.key] if r.status == "ok"]
                c = Cell(g, ca=Est.of(r.metrics.get("ca") for r in rs), asr=Est.of(r.metrics.get("asr") for r in rs),
                         ca_after=Est.of(r.metrics.get("ca_after") for r in rs),
                         asr_after=Est.of(r.metrics.get("asr_after") for r in rs),
                         der=Est.of(row_der(r) for r in rs if r.metrics.get("defense_kind") == "remover"))
                if g.has_detector:
                    c.fpr = gmap.get((ds, model, CLEAN, p, g.defense))
                if p != BASELINE and (ds, model, g.attack, BASELINE, g.defense) in by_key:
                    base = by_key[(ds, model, g.attack, BASELINE, g.defense)]
                    c.d_asr = _paired(by_key[g.key], base, shipped_asr)
                    if g.has_detector:
                        c.d_det = _paired(by_key[g.key], base, _detected)
                row_cells.append(c)
            cells[p] = sorted(row_cells, key=lambda c: (c.attack != CLEAN, c.attack, c.defense))
        out.append(Setting(ds, model, precs, cells, []))
        out[-1].ranking = ranking(out[-1])
    return out


def effectiveness(cells: Sequence[Cell]) -> tuple[float | None, int, bool, float | None]:
    """``(E, live cells, FPR assumed 0, mean DER)`` of one defense at one precision: the mean over
    live backdoored attacks of (detection rate - clean FPR); see the module docstring."""
    vals, ders, assumed = [], [], False
    for c in cells:
        g = c.group
        if g.clean_model or g.rate is None or c.asr.mean is None or c.asr.mean < LIVE_ASR:
            continue
        fpr = c.fpr.rate if c.fpr is not None else None
        if fpr is None:
            fpr, assumed = 0.0, True
        vals.append(g.rate - fpr)
        if c.der.mean is not None:
            ders.append(c.der.mean)
    return (statistics.fmean(vals) if vals else None, len(vals), assumed,
            statistics.fmean(ders) if ders else None)


def ranking(s: Setting) -> list[Rank]:
    """The defenses of ``s`` ranked by effectiveness at the deployed precisions (module docstring):
    highest ``E_deployed`` first, then the smaller loss from FP32, then by name; defenses without
    any live deployed cell last."""
    defenses = sorted({c.defense for cs in s.cells.values() for c in cs if c.group.has_detector})
    out = []
    for d in defenses:
        per: dict[str, tuple] = {p: effectiveness([c for c in s.cells[p] if c.defense == d]) for p in s.precisions}
        dep = [(p, per[p][0]) for p in s.deployed if per[p][0] is not None]
        ders = [per[p][3] for p in s.deployed if per[p][3] is not None]
        kinds = {c.group.kind for cs in s.cells.values() for c in cs if c.defense == d} - {None}
        failed = sum(c.group.n_errors for p in s.deployed for c in s.cells[p] if c.defense == d)
        out.append(Rank(d, kinds.pop() if len(kinds) == 1 else None,
                        per[BASELINE][0] if BASELINE in per else None,
                        statistics.fmean(v for _, v in dep) if dep else None,
                        min(dep, key=lambda pv: pv[1]) if dep else None,
                        sum(per[p][1] for p in s.deployed), failed,
                        statistics.fmean(ders) if ders else None,
                        any(per[p][2] for p in s.precisions if per[p][1])))
    out.sort(key=lambda r: (r.e_deployed is None, -(r.e_deployed or 0.0),
                            -(r.change if r.change is not None else -9.0), r.defense))
    return out


# ------------------------------------------------------------------------------------ page
LB_CSS = """
table.lb td.num small,table.lb-rank td.num small{display:block;color:#555;white-space:nowrap}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
table.heat{font-size:.72em;margin:.3em 1.2em 1em 0;display:inline-table}
table.heat td{text-align:center;min-width:2.6em;padding:.15em .2em}
table.heat th.v{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap;font-weight:normal;
  max-height:11em;vertical-align:bottom}
table.heat td.nodata{color:#bbb;background:#fff}
table.heat caption{caption-side:top;text-align:left;font-weight:bold;padding:.2em 0}
.heatgrid,.heatpair{display:flex;flex-wrap:wrap;align-items:flex-start}.heatpair{margin-right:1.5em}
.legend span{display:inline-block;padding:0 .5em;margin-right:.3em;border:1px solid #ccc}
"""

SORT_SCRIPT = """
(function () {
  function value(td, numeric) {
    if (!td) { return null; }
    if (numeric) {
      var v = td.getAttribute('data-v');
      return (v === null || v === '') ? null : parseFloat(v);
    }
    var t = td.textContent.trim();
    return (t === '' || t === '-' || t === '\\u2014') ? null : t;
  }
  // sort the body rows of `table` by column `col`, 'ascending' or 'descending'; cells without a
  // value go last either way; ties keep their current order
  function sortTable(table, col, dir) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var head = table.tHead.rows[0].cells;
    var numeric = head[col].getAttribute('data-type') === 'num';
    var keyed = rows.map(function (r, i) { return {row: r, i: i, v: value(r.cells[col], numeric)}; });
    keyed.sort(function (a, b) {
      if (a.v === null || b.v === null) {
        return a.v === b.v ? a.i - b.i : (a.v === null ? 1 : -1);
      }
      var c = numeric ? a.v - b.v : a.v.localeCompare(b.v);
      if (c === 0) { return a.i - b.i; }
      return dir === 'descending' ? -c : c;
    });
    keyed.forEach(function (k) { body.appendChild(k.row); });
    Array.prototype.forEach.call(head, function (th, j) {
      if (j === col) { th.setAttribute('aria-sort', dir); } else { th.removeAttribute('aria-sort'); }
    });
  }
  window.leaderboardSort = sortTable;
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.title = (th.getAttribute('data-title') ? th.getAttribute('data-title') + '; ' : '') + 'click to sort';
      th.addEventListener('click', function () {
        var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
        sortTable(table, col, dir);
      });
    });
  });
  // #sort=TABLE_ID:COLUMN:asc|desc[;...] clicks the header as a reader would (once: ascending,
  // twice: descending): a check the tests drive in a headless browser
  window.addEventListener('load', function () {
    var m = /^#sort=(.+)$/.exec(window.location.hash);
    if (!m) { return; }
    var done = [];
    decodeURIComponent(m[1]).split(';').forEach(function (spec) {
      var p = spec.split(':'), table = document.getElementById(p[0]);
      if (!table) { return; }
      var th = table.tHead.rows[0].cells[parseInt(p[1], 10)];
      th.click();
      if (p[2] === 'desc') { th.click(); }
      done.push(p[0] + ':' + p[1] + ':' + th.getAttribute('aria-sort'));
    });
    document.body.setAttribute('data-sorted', done.join(';'));
  });
})();
"""


def _f(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "-"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return "+" + s[1:] if signed and float(s) == 0 else s  # no "-0.000"


def _attrs(**kv: object) -> str:
    from .html import _e

    return "".join(f' data-{k}="{_e(v)}"' for k, v in kv.items() if v is not None)


def _est_td(e: Est, signed: bool = False) -> str:
    """A number cell: the mean, then its t-interval (or ``n=1``) on a second line; ``data-v`` /
    ``data-lo`` / ``data-hi`` / ``data-n`` carry the full-precision values (sorting, tests)."""
    if e.mean is None:
        return '<td class="num">-</td>'
    sub = "n=1" if e.n == 1 else f"[{_f(e.low, signed=signed)}, {_f(e.high, signed=signed)}]"
    lo, hi = (None, None) if e.low is None else (repr(e.low), repr(e.high))
    return (f'<td class="num"{_attrs(v=repr(e.mean), lo=lo, hi=hi, n=e.n)}>'
            f"{_f(e.mean, signed=signed)} <small>{sub}</small></td>")


def _rate_td(g: Group | None, fpr: bool = False) -> str:
    """A detection-rate cell: rate, then its Wilson interval and detections/verdicts."""
    if g is None or not g.has_detector:
        return f'<td class="nodet" title="no detector ran (defense none)">{NO_DETECTOR}</td>' if g is not None \
            else '<td class="num">-</td>'
    if g.rate is None:
        why = "no verdict (n/a)" if g.n_na else "no run"
        return f'<td class="num" title="{why}">-</td>'
    attrs = _attrs(v=repr(g.rate), lo=repr(g.rate_low), hi=repr(g.rate_high), k=g.n_detected, n=g.n_verdicts)
    return (f'<td class="num"{attrs}>'
            f"{_f(g.rate)} <small>[{_f(g.rate_low)}, {_f(g.rate_high)}] {g.n_detected}/{g.n_verdicts}</small></td>")


def _text_td(text: str, cls: str = "nw") -> str:
    from .html import _e

    return f'<td class="{cls}">{_e(text)}</td>'


def _int_td(n: int) -> str:
    return f'<td class="num" data-v="{n}">{n}</td>'


D_ASR, D_DET = "\u0394 ASR shipped", "\u0394 detection"  # vs fp32, paired by (attack spec, seed)
TABLE_HEADER = ("attack", "defense", "kind", "runs", "failed", "CA", "ASR", "CA after", "ASR after", "DER",
                "detection [Wilson]", "clean FPR [Wilson]", D_ASR, D_DET)
OPTIONAL = ("CA after", "ASR after", "DER", "clean FPR [Wilson]", D_ASR, D_DET)
HEADER_TITLES = {D_ASR: "shipped ASR here minus at fp32, paired by attack spec and seed (95% t-interval)",
                 D_DET: "detection verdict (0/1) here minus at fp32, paired by attack spec and seed (95% t-interval)",
                 "detection [Wilson]": "detected / runs with a verdict (on attack none: the false-positive rate)",
                 "clean FPR [Wilson]": "the same defense on the clean model (attack none) at this precision"}
TEXT_COLUMNS = ("attack", "defense", "kind")


def _precision_table(s: Setting, p: str, labels: Labels, table_id: str) -> str:
    from .html import _e

    rows = []
    for c in s.cells[p]:
        g = c.group
        tds = [_text_td(labels("attack", c.attack)), _text_td(labels("defense", c.defense)),
               _text_td(g.kind or "-"), _int_td(g.n_runs), _int_td(g.n_errors), _est_td(c.ca), _est_td(c.asr),
               _est_td(c.ca_after), _est_td(c.asr_after), _est_td(c.der),
               _rate_td(g), _rate_td(c.fpr) if g.has_detector else _rate_td(None),
               _est_td(c.d_asr, signed=True), _est_td(c.d_det, signed=True)]
        rows.append(tds)
    keep = [i for i, h in enumerate(TABLE_HEADER)
            if h not in OPTIONAL or any(r[i] != '<td class="num">-</td>' for r in rows)]
    head = "".join(f'<th data-type="{"text" if TABLE_HEADER[i] in TEXT_COLUMNS else "num"}"'
                   + (f' data-title="{_e(HEADER_TITLES[TABLE_HEADER[i]])}"' if TABLE_HEADER[i] in HEADER_TITLES else "")
                   + f">{_e(TABLE_HEADER[i])}</th>" for i in keep)
    body = "".join("<tr>" + "".join(r[i] for i in keep) + "</tr>" for r in rows)
    return (f'<table class="lb sortable" id="{_e(table_id)}" data-precision="{_e(p)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _colour(worse: float) -> str:
    """A background for a change of ``worse`` (> 0: worse for the defender, red; < 0: blue)."""
    a = min(1.0, abs(worse)) * 0.85 + (0.08 if worse else 0.0)
    rgb = "214,39,40" if worse > 0 else "31,119,180"
    return f"background:rgba({rgb},{a:.2f});color:{'#fff' if a > 0.55 else '#000'}"


def _heatmap(s: Setting, p: str, what: str, labels: Labels) -> str:
    """Attacks x defenses, one cell per pair: the paired change from fp32 to ``p`` of the shipped
    ASR (``what="asr"``) or of detection (``"det"``)."""
    from .html import _e

    cells = {(c.attack, c.defense): c for c in s.cells[p]}
    attacks = sorted({c.attack for c in s.cells[p]}, key=lambda a: (a != CLEAN, a))
    defenses = sorted({c.defense for c in s.cells[p]} - ({"none"} if what == "det" else set()))
    if what == "det":
        attacks_shown = attacks
        title = f"\u0394 detection, fp32 \u2192 {labels('compression', p)}"
    else:
        attacks_shown = [a for a in attacks if a != CLEAN]
        title = f"\u0394 ASR shipped, fp32 \u2192 {labels('compression', p)}"
    if not attacks_shown or not defenses:
        return ""
    head = "<th></th>" + "".join(f'<th class="v">{_e(labels("defense", d))}</th>' for d in defenses)
    body = []
    for a in attacks_shown:
        name = labels("attack", a) + (" (FPR)" if a == CLEAN else "")
        tds = []
        for d in defenses:
            c = cells.get((a, d))
            e = (c.d_asr if what == "asr" else c.d_det) if c is not None else Est()
            if e.mean is None:
                tds.append('<td class="nodata" title="no pair of runs">\u00b7</td>')
                continue
            worse = e.mean if (what == "asr" or a == CLEAN) else -e.mean
            ci = "n=1" if e.n == 1 else f"95% t-interval [{_f(e.low, signed=True)}, {_f(e.high, signed=True)}], n={e.n}"
            tip = f"{labels('attack', a)} / {labels('defense', d)}: {_f(e.mean, signed=True)} ({ci})"
            tds.append(f'<td style="{_colour(worse)}" title="{_e(tip)}"{_attrs(v=repr(e.mean), n=e.n)}>'
                       f"{_f(e.mean, 2, signed=True)}</td>")
        body.append(f'<tr><th class="nw">{_e(name)}</th>{"".join(tds)}</tr>')
    return (f'<table class="heat" data-what="{what}" data-precision="{_e(p)}"><caption>{_e(title)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _ranking_table(s: Setting, labels: Labels, table_id: str) -> str:
    from .html import _e

    header = ("rank", "defense", "kind", "E deployed", "E fp32", "change", "worst precision", "live cells",
              "failed runs", "DER deployed")
    head = "".join(f'<th data-type="{"text" if h in ("defense", "kind", "worst precision") else "num"}">{_e(h)}</th>'
                   for h in header)
    body = []
    for i, r in enumerate(s.ranking, 1):
        def num(v: float | None, signed: bool = False) -> str:
            return '<td class="num">-</td>' if v is None else \
                f'<td class="num" data-v="{v!r}">{_f(v, signed=signed)}</td>'

        mark = " \u2020" if r.fpr_assumed else ""
        worst = "-" if r.worst is None else f"{labels('compression', r.worst[0])} ({_f(r.worst[1], signed=True)})"
        body.append("<tr>" + _int_td(i) + _text_td(labels("defense", r.defense) + mark) + _text_td(r.kind or "-")
                    + num(r.e_deployed, True) + num(r.e_fp32, True) + num(r.change, True) + _text_td(worst)
                    + _int_td(r.n_cells) + _int_td(r.n_failed) + num(r.der_deployed) + "</tr>")
    return (f'<table class="lb-rank sortable" id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


HOW_TO_READ = """<ul class="note">
<li><b>CA, ASR</b>: the deployed model's, before any defense. <b>CA / ASR after</b>: a remover's repaired
model, deployed again at the row's precision; <b>DER</b>: BackdoorBench's defense effectiveness rating,
(max(0, \u0394ASR) \u2212 max(0, \u0394CA) + 1) / 2, before \u2212 after.</li>
<li>Means over runs (seeds and target labels) with a <b>95% Student-t interval</b>, mean \u00b1
t(0.975, n\u22121)\u00b7s/\u221an, clipped to [0, 1] ([\u22121, 1] for differences); <b>n=1</b>: one run, no
interval.</li>
<li><b>Detection</b>: detected / runs with a verdict, with its <b>Wilson 95% interval</b>; on clean models
(attack <code>none</code>) it is the false-positive rate, shown beside every row as <b>clean FPR</b>.
\u2014: no detector ran (defense <code>none</code>); -: no verdict or no run. Failed runs are counted apart.</li>
<li><b>\u0394 ASR shipped</b>, <b>\u0394 detection</b>: paired differences against FP32 (the same trained model
and seed), of the <b>shipped ASR</b> (a remover's ASR after repair, otherwise the deployed model's) and of
the detection verdict (0/1), with a t-interval over the pairs.</li>
<li>Click a column header to sort (again to reverse); cells without a value stay last.</li>
</ul>"""

RANKING_NOTE = f"""<p class="note"><b>Ranking: defenses that still work as deployed.</b> A (backdoored attack,
precision) cell is <i>live</i> when the deployed model's mean ASR is at least {LIVE_ASR} (a backdoor that
compression removed is no miss). At precision p a defense's effectiveness is <b>E(p) = mean over live
attacks of (detection rate \u2212 clean FPR)</b>, in [\u22121, 1]: 1 detects every live backdoor and never
flags a clean model, 0 is no better than its false alarms. Defenses are ranked by <b>E deployed</b>, the
mean of E(p) over the deployed precisions (all but fp32); <b>change</b> = E deployed \u2212 E(fp32);
<b>worst precision</b>: the lowest E(p). For removers \u201cdetected\u201d means repaired (ASR after &lt; 0.2
on a model with ASR \u2265 0.5), and they give no verdict on clean models: their FPR is taken as 0 (\u2020, as
wherever no clean model was run). <b>DER deployed</b>: a remover's mean DER over its live deployed cells.</p>"""


def build_leaderboard(rows: Sequence[Row], *, title: str = "backdoorlab leaderboard") -> str:
    """The self-contained ``leaderboard.html`` text for ``rows``."""
    import time

    from .html import CHECK_SCRIPT, CSS, _e, _slug, _table

    usable = [r for r in rows if r.status in ("ok", "error")]
    labels = group_labels(usable)
    sets = settings(usable)
    studies = sorted({r.study for r in rows})
    n_ok = sum(r.status == "ok" for r in rows)
    n_err = sum(r.status == "error" for r in rows)
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="note">Studies: {_e(", ".join(studies))}. {len(rows)} runs: {n_ok} ok, {n_err} failed '
             f'(listed in the <a href="index.html">report</a>; never counted as not detected). Generated '
             f"{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
             "<h2>How to read it</h2>", HOW_TO_READ, RANKING_NOTE,
             '<p class="note legend">Heatmaps: <span style="' + _colour(0.6) + '">red</span> worse for the '
             'defender as deployed (shipped ASR up, detection down, false alarms up), <span style="'
             + _colour(-0.6) + '">blue</span> better; \u00b7 no pair of runs. Hover a cell for its interval.</p>']
    settings_rows = [(st, *x) for st in studies for x in labels.settings(st)]
    if settings_rows:
        parts.append("<h2>Settings</h2>")
        parts.append('<p class="note">The short labels the tables print, and the full specs they stand for.</p>')
        parts.append(_table(("study", "axis", "label", "full spec"), [list(x) for x in settings_rows], cls="settings",
                            wrap=("full spec",)))
    for s in sets:
        where = f"{labels('dataset', s.dataset)} / {labels('model', s.model)}"
        parts.append(f"<h2>{_e(where)}</h2>")
        parts.append(f"<h3>Defenses that still work as deployed ({_e(where)})</h3>")
        if not s.has_baseline or not s.deployed:
            has = "no fp32 rows" if not s.has_baseline else "fp32 rows only"
            parts.append(f'<p class="note">No comparison: the store has {has} here; the ranking and the heatmaps '
                         "need FP32 and at least one deployed precision.</p>")
        if s.ranking:
            parts.append(_ranking_table(s, labels, _slug("rank", s.dataset, s.model)))
        if s.has_baseline and s.deployed:
            parts.append(f"<h3>How each cell moves from FP32 ({_e(where)})</h3>")
            pairs = [_heatmap(s, p, "asr", labels) + _heatmap(s, p, "det", labels) for p in s.deployed]
            parts.append('<div class="heatgrid">' + "".join(f'<div class="heatpair">{x}</div>' for x in pairs if x)
                         + "</div>")
        for p in s.precisions:
            short = labels("compression", p)
            parts.append(f"<h3>{_e(where)} at <code>{_e(short)}</code></h3>")
            parts.append(_precision_table(s, p, labels, _slug("lb", s.dataset, s.model, p)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}{LB_CSS}</style></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{CHECK_SCRIPT}</script>\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


__all__ = ["BASELINE", "LIVE_ASR", "Cell", "Est", "Rank", "Setting", "build_leaderboard", "effectiveness", "ranking",
           "settings", "shipped_asr", "t_quantile"]
