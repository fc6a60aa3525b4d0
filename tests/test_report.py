"""Aggregation of defense rows and the HTML report (rendered in headless Chromium), from a store of
synthetic rows: no training, so the whole file runs in seconds."""

from __future__ import annotations

import re

import pytest
import torch
from _browser import render as _render
from _browser import tables as _tables

from backdoorlab.bench.cache import ArtifactCache
from backdoorlab.bench.store import ResultStore, Row
from backdoorlab.cli import main
from backdoorlab.errors import BackdoorLabError
from backdoorlab.report.aggregate import aggregate, detection_table, false_positive_rates, pooled_attack, wilson
from backdoorlab.report.html import write_report

ERROR = "BackdoorLabError: neural-cleanse needs grad, which the int8-ort artifact lacks"


def _row(attack, comp, defense, seed, metrics=None, status="ok", error=None, artifacts=None, study="rep"):
    run_id = f"{study}-{attack}-{comp}-{defense}-{seed}"
    base = {"ca": 0.95 if comp == "fp32" else 0.94, "asr": 0.0 if attack == "none" else 0.93 + 0.01 * seed}
    return Row(run_id, study, "gtsrb", "small-cnn", attack, comp, defense, seed, {"attack": attack}, status,
               metrics={**base, **(metrics or {})} if status == "ok" else (metrics or {}), error=error,
               artifacts=artifacts or {})


def _scan(detected, target_flagged, score):
    return {"defense_kind": "scanner", "detected": detected, "target_flagged": target_flagged,
            "flagged": [0] if detected else [], "defense_score": score}


def synthetic_rows(nc_key: str | None = None) -> list[Row]:
    nc = "neural-cleanse"
    rows = [
        # scanner, backdoored, fp32: 2 of 3 detected (one run with target 3 pools in: same attack family)
        _row("badnets", "fp32", nc, 0, _scan(True, True, 3.1), artifacts={"defense": nc_key} if nc_key else None),
        _row("badnets", "fp32", nc, 1, _scan(True, True, 2.5)),
        _row("badnets(target=3)", "fp32", nc, 2, _scan(False, False, 1.2)),
        # scanner at int8-torch: one error row, which must not count as "not detected"
        _row("badnets", "int8-torch", nc, 0, _scan(False, False, 1.0)),
        _row("badnets", "int8-torch", nc, 1, status="error", error=ERROR),
        _row("badnets", "int8-torch", nc, 2, _scan(True, True, 2.2)),
        # clean models: detections are false positives (1 of 3 at fp32)
        _row("none", "fp32", nc, 0, _scan(False, None, 0.8)),
        _row("none", "fp32", nc, 1, _scan(True, None, 2.1)),
        _row("none", "fp32", nc, 2, _scan(False, None, 1.1)),
        _row("none", "int8-torch", nc, 0, _scan(False, None, 0.9)),
    ]
    for comp, after in (("fp32", 0.05), ("int8-torch", 0.30)):
        for seed in (0, 1):
            rows.append(_row("badnets", comp, "fine-pruning", seed, {
                "defense_kind": "remover", "detected": after < 0.2, "defense_score": 0.9 - after,
                "asr_after": after + 0.01 * seed, "ca_after": 0.93, "channels_pruned": 95}))
        rows.append(_row("none", comp, "fine-pruning", 0, {"defense_kind": "remover", "detected": None,
                                                          "defense_score": 0.5, "asr_after": 0.0, "ca_after": 0.94}))
        rows.append(_row("badnets", comp, "none", 0))
    return rows


def _group(groups, attack, comp, defense):
    return next(g for g in groups if (g.attack, g.compression, g.defense) == (attack, comp, defense))


