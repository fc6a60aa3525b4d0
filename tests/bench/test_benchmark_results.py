"""Benchmark result files: a rerun of part of a benchmark updates what it measured and keeps the
rest (``benchmarks/bench_compression_backdoors.py --only``, BENCHMARKS.md cites those rows)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench_module(name: str, file: str):
    """A benchmark script imported as a module (its sibling ``_common`` on the path while it loads)."""
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture(scope="module")
def merged_rows():
    return _bench_module("bench_cb", "bench_compression_backdoors.py").merged_rows


DS = {"name": "gtsrb", "train_limit": 6000}


def _write(path, rows, ds=DS):
    path.write_text(json.dumps({"dataset": ds, "rows": rows}))


def test_a_rerun_keeps_the_parts_and_rows_it_did_not_measure(tmp_path, merged_rows):
    path = tmp_path / "r.json"
    _write(path, [
        {"attack": "a", "spec": {"lr": 0.1}, "precisions": {"fp32": 1}, "detection": {"nc": 1}, "efrap": {"asr": 0.1},
         "anatomy": {"int8-torch": {"old": 1}, "int8-torch/efrap": {"kept": 1}}},
        {"attack": "b", "spec": "badnets", "precisions": {"fp32": 2}},
    ])
    new = [{"attack": "a", "spec": {"lr": 0.1}, "precisions": {"fp32": 3}, "anatomy": {"int8-torch": {"new": 1}}}]
    rows = {r["attack"]: r for r in merged_rows(path, new, DS)}
    assert rows["b"] == {"attack": "b", "spec": "badnets", "precisions": {"fp32": 2}}  # another label: untouched
    a = rows["a"]
    assert a["precisions"] == {"fp32": 3}  # measured again: replaced
    assert a["detection"] == {"nc": 1} and a["efrap"] == {"asr": 0.1}  # not measured this run: kept
    assert a["anatomy"] == {"int8-torch": {"new": 1}, "int8-torch/efrap": {"kept": 1}}


def test_a_changed_spec_or_dataset_drops_the_old_measurements(tmp_path, merged_rows):
    path = tmp_path / "r.json"
    old = [{"attack": "a", "spec": {"lr": 0.1}, "detection": {"nc": 1}}, {"attack": "b", "spec": "x"}]
    _write(path, old)
    new = [{"attack": "a", "spec": {"lr": 0.2}, "precisions": {}}]
    rows = {r["attack"]: r for r in merged_rows(path, new, DS)}
    assert rows["a"] == new[0] and "b" in rows  # another model: its old detection would be wrong
    assert merged_rows(path, new, {**DS, "train_limit": 100}) == new  # another dataset: not comparable
    assert merged_rows(tmp_path / "missing.json", new, DS) == new


def _attack_run(path, seeds, asr, model=None, train=None):
    rows = [{"attack": "badnets", "spec": "badnets", "compression": "fp32",
             "per_seed": [{"seed": s, "ca": 0.9, "asr": a, "ra": 0.1} for s, a in zip(seeds, asr)]}]
    run = {"machine": {"cpu": str(seeds)}, "dataset": DS, "train": train or {"epochs": 10}, "rows": rows}
    if model:
        run["model"] = model
    path.write_text(json.dumps(run))
    return str(path)


def test_bench_attacks_merges_seeds_of_several_runs(tmp_path, capsys):
    """Seeds measured in separate runs (seed 0 on one day, seeds 1-2 on another) become one
    mean +- std; a file written before ``--model`` existed counts as the default small-cnn."""
    mod = _bench_module("bench_attacks_merge", "bench_attacks.py")
    a = _attack_run(tmp_path / "a.json", [0], [0.9])
    b = _attack_run(tmp_path / "b.json", [1, 2], [0.8, 1.0], model="small-cnn")
    out = tmp_path / "m.json"
    assert mod.merge([a, b], str(out)) == 0
    merged = json.loads(out.read_text())
    (row,) = merged["rows"]
    assert row["seeds"] == 3 and [s["seed"] for s in row["per_seed"]] == [0, 1, 2]
    assert row["asr_mean"] == pytest.approx(0.9) and row["asr_std"] == pytest.approx(0.1)
    assert merged["sources"] == [{"cpu": "[0]"}, {"cpu": "[1, 2]"}]
    assert "0.900 ± 0.100" in capsys.readouterr().out
    # runs of another recipe are not averaged together: one line naming the file and the field
    c = _attack_run(tmp_path / "c.json", [3], [0.5], train={"epochs": 5})
    assert mod.merge([a, c], str(tmp_path / "x.json")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "c.json" in err and "train" in err
    assert not (tmp_path / "x.json").exists()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"dataset": DS, "rows": [{"attack": "a", "precisions": {}}]}))
    assert mod.merge([a, str(other)], str(tmp_path / "y.json")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other.json" in err and not (tmp_path / "y.json").exists()


def test_the_detector_benchmark_puts_the_clean_models_rate_beside_each_verdict():
    """bench_detectors: each (attack, detector, precision) row pairs the backdoored model's AUROC over
    seeds with the same detector's FRR on the clean model at the same precision (its false-positive
    rate), never another precision's; failed cells are errors, not scores."""
    from types import SimpleNamespace as Row

    summarise = _bench_module("bench_det", "bench_detectors.py").summarise

    def row(attack, defense, comp, seed, status="ok", error=None, **m):
        return Row(attack=attack, defense=defense, compression=comp, seed=seed, status=status, error=error, metrics=m)

    rows = [row("badnets", "strip", "fp32", 0, auroc=0.9, frr=0.05, far=0.1, detected=True, defense_wall=1.0,
                n_eval_clean=100, n_eval_triggered=100),
            row("badnets", "strip", "fp32", 1, auroc=0.7, frr=0.05, far=0.5, detected=False, defense_wall=3.0,
                n_eval_clean=100, n_eval_triggered=100),
            row("badnets", "strip", "int8-ort", 0, status="error", error="boom"),
            row("none", "strip", "fp32", 0, frr=0.02), row("none", "strip", "fp32", 1, frr=0.04),
            row("none", "strip", "int8-ort", 0, frr=0.5),
            row("badnets", "none", "fp32", 0, asr=0.95), row("badnets", "none", "fp32", 1, asr=0.97)]
    out, lines, summ = summarise(rows, ["badnets"], ["badnets"], ["strip"], ["fp32", "int8-ort"], "none", "none")
    fp32, i8 = out[0], out[1]
    assert fp32["seeds"] == [0, 1] and fp32["auroc_mean"] == pytest.approx(0.8)
    assert fp32["auroc_std"] == pytest.approx(0.1414, abs=1e-3)
    assert fp32["clean_model_frr_mean"] == pytest.approx(0.03) and fp32["detected"] == 1
    assert fp32["asr_deployed_mean"] == pytest.approx(0.96)
    assert fp32["s_per_1000_mean"] == pytest.approx(10.0)  # 1 s and 3 s for 200 inputs each
    assert i8["seeds"] == [] and i8["errors"] == ["boom"] and i8["clean_model_frr_mean"] == pytest.approx(0.5)
    assert summ == [["strip", "fp32", 1, "0.800", "0.800", 0]]  # the failed precision has no AUROC to average
    assert [r["clean_model_frr_mean"] for r in out[2:]] == pytest.approx([0.03, 0.5])
