"""Benchmark result files: a rerun of part of a benchmark updates what it measured and keeps the
rest (``benchmarks/bench_compression_backdoors.py --only``, BENCHMARKS.md cites those rows)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def merged_rows():
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_cb", BENCH / "bench_compression_backdoors.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod.merged_rows


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
