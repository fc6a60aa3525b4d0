"""A self-contained HTML report of a result store: ``backdoorlab report --out DIR``.

``DIR/index.html`` holds, with inline CSS and every figure embedded as a ``data:`` URI (no
external resource, so the file can be mailed or archived on its own):

* a summary (runs, failures), the settings behind the short labels the tables print (the full
  spec of ``gtsrb[6k]``, ``neural-cleanse``, ..., once per study; see :mod:`.labels`) and, per
  precision, the detection table of :mod:`backdoorlab.report.aggregate` (detection rate with its
  Wilson 95% interval, errors and not-applicable runs counted apart, mean score, deployed
  CA / ASR / RA, target share, repair). A row without a detector (defense ``none``) shows a dash
  where the rate would be, and a legend says why: it is never "not detected". Columns that no
  row of a table fills (score, target share, after repair) are left out;
* the false-positive rate of each defense on clean models;
* per dataset and attack, figures of detection rate and of ASR against precision, one line per
  defense (the ASR figure shows the deployed model's ASR, and each remover's ASR after repair
  where the study has removers; captions name what is drawn);
* Neural Cleanse's reversed triggers (``mask * pattern`` per label, from the ``defense`` stage of
  the :class:`~backdoorlab.bench.cache.ArtifactCache`) as image grids, flagged labels framed in
  red and the true target marked;
* every failed run with its message (failures are never counted as "not detected").

Beside it, ``DIR/leaderboard.html`` (:mod:`.leaderboard`): per precision, attacks x defenses tables
(CA, ASR, DER, detection with the clean FPR beside it; sortable), heatmaps of how each cell moves
from FP32 to each deployed precision, and a ranking of the defenses that still work as deployed.
It is written with the report, in the same atomic step, and the index links to it.

Every table fits a 1400 px window: numbers wrap only between their parts (mean | ± std,
rate | interval | counts), labels are short, and long messages wrap anywhere.

The same PNGs are written to ``DIR/figures/``. The report is built in a temporary directory
beside ``DIR`` and renamed into place, so a half-written report never exists. Figures use
matplotlib's Agg canvas directly (no pyplot, no global backend state).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ..bench.store import Row
from ..errors import BackdoorLabError
from .aggregate import (
    DETECTION_HEADER,
    NO_DETECTOR,
    Group,
    aggregate,
    detection_cells,
    false_positive_rates,
    fmt_rate,
    group_labels,
    pooled_attack,
    precision_order,
)
from .labels import Labels

LEADERBOARD = "leaderboard.html"  # written beside index.html
MAX_TRIGGER_GRIDS = 24  # reversed-trigger grids shown (one per row that has them)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.8em;max-width:100%}
th,td{border:1px solid #ccc;padding:.25em .4em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}.nw{white-space:nowrap}
td.wrap{overflow-wrap:anywhere}td.nodet{text-align:center;color:#777}
.err td{color:#a00}.note{color:#555;font-size:.9em}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.85em;color:#444}
img{max-width:100%;border:1px solid #ddd}
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-decoded', String(ok));
  document.body.setAttribute('data-render', ok === imgs.length ? 'ok' : 'broken');
  // layout: does every table fit the window (no horizontal scrollbar)?
  var doc = document.documentElement, widest = 0, over = 0;
  Array.prototype.forEach.call(document.querySelectorAll('table'), function (t) {
    var right = Math.ceil(t.getBoundingClientRect().right);
    t.setAttribute('data-right', String(right));
    widest = Math.max(widest, right);
    if (right > doc.clientWidth || t.scrollWidth > t.parentElement.clientWidth) { over += 1; }
  });
  document.body.setAttribute('data-view-width', String(doc.clientWidth));
  document.body.setAttribute('data-page-width', String(doc.scrollWidth));
  document.body.setAttribute('data-widest-table', String(widest));
  document.body.setAttribute('data-tables-overflowing', String(over));
});
"""


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_")[:120]


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


_PARTS = re.compile(r"\s+(?=[±\[(]|FPR\b)")  # where a number cell may wrap: before ± std, [interval], (k/n)


