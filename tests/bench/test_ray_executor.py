"""The Ray executor (issue 30): a study run as Ray tasks on a real two-node local cluster, with a
worker process killed mid-run, stores exactly the rows of a local run (metrics bit for bit on CPU,
no run id lost or duplicated), trains each model once, and the driver is the store's one writer.

The cluster is started here as separate processes (``ray start --head`` and a second node joining
it, both on 127.0.0.1, in a temporary directory) and torn down by killing exactly the processes of
that cluster by pid: ``ray stop`` would kill every Ray process on the machine, other users' too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from backdoorlab.bench.cache import ArtifactCache
from backdoorlab.bench.pipeline import Pipeline, execute_cell, run_study
from backdoorlab.bench.store import ResultStore
from backdoorlab.bench.study import Study
from backdoorlab.errors import BackdoorLabError

STUDY = """
name: ray-executor
datasets: [digits]
models: [small-cnn]
attacks: [none, badnets, blended]
compress: [fp32, int8-torch]
defenses: [none]
seeds: [0]
train: {epochs: 4, batch_size: 128, lr: 0.1}
"""
RAY = Path(sys.executable).with_name("ray")  # the venv's ray command
TIMING = ("wall", "latency")  # metric keys that measure time, not the model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_procs(tmp: str) -> list:
    """The processes of the cluster living in ``tmp`` (every daemon names it on its command line)
    and their descendants (the workers), never this process or its parents."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in mine and any(tmp in a for a in p.info["cmdline"] or ()):
                out[p.pid] = p
                out.update({c.pid: c for c in p.children(recursive=True) if c.pid not in mine})
        except psutil.Error:
            pass
    return list(out.values())


