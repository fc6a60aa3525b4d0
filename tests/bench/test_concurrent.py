"""Several processes running one study on one store share the work (issue 24, defect 8): each
cell is claimed (a lease with pid, host and heartbeat) before it runs, a finished row is never
rewritten, each model is trained once, and a dead holder's lease is taken over."""

import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from backdoorlab.bench import pipeline
from backdoorlab.bench import store as store_mod
from backdoorlab.bench.cache import ArtifactCache
from backdoorlab.bench.pipeline import run_study
from backdoorlab.bench.store import ResultStore, Row, new_owner, now
from backdoorlab.bench.study import Study

STUDY = """
name: concurrent
datasets: [digits]
models: [small-cnn]
attacks: [none, badnets]
compress: [fp32, int8-torch]
seeds: [0]
train: {epochs: 2, batch_size: 128, lr: 0.1}
"""

CELL_LINE = re.compile(r"^\[\d+/\d+\] (.+?): ", re.M)
TRAIN_LINE = re.compile(r"^training .+ \(train key (\w+)\)$", re.M)


def _start(study, home, store):
    env = {**os.environ, "BACKDOORLAB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "backdoorlab.cli", "run", str(study), "--store", str(store), "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _status(store, run_ids):
    try:
        return store.status(run_ids)
    except Exception:  # the store may not exist yet, or be mid-creation
        return {}


def test_two_processes_share_the_work(tmp_path):
    study = tmp_path / "concurrent.yaml"
    study.write_text(STUDY)
    cells = Study.from_yaml(study).cells()
    labels = {" ".join([*c.labels.values(), f"seed={c.seed}"]) for c in cells}
    home, store_path = tmp_path / "home", tmp_path / "shared.sqlite"
    store = ResultStore(store_path)
    procs = [_start(study, home, store_path) for _ in range(2)]
    # stderr is drained by threads so that neither child blocks on a full pipe while we poll
    outs: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda p=p, o=o: o.append(p.communicate(timeout=600)[1]))
               for p, o in zip(procs, outs, strict=True)]
    for t in readers:
        t.start()
    seen_ok: set[str] = set()
    deadline = time.time() + 600
    while any(p.poll() is None for p in procs):
        st = _status(store, [c.run_id for c in cells])
        regressed = {rid: s for rid, s in st.items() if rid in seen_ok and s != "ok"}
        assert not regressed, f"a finished row went back: {regressed}"
        seen_ok |= {rid for rid, s in st.items() if s == "ok"}
        assert time.time() < deadline, "the two runs did not finish in time"
        time.sleep(0.2)
    for t in readers:
        t.join()
    errs = [o[0] for o in outs]
    assert [p.returncode for p in procs] == [0, 0], errs

    rows = store.rows()
    assert len(rows) == len(cells) == 4 and all(r.status == "ok" for r in rows)
    assert {r.run_id for r in rows} == {c.run_id for c in cells}
    assert seen_ok <= {r.run_id for r in rows}

    ran = [CELL_LINE.findall(e) for e in errs]
    assert all(len(r) == len(set(r)) for r in ran), ran
    assert not set(ran[0]) & set(ran[1]), ran  # no cell ran twice
    assert set(ran[0]) | set(ran[1]) == labels, ran  # and together they cover the study
    trained = TRAIN_LINE.findall(errs[0]) + TRAIN_LINE.findall(errs[1])
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 2, errs  # each model once
    assert {r.artifacts["train"] for r in rows} == set(trained)
    # both came to the study while work was left (otherwise this test proved nothing)
    assert all(re.search(r"4 cells, [0-3] already done", e) for e in errs), errs
    assert not store.leases()

    # the same numbers as one process alone (a model loaded from the other process's training)
    alone_path = tmp_path / "alone.sqlite"
    alone = _start(study, tmp_path / "home2", alone_path)
    err = alone.communicate(timeout=600)[1]
    assert alone.returncode == 0, err
    assert _metrics(ResultStore(alone_path)) == _metrics(store)


def _metrics(store):
    return {r.run_id: (r.status, r.metrics["ca"], r.metrics["asr"], r.metrics["ra"]) for r in store.rows()}


# ------------------------------------------------------------------ leases, in one process
def _put_lease(path, run_id, pid, host=None, heartbeat=None, owner="someone-else"):
    con = sqlite3.connect(path)
    with con:
        con.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                    (run_id, owner, pid, host or socket.gethostname(), now() if heartbeat is None else heartbeat))
    con.close()