def _cell(c: str, wrap: bool = False, nowrap: bool = False) -> str:
    if c == NO_DETECTOR:
        return f'<td class="nodet" title="no detector ran (defense none)">{_e(c)}</td>'
    if _looks_numeric(c):
        parts = _PARTS.split(c)
        return '<td class="num">' + " ".join(f'<span class="nw">{_e(p)}</span>' for p in parts) + "</td>"
    cls = " class=wrap" if wrap else " class=nw" if nowrap else ""
    return f"<td{cls}>{_e(c)}</td>"


LABEL_COLUMNS = ("dataset", "model", "attack", "compression", "defense")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", row_cls: str = "",
           wrap: Sequence[str] = (), nowrap: Sequence[str] = LABEL_COLUMNS) -> str:
    """An HTML table: a number cell wraps only between its parts, the ``nowrap`` (short label)
    columns never, the ``wrap`` columns anywhere (long messages and specs), others at spaces."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(_cell(c, h in wrap, h in nowrap) for h, c in zip(header, r))
        body.append(f'<tr{f" class={row_cls}" if row_cls else ""}>{cells}</tr>')
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _looks_numeric(s: str) -> bool:
    return bool(re.match(r"^-?\d", s))


def _drop_empty(header: Sequence[str], rows: list[list[str]], optional: Sequence[str]):
    """``header`` and ``rows`` without the ``optional`` columns that no row fills (all ``-``)."""
    keep = [i for i, h in enumerate(header) if h not in optional or any(r[i] != "-" for r in rows)]
    return [header[i] for i in keep], [[r[i] for i in keep] for r in rows]


# ------------------------------------------------------------------------------------ figures
def _line_figure(title: str, precisions: list[str], lines: dict[str, list[tuple[float | None, float, float]]],
                 ylabel: str) -> bytes:
    """One line per key over ``precisions``; each point ``(y, low, high)`` (error bar) or ``None``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.1 * len(precisions) + 2.5), 3.6))
    ax = fig.add_subplot()
    xs = list(range(len(precisions)))
    for name, pts in sorted(lines.items()):
        px = [x for x, p in zip(xs, pts) if p is not None and p[0] is not None]
        py = [p[0] for p in pts if p is not None and p[0] is not None]
        lo = [p[0] - p[1] for p in pts if p is not None and p[0] is not None]
        hi = [p[2] - p[0] for p in pts if p is not None and p[0] is not None]
        if px:
            ax.errorbar(px, py, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xticks(xs)
    ax.set_xticklabels(precisions, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(precisions) - 0.5)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("precision")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def _names(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _figures(groups: list[Group], labels: Labels | None = None) -> list[tuple[str, str, bytes]]:
    """``(file name, caption, png)`` per (dataset, attack): detection rate and ASR vs precision.
    Captions name what each figure draws (the defenses, the removers); labels are short."""
    lab = labels if labels is not None else Labels()
    out = []
    by: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        by[(g.dataset, g.attack)].append(g)
    for (ds, attack), gs in sorted(by.items()):
        precs = precision_order(g.compression for g in gs)
        models = sorted({g.model for g in gs})
        ds_l, attack_l = lab("dataset", ds), lab("attack", attack)

        def name(g: Group, many: bool = len(models) > 1) -> str:
            return lab("defense", g.defense) + (f" [{lab('model', g.model)}]" if many else "")

        def empty(n: int = len(precs)) -> list:
            return [None] * n

        det: dict[str, list] = defaultdict(empty)
        for g in gs:
            if g.has_detector and g.rate is not None:
                det[name(g)][precs.index(g.compression)] = (g.rate, g.rate_low, g.rate_high)
        if det:
            what = "false-positive rate" if attack == "none" else "detection rate"
            defs = _names(sorted({lab("defense", g.defense) for g in gs if g.has_detector and g.rate is not None}))
            cap = f"{ds_l} / {attack_l}: {what} of {defs} against precision (error bars: Wilson 95% interval)"
            out.append((f"{_slug('detection', ds, attack)}.png", cap,
                        _line_figure(f"{ds_l} — {attack_l}: {what}", precs, det, what)))
        if attack == "none":
            continue
        asr: dict[str, list] = defaultdict(empty)
        deployed: dict[tuple[str, str], list[float]] = defaultdict(list)
        removers = set()
        for g in gs:
            if g.asr.mean is not None:
                deployed[(g.model, g.compression)].extend([g.asr.mean] * max(1, g.asr.n))
            if g.asr_after.mean is not None:
                sd = g.asr_after.std or 0.0
                removers.add(lab("defense", g.defense))
                asr[name(g) + " (after repair)"][precs.index(g.compression)] = (
                    g.asr_after.mean, max(0.0, g.asr_after.mean - sd), min(1.0, g.asr_after.mean + sd))
        for (model, comp), vals in deployed.items():
            key = "deployed model" + (f" [{lab('model', model)}]" if len(models) > 1 else "")
            m = sum(vals) / len(vals)
            asr[key][precs.index(comp)] = (m, m, m)
        if asr:
            if removers:
                cap = (f"{ds_l} / {attack_l}: ASR of the deployed model (mean over runs) and after repair by "
                       f"{_names(sorted(removers))} (error bars: ± std over runs)")
            else:
                cap = f"{ds_l} / {attack_l}: ASR of the deployed model against precision (mean over runs)"
            fig = _line_figure(f"{ds_l} — {attack_l}: ASR", precs, asr, "ASR")
            out.append((f"{_slug('asr', ds, attack)}.png", cap, fig))
    return out


def _trigger_grid(row: Row, images: dict, title: str = "") -> bytes | None:
    """``mask * pattern`` per label as a grid; flagged labels framed red, the true target marked."""
    import torch
    from matplotlib.figure import Figure

    trig = images.get("trigger")
    if trig is None and "mask" in images and "pattern" in images:
        trig = images["mask"].float() * images["pattern"].float()
    if trig is None or not isinstance(trig, torch.Tensor) or trig.ndim != 4 or len(trig) == 0:
        return None
    trig = trig.float().clamp(0, 1)
    k = len(trig)
    flagged = {int(f) for f in row.metrics.get("flagged") or []}
    target = _target_of(row)
    # one image per label (Neural Cleanse), or per optimised arm with its label (K-Arm's arm_labels)
    arm_labels = row.metrics.get("arm_labels")
    per_arm = isinstance(arm_labels, list) and len(arm_labels) == len(trig)
    label_of = list(arm_labels) if per_arm else list(range(len(trig)))
    cols = min(k, 11)
    rows_n = math.ceil(k / cols)
    fig = Figure(figsize=(cols * 0.95, rows_n * 1.1 + 0.3))
    for i in range(k):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        img = trig[i].permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        lab = label_of[i]
        hit = lab in flagged
        for sp in ax.spines.values():
            sp.set_edgecolor("red" if hit else "#bbb")
            sp.set_linewidth(3 if hit else 0.5)
        ax.set_title(f"{lab}{' T' if lab == target else ''}", fontsize=7, color="red" if hit else "black")
    fig.suptitle(title or f"{row.dataset} {row.model} {row.attack} {row.compression} seed {row.seed}", fontsize=8)
    return _png(fig)


def _target_of(row: Row) -> int | None:
    """The attack's all-to-one target: from the row's config, else the attack's default ``target``."""
    import inspect

    from ..attacks import ATTACKS
    from ..registry import split_spec

    if row.attack == "none":
        return None
    spec = row.config.get("attack") if isinstance(row.config, dict) else None
    try:
        name, params = split_spec(spec if spec is not None else row.attack)
        if params.get("mode", "all-to-one") != "all-to-one":
            return None
        if "target" in params:
            return int(params["target"])
        default = inspect.signature(ATTACKS.get(name)).parameters.get("target")
        return int(default.default) if default is not None and isinstance(default.default, int) else None
    except Exception:  # an attack this version no longer knows: no marker, the grid still renders
        return None


# ------------------------------------------------------------------------------------ page
OPTIONAL_COLUMNS = ("score", "target share", "ASR after", "CA after", "RA after")


def build_report(rows: Sequence[Row], *, cache=None, title: str = "backdoorlab report",
                 leaderboard: str | None = None) -> tuple[str, dict[str, bytes]]:
    """``(index.html text, {relative png path: bytes})`` for ``rows``; ``leaderboard``: the relative
    path of the leaderboard page written beside it, which the index then links to."""
    groups = aggregate(rows)
    labels = group_labels([r for r in rows if r.status in ("ok", "error")])
    files: dict[str, bytes] = {}
    parts: list[str] = []

    def img(fname: str, data: bytes, caption: str) -> str:
        files[f"figures/{fname}"] = data
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure><img src="{uri}" alt="{_e(caption)}" data-file="figures/{_e(fname)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>")

    def cell_label(r: Row) -> str:
        return " ".join([*(labels(a, k) for a, k in zip(("dataset", "model", "attack", "compression"),
                                                         (r.dataset, r.model, pooled_attack(r.attack), r.compression))),
                         f"seed {r.seed}"])

    n_ok = sum(r.status == "ok" for r in rows)
    errs = [r for r in rows if r.status == "error"]
    studies = sorted({r.study for r in rows})
    detectors = [g for g in groups if g.has_detector]
    parts.append(f"<h1>{_e(title)}</h1>")
    parts.append(f'<p class="note">Studies: {_e(", ".join(studies))}. {len(rows)} runs: {n_ok} ok, '
                 f"{len(errs)} failed, {len(rows) - n_ok - len(errs)} unfinished. Generated "
                 f"{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>")
    notes = []
    if detectors:
        notes.append("Detection rate = detected / runs with a verdict, over seeds and target labels, with its "
                     "Wilson score 95% interval and the counts. Failed runs are listed apart and never counted as "
                     "not detected; n/a = the method gave no verdict (e.g. a remover on a clean model).")
        if any(g.clean_model for g in detectors):
            notes.append("On clean models (attack <code>none</code>) the rate is the false-positive rate.")
    notes.append(("Score, CA, ASR, RA" if any(g.score.mean is not None for g in groups) else "CA, ASR, RA")
                 + ": mean ± sample std over runs; CA / ASR / RA are the deployed model's, before any repair.")
    if any(g.asr_after.mean is not None for g in groups):
        notes.append("After: the remover's repaired model.")
    if any(g.target_share is not None for g in groups):
        notes.append("Target share: runs whose flagged labels include the true target.")
    parts.append(f'<p class="note">{" ".join(notes)}</p>')
    if leaderboard:
        parts.append(f'<p class="note">The <a href="{_e(leaderboard)}">leaderboard</a> ranks the defenses that still '
                     "work as deployed and shows, per precision, attacks × defenses with intervals over seeds.</p>")

    settings = [(st, *s) for st in studies for s in labels.settings(st)]
    if settings:
        parts.append("<h2>Settings</h2>")
        parts.append('<p class="note">The tables print short labels; these are the full specs they stand for '
                     "(<code>backdoorlab results --wide</code> and <code>backdoorlab export</code> keep them whole). "
                     "Specs that share a short label are told apart by the parameters in which they differ, or by "
                     "a number (#1, #2).</p>")
        parts.append(_table(("study", "axis", "label", "full spec"), [list(s) for s in settings], cls="settings",
                            wrap=("full spec",)))

    parts.append("<h2>Detection by precision</h2>" if detectors else "<h2>Results by precision</h2>")
    models = sorted({g.model for g in groups})
    omit = {"compression"} | ({"model"} if len(models) == 1 else set())  # one table per precision
    if len(models) == 1:
        parts.append(f'<p class="note">Model: <code>{_e(labels("model", models[0]))}</code> in every row.</p>')
    header = [h for h in DETECTION_HEADER if h not in omit]
    for prec in precision_order(g.compression for g in groups):
        gs = [g for g in groups if g.compression == prec]
        body = [[c for h, c in zip(DETECTION_HEADER, detection_cells(g, labels)) if h not in omit] for g in gs]
        head, body = _drop_empty(header, body, OPTIONAL_COLUMNS)
        short = labels("compression", prec)
        parts.append(f"<h3>Precision <code>{_e(short)}</code>" + (f" ({_e(prec)})" if short != prec else "") + "</h3>")
        parts.append(_table(head, body, cls="detection"))
        if any(not g.has_detector for g in gs):
            parts.append(f'<p class="note legend">{NO_DETECTOR} no detector ran on this row (defense '
                         "<code>none</code>): it has no detection rate, neither detected nor missed, and reports the "
                         "model's CA, ASR and RA only.</p>")

    fpr = false_positive_rates(groups)
    if fpr:
        parts.append("<h2>False-positive rate on clean models</h2>")
        parts.append(_table(("dataset", "model", "compression", "defense", "runs", "errors", "FPR [Wilson 95%]"),
                            [[labels("dataset", g.dataset), labels("model", g.model),
                              labels("compression", g.compression), labels("defense", g.defense), str(g.n_runs),
                              str(g.n_errors), fmt_rate(g)]
                             for g in fpr], cls="fpr"))

    figs = _figures(groups, labels)
    if figs:
        parts.append("<h2>Figures</h2>")
        parts += [img(f, data, cap) for f, cap, data in figs]

    grids = []
    if cache is not None:
        for r in rows:
            key = (r.artifacts or {}).get("defense")
            if r.status != "ok" or not key or len(grids) >= MAX_TRIGGER_GRIDS:
                continue
            art = cache.get("defense", key)
            png = _trigger_grid(r, (art or {}).get("images", {}), title=cell_label(r)) if art else None
            if png is not None:
                cap = (f"{labels('defense', r.defense)} reversed triggers (mask × pattern per label): {cell_label(r)}; "
                       f"flagged {r.metrics.get('flagged') or 'none'}")
                grids.append(img(f"{_slug('triggers', r.run_id)}.png", png, cap))
    if grids:
        parts.append("<h2>Reversed triggers</h2>")
        parts.append('<p class="note">Red frame: flagged label; T: the attack\'s true target.</p>')
        parts += grids

    if errs:
        parts.append("<h2>Failed runs</h2>")
        parts.append('<p class="note">Not counted in any rate.</p>')
        parts.append(_table(("dataset", "model", "attack", "compression", "defense", "seed", "error"),
                            [[labels("dataset", r.dataset), labels("model", r.model),
                              labels("attack", pooled_attack(r.attack)), labels("compression", r.compression),
                              labels("defense", r.defense),
                              str(r.seed), r.error or ""] for r in errs], cls="errors", row_cls="err", wrap=("error",)))

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{CHECK_SCRIPT}</script>\n</body></html>\n")
    return page, files


def write_report(rows: Sequence[Row], out: str | os.PathLike, *, cache=None,
                 title: str = "backdoorlab report") -> Path:
    """Write ``out/index.html``, ``out/leaderboard.html`` and ``out/figures/*.png`` atomically;
    returns the index path.

    ``out`` may be absent or a previous report (a directory holding ``index.html``), which is
    replaced; any other existing path is refused rather than overwritten.
    """
    if not rows:
        raise BackdoorLabError("no results to report")
    out = Path(out)
    if out.exists() and not (out.is_dir() and ((out / "index.html").exists() or not any(out.iterdir()))):
        raise BackdoorLabError(f"--out {out} exists and is not an earlier report; choose a new directory")
    from .leaderboard import build_leaderboard

    page, files = build_report(rows, cache=cache, title=title, leaderboard=LEADERBOARD)
    lb_title = title.replace("backdoorlab report", "backdoorlab leaderboard", 1)
    files = {**files, LEADERBOARD: build_leaderboard(rows, title=lb_title).encode("utf-8")}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:  # name the directory the user gave, not the temporary one
        raise BackdoorLabError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    try:
        for rel, data in {**files, "index.html": page.encode("utf-8")}.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


__all__ = ["build_report", "write_report"]
