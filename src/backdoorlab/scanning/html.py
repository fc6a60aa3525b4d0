"""``--out DIR``: the scan as one HTML page with the recovered trigger as PNG files beside it.

Written to a temporary directory next to ``DIR`` and moved into place at the end, so a failed
write leaves no half-written report.
"""

from __future__ import annotations

import html
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .run import ScanReport

STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;"
         "border-bottom:1px solid #ddd}figure{display:inline-block;margin:0 1em 1em 0}"
         "img{image-rendering:pixelated;border:1px solid #ccc}")
NAMES = {"mask": "mask", "pattern": "pattern", "example": "triggered example", "clean_example": "clean example"}


def save_png(img: torch.Tensor, path: Path, scale: int = 4) -> None:
    """``img`` ``(C, H, W)`` float in [0, 1] (C = 1 or 3) as a PNG, enlarged ``scale`` times
    (nearest neighbour, so pixels stay visible)."""
    from PIL import Image

    a = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    im = Image.fromarray(a)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def _row(o) -> str:
    e = html.escape
    source = f"calibrated, FPR {o.fpr:.2f} on {o.fpr_models} clean models" if o.calibrated and o.fpr is not None \
        else "paper rule"
    cells = [o.name, _num(o.score), _num(o.threshold), source, ", ".join(map(str, o.flagged)),
             "yes" if o.over else "no", o.ran_on, f"{o.seconds:.1f}", o.error or ""]
    return "<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"


def write_scan_html(report: ScanReport, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        figs = []
        for key, label in NAMES.items():
            if key in report.images:
                save_png(report.images[key], tmp / f"{key}.png")
                figs.append(f'<figure><img src="{key}.png" alt="{label}"><figcaption>{label}</figcaption></figure>')
        (tmp / "report.json").write_text(report.to_json())
        e = html.escape
        rows = "".join(_row(o) for o in report.scanners)
        m = report.model
        colour = {"backdoored": "#b00020", "clean": "#1b5e20", "inconclusive": "#8a6d00"}[report.verdict]
        name = e(Path(m["path"]).name)
        shape = e(",".join(map(str, m["input_shape"])))
        facts = (f"<b>{e(m['path'])}</b>: {e(m['format'])}, {e(m['precision'])}, input {shape}, "
                 f"{m['num_classes']} classes, gradients: {e(m['gradient_path'])}; {m['clean_images']} clean "
                 f"images; budget {e(report.budget)}; {report.seconds:.1f} s.")
        targets = e(", ".join(map(str, report.targets)) or "none")
        victims = f"; victim classes: {e(', '.join(map(str, report.victims)))}" if report.victims else ""
        notes = "".join(f"<li>{e(n)}</li>" for n in m["notes"])
        notes += "".join(f"<li>natural (not injected): {e(str(n))}</li>" for n in report.natural)
        head = ("<tr><th>scanner</th><th>score</th><th>threshold</th><th>threshold from</th><th>flagged</th>"
                "<th>over</th><th>ran on</th><th>s</th><th>not run because</th></tr>")
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>backdoorlab scan: {name}</title>
<style>{STYLE}</style></head><body>
<h1>backdoorlab scan</h1>
<p>{facts}</p>
<h2 style="color:{colour}">Verdict: {e(report.verdict)}</h2>
<p>Suspected target label(s): {targets}{victims}.</p>
<p>Rule: {e(report.rule)}.</p>
<table>{head}{rows}</table>
<h2>Recovered trigger</h2>{"".join(figs) or "<p>none</p>"}
<h2>Notes</h2><ul>{notes}</ul>
</body></html>"""
        (tmp / "index.html").write_text(page)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"
