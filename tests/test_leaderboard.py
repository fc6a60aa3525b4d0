"""The deployed-precision leaderboard (issue 30 §2): its study files validate with the expected cell
counts, and ``leaderboard.html``, built from a synthetic result store (no training), shows the
store's numbers, renders in headless Chromium, and sorts when a header is clicked."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from _browser import parse_tables, render, screenshot, table_by_id
from _helpers import need_data

from backdoorlab.bench.store import ResultStore, Row
from backdoorlab.cli import main
from backdoorlab.report.aggregate import wilson
from backdoorlab.report.html import write_report

STUDIES = Path(__file__).resolve().parents[1] / "studies"
T975_DF1 = 12.706204736174698  # Student t, 0.975 quantile, 1 degree of freedom (two seeds)
NC = "neural-cleanse"
FP = "fine-pruning"
ATTACKS = ("badnets", "blended")
PRECISIONS = ("fp32", "int8-torch")
ERROR = "BackdoorLabError: synthetic failure"


# ---------------------------------------------------------------- the study files
def test_leaderboard_studies_validate_with_the_expected_cell_counts():
    from backdoorlab.attacks import ATTACKS as REG_ATTACKS
    from backdoorlab.bench.study import Study
    from backdoorlab.config import canonical_json
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.registry import split_spec

    full = Study.from_yaml(STUDIES / "leaderboard.yaml")  # from_yaml runs Study.validate (no data)
    gpu = Study.from_yaml(STUDIES / "leaderboard.yaml", variant="gpu")
    cpu = Study.from_yaml(STUDIES / "leaderboard-cpu.yaml")
    # every registered attack and defense (other test modules register toy methods, "test-..." and
    # "toy-...", which exist only while the test session runs), ten precisions, three seeds
    def real(names):
        return sorted(n for n in names if not n.startswith(("test-", "toy-")))

    attacks, defenses = real(REG_ATTACKS.names()), real(DEFENSES.names())
    for s in (full, gpu):
        assert sorted(split_spec(a)[0] for a in s.attacks) == attacks
        assert sorted(split_spec(d)[0] for d in s.defenses) == defenses
        assert s.compress == ["fp32", "int8-torch", "int8-pt2e", "int8-ort", "int8-ort-qop", "int8-openvino",
                              "int8-tflite", "int8-executorch", "int4-w", "prune-l1-50"]
        assert s.seeds == [0, 1, 2] and len(s.datasets) == 2
        assert len(s.cells()) == 2 * 1 * 25 * 3 * 10 * 36 == 54000
    assert full.models == ["small-cnn"] and gpu.models == ["preact-resnet18"] and gpu.name == "leaderboard-gpu"
    assert (gpu.train.lr, gpu.train.epochs, gpu.train.batch_size, gpu.train.schedule) == (0.01, 100, 128, "cosine")
    assert {d.name: d.train_limit for d in full.datasets} == {"gtsrb": 6000, "cifar10": None}
    assert len(cpu.cells()) == 1 * 1 * 6 * 1 * 7 * 6 == 252 and cpu.seeds == [0] and cpu.models == ["small-cnn"]
    # the slice's specs are the full study's, so they share trained models and artifacts
    for axis in ("attacks", "defenses", "compress"):
        assert {canonical_json(x) for x in getattr(cpu, axis)} <= {canonical_json(x) for x in getattr(full, axis)}
    assert cpu.train == full.train and cpu.datasets[0] == full.datasets[0]


@pytest.mark.data
def test_dry_run_validates_with_data_and_counts_cells(capsys):
    need_data("gtsrb")
    need_data("cifar10")
    assert main(["run", str(STUDIES / "leaderboard-cpu.yaml"), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == (
        "study leaderboard-cpu: 252 cells = 1 dataset x 1 model x 6 attacks x 1 seed x 7 precisions x 6 defenses; "
        "6 trained models; nothing run (--dry-run)")
    assert main(["run", str(STUDIES / "leaderboard.yaml"), "--gpu", "--dry-run", "--only", "seed=0"]) == 0
    assert capsys.readouterr().out.startswith("study leaderboard-gpu: 18000 cells = 2 datasets x 1 model x 25 attacks")


# ---------------------------------------------------------------- a synthetic store
def _metrics(attack, comp, defense, seed):
    """Known metrics: CA / ASR move with seed and precision; the scanner misses blended at int8."""
    i = PRECISIONS.index(comp)
    ca = 0.95 - 0.01 * i - 0.004 * seed
    asr = 0.0 if attack == "none" else (0.93 if attack == "badnets" else 0.96) - 0.3 * i * (attack == "blended") \
        + 0.02 * seed
    m = {"ca": ca, "asr": asr, "ra": 0.9 - asr}
    if defense == NC:
        hit = attack == "badnets" or (attack == "blended" and comp == "fp32")
        fp = attack == "none" and comp == "int8-torch" and seed == 1  # one false alarm at int8
        m.update(defense_kind="scanner", detected=hit or fp, defense_score=2.5 if hit else 1.2)
    elif defense == FP:
        after = 0.02 + 0.1 * i + 0.01 * seed if attack != "none" else 0.0
        ca_after = ca - 0.02 - 0.005 * seed
        m.update(defense_kind="remover", asr_after=after, ca_after=ca_after,
                 detected=(after < 0.2) if attack != "none" else None,
                 der=(max(0, asr - after) - max(0, ca - ca_after) + 1) / 2)
    return m


def synthetic_rows() -> list[Row]:
    """2 attacks (+ clean models) x 2 defenses (+ none) x 2 precisions x 2 seeds; one failed run."""
    rows = []
    for attack in ("none", *ATTACKS):
        for comp in PRECISIONS:
            for defense in ("none", NC, FP):
                for seed in (0, 1):
                    rid = f"lb-{attack}-{comp}-{defense}-{seed}"
                    if (attack, comp, defense, seed) == ("badnets", "int8-torch", NC, 1):
                        rows.append(Row(rid, "lb", "gtsrb", "small-cnn", attack, comp, defense, seed, {}, "error",
                                        error=ERROR))
                        continue
                    rows.append(Row(rid, "lb", "gtsrb", "small-cnn", attack, comp, defense, seed, {}, "ok",
                                    metrics=_metrics(attack, comp, defense, seed)))
    return rows


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """The report of the synthetic store, written through the store API: (store, leaderboard.html)."""
    tmp = tmp_path_factory.mktemp("lb")
    store = ResultStore(tmp / "results.sqlite")
    for r in synthetic_rows():
        store.put(r)
    index = write_report(store.rows("lb"), tmp / "report", title="backdoorlab report: lb")
    return store, index.parent / "leaderboard.html"


# ---------------------------------------------------------------- independent arithmetic
def _ci(vals, lo=0.0, hi=1.0):
    """Mean and 95% t-interval clipped to [lo, hi], computed here from first principles (two values: df 1)."""
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, None, None
    assert len(vals) == 2
    half = T975_DF1 * statistics.stdev(vals) / math.sqrt(2)
    return m, max(lo, m - half), min(hi, m + half)


def _ok(store, attack, comp, defense):
    return [r for r in store.rows("lb") if (r.attack, r.compression, r.defense) == (attack, comp, defense)
            and r.status == "ok"]


def _num_cell(cell):
    text, attrs = cell
    return None if "data-v" not in attrs else (float(attrs["data-v"]), attrs.get("data-lo"), attrs.get("data-hi"),
                                               int(attrs["data-n"]), text)


def _assert_est(cell, vals, delta=False):
    got = _num_cell(cell)
    m, lo, hi = _ci(vals, -1.0 if delta else 0.0)
    assert got is not None, cell
    assert got[0] == pytest.approx(m, abs=1e-12) and got[3] == len(vals), (cell, vals)
    if lo is None:
        assert got[1] is None and got[2] is None and "n=1" in got[4], cell
    else:
        assert float(got[1]) == pytest.approx(lo, abs=1e-9) and float(got[2]) == pytest.approx(hi, abs=1e-9), cell
        shown = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", got[4])
        assert shown and [float(x) for x in shown.groups()] == pytest.approx([m, lo, hi], abs=6e-4), got
    assert float(got[4].split()[0]) == pytest.approx(m, abs=6e-4)  # as displayed, 3 decimals


def _by_row(rows):
    header = [t for t, _ in rows[0]]
    return header, {(r[0][0], r[1][0]): dict(zip(header, r)) for r in rows[1:]}


def test_leaderboard_numbers_equal_the_store(board):
    store, page_path = board
    page = page_path.read_text()
    assert "<link" not in page and "<img" not in page and not re.search(r"(src|href)=\"(https?:|//)", page)
    index = (page_path.parent / "index.html").read_text()
    assert '<a href="leaderboard.html">leaderboard</a>' in index
    for comp in PRECISIONS:
        header, cells = _by_row(table_by_id(page, f"lb-gtsrb-small-cnn-{comp}"))
        assert len(cells) == 3 * 3  # (none + 2 attacks) x (none + 2 defenses)
        if comp == "fp32":
            assert not any(h.startswith("\u0394") for h in header)  # no delta against itself
        for (attack, defense), row in cells.items():
            ok = _ok(store, attack, comp, defense)
            assert int(row["runs"][0]) == len(ok)
            _assert_est(row["CA"], [r.metrics["ca"] for r in ok])
            _assert_est(row["ASR"], [r.metrics["asr"] for r in ok])
            if defense == FP:
                _assert_est(row["DER"], [r.metrics["der"] for r in ok])
                _assert_est(row["ASR after"], [r.metrics["asr_after"] for r in ok])
            else:
                assert "data-v" not in row["DER"][1]
            det = row["detection [Wilson]"]
            verdicts = [r.metrics["detected"] for r in ok if defense != "none" and r.metrics["detected"] is not None]
            if defense == "none":
                assert det[0] == "\u2014"
            elif not verdicts:
                assert det[0] == "-"  # a remover on a clean model: no verdict, never "not detected"
            else:
                k, n = sum(verdicts), len(verdicts)
                lo, hi = wilson(k, n)
                assert float(det[1]["data-v"]) == pytest.approx(k / n) and det[0].endswith(f"{k}/{n}")
                assert (float(det[1]["data-lo"]), float(det[1]["data-hi"])) == pytest.approx((lo, hi))
            if defense == NC:  # the clean model's FPR beside the rate
                clean = [r.metrics["detected"] for r in _ok(store, "none", comp, NC)]
                assert float(row["clean FPR [Wilson]"][1]["data-v"]) == pytest.approx(sum(clean) / len(clean))
            if comp != "fp32":  # paired by seed against fp32
                base = {r.seed: r for r in _ok(store, attack, "fp32", defense)}

                def shipped(r):
                    return r.metrics.get("asr_after", r.metrics["asr"])
                _assert_est(row["\u0394 ASR shipped"], [shipped(r) - shipped(base[r.seed]) for r in ok], delta=True)
                if defense == NC:
                    _assert_est(row["\u0394 detection"],
                                [float(r.metrics["detected"]) - float(base[r.seed].metrics["detected"]) for r in ok],
                                delta=True)
        failed = cells[("badnets", NC)]
        assert failed["failed"][0] == ("1" if comp == "int8-torch" else "0")
        if comp == "int8-torch":
            assert "n=1" in failed["ASR"][0]  # one ok run left: no interval

    # the heatmaps hold the same deltas as the int8-torch table
    heat = {a.get("data-what"): rows for a, rows in parse_tables(page) if a.get("class") == "heat"}
    assert set(heat) == {"asr", "det"}
    _, cells = _by_row(table_by_id(page, "lb-gtsrb-small-cnn-int8-torch"))
    for what, col in (("asr", "\u0394 ASR shipped"), ("det", "\u0394 detection")):
        head = [t for t, _ in heat[what][0]]
        for r in heat[what][1:]:
            attack = r[0][0].replace(" (FPR)", "")
            for d, (text, attrs) in zip(head[1:], r[1:]):
                want = cells[(attack, d)][col][1]
                if "data-v" not in want:  # e.g. a remover on clean models: no verdict, no pair
                    assert "data-v" not in attrs and text == "\u00b7"
                    continue
                assert float(attrs["data-v"]) == pytest.approx(float(want["data-v"]))
    assert [r[0][0] for r in heat["det"][1:]] == ["none (FPR)", "badnets", "blended"]


def test_ranking_follows_its_definition(board):
    """E(p) = mean over live attacks of (detection rate - clean FPR); ranked by the mean over the
    deployed precisions (here int8-torch alone)."""
    store, page_path = board
    page = page_path.read_text()

    def rate(attack, comp, defense):
        v = [r.metrics["detected"] for r in _ok(store, attack, comp, defense) if r.metrics["detected"] is not None]
        return sum(v) / len(v) if v else None

    def e(comp, defense):
        fpr = rate("none", comp, defense) or 0.0  # a remover: no verdict on clean models, taken as 0
        vals = [rate(a, comp, defense) - fpr for a in ATTACKS
                if statistics.fmean(r.metrics["asr"] for r in _ok(store, a, comp, defense)) >= 0.5]
        return sum(vals) / len(vals)

    header, *body = table_by_id(page, "rank-gtsrb-small-cnn")
    header = [t for t, _ in header]
    got = {r[1][0].rstrip(" \u2020"): dict(zip(header, r)) for r in body}
    assert [r[1][0].rstrip(" \u2020") for r in body] == sorted(got, key=lambda d: -e("int8-torch", d))
    for d in (NC, FP):
        assert float(got[d]["E deployed"][1]["data-v"]) == pytest.approx(e("int8-torch", d))
        assert float(got[d]["E fp32"][1]["data-v"]) == pytest.approx(e("fp32", d))
        assert float(got[d]["change"][1]["data-v"]) == pytest.approx(e("int8-torch", d) - e("fp32", d))
    assert got[NC]["failed runs"][0] == "1" and got[FP]["defense"][0].endswith("\u2020")  # FPR taken as 0
    # NC: fp32 detects both (E 1), int8: badnets 1/1, blended 0/2, clean FPR 1/2 -> (0.5 + -0.5) / 2 = 0
    assert e("fp32", NC) == 1.0 and e("int8-torch", NC) == pytest.approx(0.0)
    ders = [r.metrics["der"] for a in ATTACKS for r in _ok(store, a, "int8-torch", FP)]
    assert float(got[FP]["DER deployed"][1]["data-v"]) == pytest.approx(
        statistics.fmean([statistics.fmean(ders[:2]), statistics.fmean(ders[2:])]))


def test_leaderboard_renders_in_headless_chromium(board, tmp_path):
    _, page_path = board
    dom = render(page_path, tmp_path, width=1400)
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    assert body["render"] == "ok" and body["tables-overflowing"] == "0", body
    assert int(body["page-width"]) <= int(body["view-width"]), body  # fits a 1400 px window
    assert dom.count('class="lb sortable"') == 2 and dom.count('class="heat"') == 2
    png = screenshot(page_path, tmp_path, width=1400, height=2600)
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 2600)
    px = np.asarray(img).reshape(-1, 3).astype(int)
    assert len(np.unique(px @ np.array([65536, 256, 1]))) > 50  # text, tables, colours: not a blank page
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    red = int(((r > g + 60) & (r > b + 60)).sum())  # heatmap cells worse as deployed
    blue = int(((b > r + 60) & (b > g + 20)).sum())  # ... and better
    assert red > 200 and blue > 200, (red, blue)


def _column(rows, col):
    return [None if "data-v" not in r[col][1] else float(r[col][1]["data-v"]) for r in rows[1:]]


def test_clicking_a_header_sorts_the_table_in_chromium(board, tmp_path):
    """The page's own script sorts: the URL fragment makes it click the headers as a reader would
    (once ascending, twice descending); the order is read back from the browser's DOM."""
    _, page_path = board
    before = table_by_id(page_path.read_text(), "lb-gtsrb-small-cnn-int8-torch")
    header = [t for t, _ in before[0]]
    asr, det, defense = header.index("ASR"), header.index("detection [Wilson]"), header.index("defense")
    rank = table_by_id(page_path.read_text(), "rank-gtsrb-small-cnn")
    e_col = [t for t, _ in rank[0]].index("E deployed")
    frag = f"#sort=lb-gtsrb-small-cnn-int8-torch:{det}:desc;lb-gtsrb-small-cnn-fp32:{defense}:asc;" \
           f"rank-gtsrb-small-cnn:{e_col}:asc"
    dom = render(page_path, tmp_path, fragment=frag)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert (f'data-sorted="lb-gtsrb-small-cnn-int8-torch:{det}:descending;lb-gtsrb-small-cnn-fp32:{defense}:'
            f'ascending;rank-gtsrb-small-cnn:{e_col}:ascending"') in body, body
    after = table_by_id(dom, "lb-gtsrb-small-cnn-int8-torch")
    vals = _column(after, det)
    present = [v for v in vals if v is not None]
    assert present == sorted(present, reverse=True) and len(present) >= 4
    assert vals[len(present):] == [None] * (len(vals) - len(present))  # no value: last
    assert sorted(map(str, after[1:])) == sorted(map(str, before[1:]))  # the same rows, reordered
    assert _column(after, asr) != _column(before, asr) or vals != _column(before, det)
    names = [r[defense][0] for r in table_by_id(dom, "lb-gtsrb-small-cnn-fp32")[1:]]
    assert names == sorted(names)
    es = _column(table_by_id(dom, "rank-gtsrb-small-cnn"), e_col)
    assert es == sorted(es)
    th = re.search(r'<table class="lb sortable" id="lb-gtsrb-small-cnn-int8-torch".*?</thead>', dom, re.S).group(0)
    assert th.count('aria-sort="descending"') == 1