def _row(run_id, status, finished_at=None):
    return Row(run_id, "s", "digits", "small-cnn", "none", "fp32", "none", 0, {}, status,
               metrics={"ca": 1.0, "asr": 0.0, "ra": 1.0}, finished_at=finished_at)


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def test_dead_holder_is_taken_over_live_one_is_not(tmp_path, sleeper, monkeypatch):
    store = ResultStore(tmp_path / "r.sqlite")
    me = new_owner()
    assert store.claim("a", me)  # creates the store and its leases table
    assert store.claim("a", me)  # its own lease: still held

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that has exited (and been reaped)
    _put_lease(store.path, "b", dead.pid)
    assert store.claim("b", me)  # fresh heartbeat, but its process is gone
    assert store.leases()["b"]["owner"] == me

    _put_lease(store.path, "c", sleeper.pid)  # a live process with a fresh heartbeat
    assert store.leases()["c"]["alive"]
    assert not store.claim("c", me)
    _put_lease(store.path, "c", sleeper.pid, heartbeat=now() - store_mod.LEASE_STALE_S - 1)
    assert store.claim("c", me)  # alive, but its heartbeat stopped: stale

    _put_lease(store.path, "d", 1, host="some-other-host")  # another host: only the heartbeat counts
    assert not store.claim("d", me)
    monkeypatch.setattr(store_mod, "LEASE_STALE_S", 0.2)
    time.sleep(0.3)
    assert store.claim("d", me)

    monkeypatch.setattr(store_mod, "LEASE_STALE_S", 120.0)
    _put_lease(store.path, "e", sleeper.pid, heartbeat=now() - 60)
    assert store.heartbeat("someone-else") == 1  # refreshes that owner's leases
    assert store.leases()["e"]["heartbeat"] > now() - 5
    store.release("e", me)  # not its lease: nothing happens
    assert not store.claim("e", me)
    store.release("e", "someone-else")
    assert store.claim("e", me)


def test_finished_rows_are_never_rewritten(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    me, other = new_owner(), new_owner()
    assert store.claim("a", me)
    store.put(_row("a", "running"))
    assert store.finish(_row("a", "ok"), me)
    assert not store.leases()  # finish drops the lease
    assert not store.claim("a", other)  # an ok cell is not claimed
    store.put(_row("a", "running"))  # nor rewritten by put
    assert not store.finish(_row("a", "error"), other)
    assert not store.finish(_row("a", "ok"), other)
    assert store.status(["a"]) == {"a": "ok"}

    since = now()
    store.put(_row("old", "error", finished_at=since - 10))  # failed before this run: retried
    store.put(_row("new", "error", finished_at=since + 1))  # failed during this run: not rerun
    assert store.settled(["a", "old", "new", "absent"], since) == {"a", "new"}
    assert store.claim("old", me, since) and not store.claim("new", me, since)
    assert store.claim("new", me)  # without a bound, an error row is retried


def test_old_store_gets_leases(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(store_mod.SCHEMA.split("CREATE TABLE IF NOT EXISTS leases")[0])
    con.close()
    store = ResultStore(path)
    assert store.leases() == {}  # read-only: no table yet, no error
    assert store.claim("x", new_owner())
    assert list(store.leases()) == ["x"]


def test_run_study_waits_for_a_live_holder_then_takes_over(tmp_path, sleeper, monkeypatch):
    """A cell held by a live process is waited for, not run; when its holder dies, it is run."""
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pipeline, "WAIT_POLL_S", 0.2)
    study = Study.from_dict({"name": "wait", "datasets": ["digits"], "models": ["small-cnn"],
                             "attacks": ["none"], "compress": ["fp32", "int8-torch"],
                             "train": {"epochs": 1, "batch_size": 128, "lr": 0.1}})
    cells = study.cells()
    store = ResultStore(tmp_path / "r.sqlite")
    assert store.claim("init", "x")  # create the store
    _put_lease(store.path, cells[1].run_id, sleeper.pid)
    lines: list[str] = []
    seen: dict[str, str] = {}

    def kill_holder_when_waiting():
        deadline = time.time() + 120
        while not any(line.startswith("waiting for") for line in lines) and time.time() < deadline:
            time.sleep(0.05)
        seen.update(store.status(c.run_id for c in cells))  # while the holder lives
        sleeper.kill()
        sleeper.wait()

    killer = threading.Thread(target=kill_holder_when_waiting, daemon=True)
    killer.start()
    rows = run_study(study, store, cache=ArtifactCache(tmp_path / "art"), log=lines.append)
    killer.join(timeout=5)
    assert seen == {cells[0].run_id: "ok"}, lines  # the held cell was not touched while held
    assert [r.run_id for r in rows] == [c.run_id for c in cells], lines
    assert all(r.status == "ok" for r in rows)
    assert sum(line.startswith("training ") for line in lines) == 1, lines
    assert "waiting for 1 cells held by other processes" in lines
    assert set(store.leases()) == {"init"}