def test_detection_rates_pool_seeds_and_targets_and_never_count_errors():
    groups = aggregate(synthetic_rows())
    g = _group(groups, "badnets", "fp32", "neural-cleanse")
    assert pooled_attack("badnets(rate=0.1,target=3)") == "badnets(rate=0.1)"
    assert (g.n_runs, g.n_errors, g.n_na, g.n_detected) == (3, 0, 0, 2) and g.seeds == [0, 1, 2]
    assert g.rate == pytest.approx(2 / 3) and (g.rate_low, g.rate_high) == pytest.approx(wilson(2, 3))
    assert (g.rate_low, g.rate_high) == pytest.approx((0.2077, 0.9385), abs=1e-4)  # Wilson 95%
    assert g.target_share == pytest.approx(2 / 3) and g.score.mean == pytest.approx((3.1 + 2.5 + 1.2) / 3)
    assert g.asr.mean == pytest.approx(0.94) and g.ca.mean == pytest.approx(0.95) and g.asr.std > 0
    e = _group(groups, "badnets", "int8-torch", "neural-cleanse")
    assert (e.n_runs, e.n_errors, e.rate) == (2, 1, 0.5) and e.errors == [ERROR]  # error: not a miss
    fpr = {(f.compression, f.defense): f for f in false_positive_rates(groups)}
    assert fpr[("fp32", "neural-cleanse")].rate == pytest.approx(1 / 3)
    assert fpr[("int8-torch", "neural-cleanse")].rate == 0.0
    na = fpr[("fp32", "fine-pruning")]
    assert (na.n_runs, na.n_na, na.rate) == (1, 1, None)  # a remover on a clean model: no verdict
    fp = _group(groups, "badnets", "int8-torch", "fine-pruning")
    assert fp.rate == 0.0 and fp.asr_after.mean == pytest.approx(0.305) and fp.kind == "remover"
    assert wilson(0, 3)[0] == 0.0 and wilson(3, 3)[1] == 1.0
    text = detection_table(synthetic_rows())
    assert "0.667 [0.208, 0.939] (2/3)" in text and ERROR in text and "FPR" in text


def _store_with_triggers(tmp_path):
    cache = ArtifactCache(tmp_path / "artifacts")
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(43, 1, 32, 32)
    mask[:, :, 27:30, 27:30] = 1.0  # a corner square, as BadNets' trigger
    images = {"mask": mask, "pattern": torch.rand(43, 3, 32, 32, generator=g)}
    key = ArtifactCache.key("defense", {"run_id": "synthetic"})
    cache.put("defense", key, {"images": images})
    store = ResultStore(tmp_path / "results.sqlite")
    for r in synthetic_rows(nc_key=key):
        store.put(r)
    store.put(_row("badnets", "fp32", "none", 0, study="other"))
    return store, cache


def test_html_report_renders_in_headless_chromium(tmp_path):
    store, cache = _store_with_triggers(tmp_path)
    index = write_report(store.rows("rep"), tmp_path / "report", cache=cache)
    page = index.read_text()
    # self-contained: inline CSS, images as data: URIs, nothing fetched from elsewhere
    assert "<style>" in page and "<link" not in page and not re.search(r"(src|href)=\"(https?:|//)", page)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    files = sorted(p.relative_to(index.parent).as_posix() for p in (index.parent / "figures").glob("*.png"))
    assert files == sorted(re.findall(r'data-file="([^"]+)"', page))  # the same PNGs, as files too
    assert any("triggers" in f for f in files) and any(f.startswith("figures/detection") for f in files)
    assert any(f.startswith("figures/asr") for f in files)

    dom = _render(index, tmp_path)
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-render="ok"' in body, body
    assert f'data-images-total="{len(srcs)}"' in body and f'data-images-decoded="{len(srcs)}"' in body
    assert dom.count('<table class="detection"') == 2  # one per precision: fp32, int8-torch
    assert '<table class="fpr"' in dom and '<table class="errors"' in dom
    text = re.sub(r"<[^>]+>", "", dom)  # as displayed: a number cell wraps only between its parts (spans)
    assert "neural-cleanse needs grad" in text and "0.667 [0.208, 0.939] (2/3)" in text
    assert "Reversed triggers" in dom and "other" not in re.sub(r"<img[^>]*>", "", dom).split("Studies:")[1][:40]


def test_report_is_replaced_atomically_and_never_overwrites_other_directories(tmp_path):
    store, cache = _store_with_triggers(tmp_path)
    out = tmp_path / "report"
    write_report(store.rows(), out, cache=cache)
    first = (out / "index.html").stat().st_mtime_ns
    write_report(store.rows("rep"), out, cache=cache)  # an earlier report is replaced whole
    assert (out / "index.html").stat().st_mtime_ns >= first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BackdoorLabError, match="not an earlier report"):
        write_report(store.rows(), other, cache=cache)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(BackdoorLabError):
        write_report([], tmp_path / "empty", cache=cache)
    assert not (tmp_path / "empty").exists()


