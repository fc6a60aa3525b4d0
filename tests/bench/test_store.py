import sqlite3

import pandas as pd
import pytest

from backdoorlab.bench.store import ResultStore, Row
from backdoorlab.errors import BackdoorLabError


def _row(i, status="ok", **metrics):
    return Row(f"id{i}", "s", "digits", "small-cnn", "badnets", "fp32", "none", i, {"seed": i}, status,
               metrics=metrics or {"ca": 0.9, "asr": 1.0, "ra": 0.0}, wall_time=1.5)


def test_put_replaces_and_reads_back(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    assert store.status(["id0"]) == {}
    store.put(_row(0, status="running"))
    store.put(_row(0))
    store.put(_row(1, status="error"))
    rows = store.rows()
    assert [r.run_id for r in rows] == ["id0", "id1"]
    assert rows[0].status == "ok" and rows[0].metrics["ca"] == 0.9 and rows[0].config == {"seed": 0}
    assert store.status(["id0", "id1", "id2"]) == {"id0": "ok", "id1": "error"}
    mode = sqlite3.connect(tmp_path / "r.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_frame_and_export(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    for i in range(3):
        store.put(_row(i, ca=0.9 + i / 100, asr=0.5))
    df = store.frame()
    assert list(df["seed"]) == [0, 1, 2] and "ca" in df and "versions" in df
    paths = store.export(tmp_path / "out" / "res")
    assert [p.name for p in paths] == ["res.csv", "res.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(paths[1]), df)
    assert len(pd.read_csv(paths[0])) == 3


def test_missing_and_corrupt_store(tmp_path):
    with pytest.raises(BackdoorLabError, match="no result store"):
        ResultStore(tmp_path / "none.sqlite").rows()
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BackdoorLabError, match="not a SQLite database"):
        ResultStore(bad).rows()


_CREATE_AND_PUT = """
import sys, time
from backdoorlab.bench.store import ResultStore, Row
start = float(sys.argv[2])
while time.time() < start:
    pass
store = ResultStore(sys.argv[1])
for k in range(25):  # each write opens and closes a connection: the WAL file comes and goes
    store.put(Row(run_id=f"r{sys.argv[3]}-{k}", study="s", dataset="d", model="m", attack="a",
                  compression="c", defense="x", seed=0, config={}, status="ok"))
    store.status([f"r{sys.argv[3]}-{k}"])
"""


def test_processes_creating_one_store_at_once(tmp_path):
    """Processes that open a new store at the same instant all write their row: switching the file
    to WAL answers "database is locked" at once, without SQLite's busy timeout (seen in CI as a
    user error from the second of two `backdoorlab run` processes), so the set-up is retried."""
    import subprocess
    import sys
    import time

    path = tmp_path / "race.sqlite"
    start = time.time() + 3.0  # after every interpreter has imported the store
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE_AND_PUT, str(path), str(start), str(i)],
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errs
    want = sorted(f"r{i}-{k}" for i in range(6) for k in range(25))
    assert sorted(r.run_id for r in ResultStore(path).rows()) == want