def _kill_cluster(tmp: str) -> None:
    import psutil

    for _ in range(3):  # a raylet may start a worker while we kill
        procs = _cluster_procs(tmp)
        if not procs:
            return
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """``(address, env, tmp)`` of a running cluster: a head node with 2 CPUs and a second node with 1."""
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    if not RAY.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    tmp = tempfile.mkdtemp(prefix="bdl-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # never another cluster's
    # no token authentication: with it, a ~/.ray/auth_token some earlier local Ray session left would
    # be used by the head but not by the joining node
    ray_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.update(ray_env, OMP_NUM_THREADS="1")
    saved = {k: os.environ.get(k) for k in [*ray_env, "RAY_ADDRESS"]}
    os.environ.update(ray_env)  # for the drivers this process runs
    os.environ.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    try:
        for cmd in ([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                     f"--temp-dir={tmp}", "--disable-usage-stats"],
                    [str(RAY), "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"]):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
        yield address, env, tmp
    finally:
        _kill_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _plain(metrics):
    """A row's metrics without its timings: what must not depend on the executor."""
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def _metrics(rows):
    return {r.run_id: (r.status, _plain(r.metrics)) for r in rows}


def _busy_workers(tmp: str) -> list:
    """Worker processes of the cluster running a cell now (process title ``ray::run_cell_task``)."""
    import psutil

    out = []
    for p in _cluster_procs(tmp):
        try:
            if (p.cmdline() or [""])[0].startswith("ray::run_cell_task"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_ray_run_with_a_killed_worker_equals_a_local_run(cluster, tmp_path):
    address, env, tmp = cluster
    study_path = tmp_path / "study.yaml"
    study_path.write_text(STUDY)
    study = Study.from_yaml(study_path)
    cells = study.cells()
    home, store_path, err_path = tmp_path / "home", tmp_path / "ray.sqlite", tmp_path / "driver.err"
    store = ResultStore(store_path)
    with open(err_path, "w") as err:
        driver = subprocess.Popen(
            [sys.executable, "-m", "backdoorlab.cli", "run", str(study_path), "--store", str(store_path),
             "--no-progress", "--executor", "ray", "--address", address],
            env={**env, "BACKDOORLAB_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=err)
    killed, before = None, ""
    deadline = time.time() + 240
    while killed is None:  # the first row stored, then kill -9 a worker that is running a cell
        assert driver.poll() is None, f"the study ended before a worker could be killed:\n{err_path.read_text()}"
        assert time.time() < deadline, err_path.read_text()
        try:
            st = store.status(c.run_id for c in cells)
        except BackdoorLabError:  # the store is being created
            st = {}
        busy = _busy_workers(tmp) if "ok" in st.values() else []
        if busy:
            killed = busy[0].pid
            os.kill(killed, signal.SIGKILL)
            before = err_path.read_text()  # the results the driver had logged by then
        time.sleep(0.05)
    assert driver.wait(timeout=300) == 0, err_path.read_text()
    log = err_path.read_text()

    rows = store.rows()
    assert sorted(r.run_id for r in rows) == sorted(c.run_id for c in cells)  # none lost, none twice
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    def pids(text):
        return re.findall(r"^\[\d+/6\] .*pid (\d+).*$", text, re.M)

    assert len(pids(log)) == 6, log  # one result per cell reached the driver, and only one
    # the killed worker's cell was run again by another worker (the killed one may have finished
    # an earlier cell before it took this one)
    assert pids(log).count(str(killed)) == pids(before).count(str(killed)) and len(pids(before)) < 6, log
    # each model trained once, by the first cell of its model (the others loaded it)
    trained = re.findall(r", trained (\w+)", log)
    models = {r.artifacts["train"] for r in rows}
    assert len(models) == 3 and len(trained) == len(set(trained)) and set(trained) <= models, log
    assert len(trained) >= 2, log  # (the killed task may have stored its model before it died)
    assert sorted(p.stem for p in (home / "artifacts" / "train").glob("*.pt")) == sorted(models)
    assert not store.leases()

    # a local run of the same study: the same rows, metrics equal bit for bit (timings aside)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (cpus_per_cell 1): same float sums
    try:
        local = ResultStore(tmp_path / "local.sqlite")
        run_study(study, local, cache=ArtifactCache(tmp_path / "home-local"), log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert _metrics(store.rows()) == _metrics(local.rows())
    assert {r.run_id: r.artifacts for r in local.rows()} == {r.run_id: r.artifacts for r in rows}
    pipe = Pipeline(ArtifactCache(tmp_path / "home-local"), device="cpu", log=lambda s: None)
    assert {pipe.train_key(c) for c in cells} == models  # the driver's grouping key is the cache's

    # a worker whose node does not share the cache gets the model from the first cell's task
    from backdoorlab.bench.ray_executor import run_cell_task

    cell = next(c for c in cells if c.compression == "int8-torch")
    record = pipe.cache.get("train", pipe.train_key(cell))
    try:
        out, shared = run_cell_task(cell, str(tmp_path / "node2"), None, "cpu", 1, record, False)
    finally:
        torch.set_num_threads(threads)
    assert out["trained"] == [] and shared is None and out["status"] == "ok"
    stored = next(r for r in local.rows() if r.run_id == cell.run_id)
    assert _plain(json.loads(json.dumps(out["metrics"]))) == _plain(stored.metrics)


def test_a_killed_driver_resumes_like_a_local_run(cluster, tmp_path):
    """The driver killed with SIGKILL after its first stored row; started again (here through the
    Python API), it runs only the cells not stored, taking over the dead driver's leases, and
    loads the model the first run trained."""
    address, env, tmp = cluster
    raw = {"name": "ray-resume", "datasets": ["digits"], "models": ["small-cnn"], "attacks": ["none"],
           "compress": ["fp32", "int8-torch"], "seeds": [0], "train": {"epochs": 1, "batch_size": 128, "lr": 0.1}}
    study_path = tmp_path / "resume.yaml"
    study_path.write_text(json.dumps(raw))  # JSON is YAML
    study = Study.from_dict(raw)
    home, store, err_path = tmp_path / "home", ResultStore(tmp_path / "r.sqlite"), tmp_path / "driver.err"
    with open(err_path, "w") as err:
        driver = subprocess.Popen(
            [sys.executable, "-m", "backdoorlab.cli", "run", str(study_path), "--store", str(store.path),
             "--no-progress", "--executor", "ray", "--address", address],
            env={**env, "BACKDOORLAB_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 180
    while "ok" not in _status(store, study).values():
        assert driver.poll() is None and time.time() < deadline, err_path.read_text()
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    stored = _status(store, study)
    assert list(stored.values()).count("ok") == 1, stored  # the int8 cell was running: its lease is dead
    msgs: list[str] = []
    rest = run_study(study, store, cache=ArtifactCache(home / "artifacts"), log=msgs.append, executor="ray",
                     address=address)
    assert [(r.compression, r.status) for r in rest] == [("int8-torch", "ok")]
    assert "2 cells, 1 already done, 1 to run" in "\n".join(msgs)
    assert not [m for m in msgs if ", trained " in m]  # the model came from the first run's cache
    assert len(store.rows()) == 2 and not store.leases()


def _status(store, study):
    try:
        return store.status(c.run_id for c in study.cells())
    except BackdoorLabError:  # the store is being created
        return {}


# ------------------------------------------------------------------ no cluster needed
def _small_study(**over):
    return Study.from_dict({"name": "ray-errors", "datasets": ["digits"], "models": ["small-cnn"],
                            "attacks": ["none"], "seeds": [0], "train": {"epochs": 1}, **over})


@pytest.mark.parametrize("kwargs,match", [
    ({"address": "127.0.0.1:1"}, "apply to executor 'ray' only"),
    ({"gpus_per_cell": 0.5}, "apply to executor 'ray' only"),
    ({"executor": "dask"}, "executor must be one of local, ray"),
    ({"executor": "ray", "gpus_per_cell": 1.5}, "gpus_per_cell must be a number in"),
    ({"executor": "ray", "cpus_per_cell": 0}, "cpus_per_cell must be an integer >= 1"),
    ({"executor": "ray", "address": "nowhere"}, "ray address must be HOST:PORT"),
    ({"executor": "ray", "address": f"127.0.0.1:{_free_port()}"}, "cannot reach a Ray cluster at 127.0.0.1"),
])
def test_a_users_mistake_fails_before_any_work(tmp_path, kwargs, match):
    pytest.importorskip("ray")
    store = ResultStore(tmp_path / "r.sqlite")
    t0 = time.monotonic()
    with pytest.raises(BackdoorLabError, match=match):
        run_study(_small_study(), store, cache=ArtifactCache(tmp_path / "home"), log=lambda s: None, **kwargs)
    assert time.monotonic() - t0 < 30
    assert not store.path.exists() and not (tmp_path / "home" / "artifacts" / "train").exists()


def test_study_ray_setting_is_checked_and_not_in_run_ids():
    base = _small_study()
    with_ray = _small_study(ray={"cpus_per_cell": 2, "gpus_per_cell": 0.25, "max_retries": 1})
    assert with_ray.ray.gpus_per_cell == 0.25 and with_ray.ray.cpus_per_cell == 2
    assert [c.run_id for c in with_ray.cells()] == [c.run_id for c in base.cells()]
    for bad, match in [({"cpus": 1}, "no setting 'cpus'"), ({"gpus_per_cell": "a"}, "gpus_per_cell must be"),
                       ({"max_retries": -1}, "max_retries must be an integer >= 0"), ([1], "must be a mapping")]:
        with pytest.raises(BackdoorLabError, match=match):
            _small_study(ray=bad)


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    monkeypatch.setitem(sys.modules, "ray.exceptions", None)
    with pytest.raises(BackdoorLabError, match=r"--executor ray needs ray.*pip install 'backdoorlab\[ray\]'"):
        run_study(_small_study(), ResultStore(tmp_path / "r.sqlite"), executor="ray", log=lambda s: None)
    assert not (tmp_path / "r.sqlite").exists()


def test_cell_errors_have_the_local_semantics():
    """What a worker returns for a failing cell is what a local run stores (the same function)."""

    class Failing:
        def __init__(self, exc):
            self.exc = exc

        def run_cell(self, cell):
            raise self.exc

    out = execute_cell(Failing(RuntimeError("kernel failed")), None)
    assert out["status"] == "error" and out["error"] == "RuntimeError: kernel failed"
    assert "Traceback" in out["metrics"]["traceback"]
    out = execute_cell(Failing(BackdoorLabError("needs trainable")), None)
    assert out["status"] == "error" and out["metrics"] == {}  # a user error: no traceback
    with pytest.raises(TypeError):  # a programming error stops the study
        execute_cell(Failing(TypeError("bug")), None)


def test_driver_raises_a_programming_error_and_stores_a_dead_workers_cell_as_error():
    pytest.importorskip("ray")
    import ray.exceptions

    from backdoorlab.bench.ray_executor import _outcome

    class FakeRay:
        exceptions = ray.exceptions

        def __init__(self, exc):
            self.exc = exc

        def get(self, ref):
            raise self.exc

    try:
        raise KeyError("bug in a method")
    except KeyError as cause:
        task_error = ray.exceptions.RayTaskError("run_cell_task", "remote traceback", cause)
    with pytest.raises(KeyError):
        _outcome(FakeRay(task_error), None, 3)
    out = _outcome(FakeRay(ray.exceptions.WorkerCrashedError()), None, 3)
    assert out["status"] == "error" and "worker died 4 times" in out["error"] and "pid" not in out


def test_cells_run_on_cuda_only_with_gpus():
    from backdoorlab.bench.ray_executor import _cell_device

    assert _cell_device("auto", None, 0) == ("cpu", 0)
    assert _cell_device("auto", None, 2) == ("cuda", 1)
    assert _cell_device("auto", 0.25, 1) == ("cuda", 0.25)  # four cells share a GPU
    assert _cell_device("auto", 0, 4) == ("cpu", 0)
    assert _cell_device("cuda:1", None, 1) == ("cuda", 1)  # Ray picks the GPU: it is cuda:0 to the task
    for args, match in [(("cpu", 0.5, 1), "set gpus_per_cell to 0"), (("cuda", 0, 1), "needs gpus_per_cell > 0"),
                        (("cuda", None, 0), "the Ray cluster has 0")]:
        with pytest.raises(BackdoorLabError, match=match):
            _cell_device(*args)


def test_cli_flags(tmp_path):
    from backdoorlab.cli import main

    study = tmp_path / "s.yaml"
    study.write_text(STUDY)
    assert main(["run", str(study), "--store", str(tmp_path / "r.sqlite"), "--address", "127.0.0.1:1"]) == 2
    assert not (tmp_path / "r.sqlite").exists()