def test_cli_report(tmp_path, capsys):
    store, cache = _store_with_triggers(tmp_path)
    out = tmp_path / "cli-report"
    args = ["report", "--store", str(store.path), "--cache", str(cache.root), "--out", str(out)]
    assert main([*args, "--study", "rep"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    page = (out / "index.html").read_text()
    assert "backdoorlab report: rep" in page and page.count('<table class="detection"') == 2
    assert main([*args, "--study", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backdoorlab: error: no study 'nope'") and "\n" not in err and "rep" in err
    empty = ResultStore(tmp_path / "empty.sqlite")
    empty._connect(create=True).close()
    assert main(["report", "--store", str(empty.path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no results" in err and "\n" not in err and not (tmp_path / "x").exists()
    assert main(["report", "--store", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "y")]) == 2
    assert "no result store" in capsys.readouterr().err
    assert main(["results", "--store", str(store.path), "--study", "rep", "--aggregate"]) == 0
    assert "detection rate [Wilson 95%]" in capsys.readouterr().out


# ---------------------------------------------------------------- rows without a detector, RA, short labels
def _quickstart_rows() -> list[Row]:
    """What `defenses: [none]` stores (the quickstart): models only, no detector ran."""
    rows = []
    for attack in ("none", "badnets", "blended"):
        for comp in ("fp32", "int8-torch"):
            m = {"ca": 0.9944, "asr": 0.0 if attack == "none" else 1.0, "ra": 0.6389 if attack == "none" else 0.0417}
            rows.append(Row(f"qs-{attack}-{comp}", "quickstart", "digits", "small-cnn", attack, comp, "none", 0,
                            {"attack": attack}, "ok", metrics=m))
    return rows


def test_rows_without_a_detector_show_no_detection_rate_and_show_ra():
    from backdoorlab.report.html import build_report

    rows = _quickstart_rows()
    groups = aggregate(rows)
    assert all(g.rate is None and not g.has_detector for g in groups)  # nothing ran that could detect
    assert groups[0].ra.mean == pytest.approx(0.0417)
    page, files = build_report(rows, title="quickstart")
    tables = _tables(page, "detection")
    assert len(tables) == 2  # fp32, int8-torch
    for table in tables:
        header, body = table[0], table[1:]
        assert len(body) == 3 and "RA" in header and "detection rate [Wilson 95%]" in header
        rate, ra = header.index("detection rate [Wilson 95%]"), header.index("RA")
        for cells in body:
            assert cells[rate] == "\u2014", cells  # a dash, never 0.000 [0.000, 0.793] (0/1)
            assert not re.search(r"\d/\d|\[", " ".join(cells)), cells
            assert cells[ra] in ("0.639", "0.042")
        # columns no row fills are left out
        assert not {"score", "target share", "ASR after", "CA after", "RA after"} & set(header)
    assert "(0/1)" not in page and "0.793" not in page and "FPR" not in page
    assert "no detector ran" in page  # the legend says why
    assert "Detection by precision" not in page and "Results by precision" in page
    # captions follow the content: no detection figure, and no remover in the ASR caption
    caps = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    assert caps and not any("detection" in f for f in files)
    assert all("remover" not in c and "repair" not in c and "ASR of the deployed model" in c for c in caps), caps
    assert "Settings" not in page  # no label is shortened: nothing to list


def test_removers_are_named_in_the_asr_caption():
    from backdoorlab.report.html import _figures

    caps = [c for _, c, _ in _figures(aggregate(synthetic_rows()))]
    asr = [c for c in caps if ": ASR " in c]
    assert asr == ["gtsrb / badnets: ASR of the deployed model (mean over runs) and after repair by fine-pruning "
                   "(error bars: ± std over runs)"]
    det = [c for c in caps if "detection rate" in c]
    assert det and all("fine-pruning and neural-cleanse" in c for c in det), det


NC = "neural-cleanse(batch_size=4,batches_per_step=1,steps=100)"
NC_LONG = "neural-cleanse(batch_size=4,batches_per_step=1,steps=1000)"
STRIP = "strip(eval_limit=300,threshold_rule=quantile)"
GTSRB = "gtsrb(test_limit=2000,train_limit=6000)"
BLEND = "blended(alpha=0.2,pattern=/data/patterns/hello-kitty-512x512-rgb.png,rate=0.1,target=0)"
LONG_ERROR = ("BackdoorLabError: neural-cleanse needs grad, which the int8-ort artifact lacks; its surrogate at "
              "/root/.cache/backdoorlab/artifacts/compress/0f3a9c2b7d1e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a.pt "
              "failed to load")


def _long_spec_rows() -> list[Row]:
    """A blindspot-like study: long dataset, attack and defense specs, six precisions, three seeds,
    two Neural Cleanse settings that share a short label, and failures with long messages."""
    defenses = ["none", NC, NC_LONG, STRIP, "activation-clustering", "spectral-signatures", "fine-pruning"]
    kinds = {NC: "scanner", NC_LONG: "scanner", STRIP: "detector", "activation-clustering": "filter",
             "spectral-signatures": "filter", "fine-pruning": "remover"}
    comps = ["fp32", "int8-dynamic", "int8-torch", "int8-ort", "int4-w", "prune-l1-50"]
    rows = []
    for ds in (GTSRB, "cifar10"):
        for attack in ("none", "badnets(rate=0.1,target=0)", "badnets(rate=0.1,target=3)", BLEND):
            for comp in comps:
                for defense in defenses:
                    for seed in (0, 1, 2):
                        rid = f"long-{ds}-{attack}-{comp}-{defense}-{seed}"
                        base = Row(rid, "blindspots", ds, "small-cnn", attack, comp, defense, seed, {}, "ok")
                        if defense == NC and comp == "int8-ort" and seed == 2:
                            base.status, base.error = "error", LONG_ERROR
                            rows.append(base)
                            continue
                        j = 0.01 * seed
                        m = {"ca": 0.9412 + j, "asr": 0.0123 + j if attack == "none" else 0.9387 - j,
                             "ra": 0.9123 - j if attack == "none" else 0.0456 + j}
                        if defense != "none":
                            m.update({"defense_kind": kinds[defense], "detected": seed != 1,
                                      "defense_score": 2.3456 + seed, "target_flagged": seed == 0})
                        if defense == "fine-pruning":
                            m.update({"asr_after": 0.1234 + j, "ca_after": 0.9012 - j, "ra_after": 0.8123 + j})
                        base.metrics = m
                        rows.append(base)
    return rows


@pytest.fixture(scope="module")
def long_report(tmp_path_factory):
    """The report of :func:`_long_spec_rows`, written once for the tests below: its index path."""
    return write_report(_long_spec_rows(), tmp_path_factory.mktemp("long-report") / "report", title="blindspots")


def test_short_labels_keep_tables_narrow_and_list_the_full_specs_once(long_report):
    from backdoorlab.report.labels import build_labels, short_label

    assert short_label("dataset", GTSRB) == "gtsrb[6k]" and short_label("defense", NC) == "neural-cleanse"
    assert short_label("compression", "prune-l1-50+int8-torch") == "prune-l1-50+int8-torch"
    rows = _long_spec_rows()
    labels = build_labels(rows)
    assert labels("dataset", GTSRB) == "gtsrb[6k]" and labels("dataset", "cifar10") == "cifar10"
    assert {labels("defense", NC), labels("defense", NC_LONG)} == {"neural-cleanse#1", "neural-cleanse#2"}
    assert labels("attack", "badnets(rate=0.1,target=0)") == "badnets(target=0)"  # the one parameter that differs
    assert labels("attack", "badnets(rate=0.1,target=3)") == "badnets(target=3)"
    assert labels("attack", BLEND) == "blended"
    page = long_report.read_text()
    detection = _tables(page, "detection")
    assert len(detection) == 6
    cells = {c for t in detection for r in t for c in r}
    assert {"gtsrb[6k]", "neural-cleanse#1", "neural-cleanse#2", "strip", "badnets", "blended"} <= cells
    assert not any("(" in c and "=" in c for c in cells)  # no spec with parameters in a detection table
    assert "RA" in detection[0][0] and "RA after" in detection[0][0]
    (settings,) = _tables(page, "settings")
    listed = {tuple(r) for r in settings[1:]}
    assert ("blindspots", "dataset", "gtsrb[6k]", GTSRB) in listed
    assert ("blindspots", "defense", "neural-cleanse#1", NC) in listed  # numbered in the order of their specs
    assert ("blindspots", "defense", "neural-cleanse#2", NC_LONG) in listed
    assert ("blindspots", "attack", "badnets", "badnets(rate=0.1,target=0); badnets(rate=0.1,target=3)") in listed
    assert ("blindspots", "defense", "strip", STRIP) in listed
    assert ("blindspots", "attack", "blended", BLEND) in listed and len(listed) == 6
    assert page.count(NC) == 1  # the full spec once, in the settings table


def test_html_report_with_long_specs_fits_a_1400px_window_in_headless_chromium(long_report, tmp_path):
    """No table wider than the window (`scrollWidth <= clientWidth`), measured by the page's own
    script in a 1400 px wide headless Chromium."""
    dom = _render(long_report, tmp_path, width=1400)
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    assert body["render"] == "ok", body
    view = int(body["view-width"])
    assert 1300 <= view <= 1400, body  # the window is 1400 px wide (less a scrollbar)
    assert int(body["page-width"]) <= view, body  # no horizontal scrollbar
    assert int(body["widest-table"]) <= view and body["tables-overflowing"] == "0", body
    rights = [int(x) for x in re.findall(r'<table[^>]*data-right="(\d+)"', dom)]
    assert len(rights) == dom.count("<table") >= 9 and max(rights) <= view  # 6 precisions, FPR, settings, errors
    text = re.sub(r"<[^>]+>", "", dom)
    assert "0.929 ± 0.010" in text and "0.667 [0.208, 0.939] (2/3)" in text and "hello-kitty" in text


def test_results_print_short_labels_and_wide_or_export_keep_full_specs(tmp_path, capsys):
    import pandas as pd

    keep = {"fp32", "int8-torch"}
    rows = [r for r in _long_spec_rows() if r.dataset == GTSRB and r.compression in keep and r.seed < 2
            and r.defense in ("none", NC, NC_LONG) and r.attack in ("none", "badnets(rate=0.1,target=0)")]
    store = ResultStore(tmp_path / "s.sqlite")
    for r in rows:
        store.put(r)
    args = ["results", "--store", str(store.path)]
    for extra in ([], ["--aggregate"]):
        assert main([*args, *extra]) == 0
        out = capsys.readouterr().out
        table = "\n".join(ln for ln in out.splitlines() if ln.startswith("gtsrb"))  # the tables' rows
        notes = "\n".join(ln for ln in out.splitlines() if ln.startswith("  "))  # the settings footnotes
        assert "gtsrb[6k]" in table and "neural-cleanse#1" in table and "neural-cleanse#2" in table
        assert "(" not in table.replace(" (", " ") and GTSRB not in table  # no spec with parameters in a table
        footnotes = out.count("\nsettings (short label = full spec; `backdoorlab results --wide`")
        assert footnotes == (2 if extra else 1)  # below each table: the aggregate and the detection table
        assert notes.count(NC + " ") == footnotes and notes.count(GTSRB) == footnotes
        assert re.search(r"neural-cleanse#2 +" + re.escape(NC_LONG), notes)
        if extra:
            assert "detection rate [Wilson 95%]" in out and "RA after" in out
        assert main([*args, *extra, "--wide"]) == 0
        wide = capsys.readouterr().out
        assert "settings (" not in wide and GTSRB in wide and NC in wide and NC_LONG in wide
        assert "gtsrb[6k]" not in wide and "#1" not in wide
    assert main(["export", "--store", str(store.path), "--out", str(tmp_path / "res"), "--format", "csv"]) == 0
    df = pd.read_csv(tmp_path / "res.csv")
    assert set(df["dataset"]) == {GTSRB} and set(df["defense"]) == {"none", NC, NC_LONG}
