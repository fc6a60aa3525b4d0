"""The Ray executor: a study's cells as Ray tasks on a cluster, with the driver the store's one writer.

``backdoorlab run STUDY.yaml --executor ray [--address HOST:PORT]`` (or
``run_study(..., executor="ray", address=...)``) runs the same cells as the local executor and
writes the same rows; what changes is where the cells run:

- **One task per cell**, asking for ``cpus_per_cell`` CPUs (the worker sets torch's threads to
  that) and ``gpus_per_cell`` GPUs (fractional allowed, e.g. 0.25: four cells share a GPU).
- **Each model is trained once.** Cells are grouped by their train key
  (:meth:`~backdoorlab.bench.pipeline.Pipeline.train_key`: every compression x defense cell of a
  dataset x model x attack x seed shares one). A group's first cell is submitted at once and
  trains the model; the rest of the group is submitted when it has finished, and runs in parallel
  on any workers, loading the model from the artifact cache. The first cell's task also hands the
  trained artifact to the group's other tasks through Ray's object store, so a worker whose node
  does not share ``BACKDOORLAB_HOME`` gets the model without training it again (other artifacts,
  e.g. an attack's assets, are shared only through a shared ``BACKDOORLAB_HOME``).
- **Only the driver writes the result store**, one transaction per finished cell
  (:meth:`~backdoorlab.bench.store.ResultStore.finish`), as each result arrives (``ray.wait``).
  Workers return the row's fields. A worker that dies loses only the cell it was running, which
  Ray runs again (``max_retries`` times; after that the cell's row says ``error`` and the next run
  retries it). The driver holds the leases of the cells it has submitted (as a local run does, see
  :func:`~backdoorlab.bench.pipeline.run_study`), so a driver killed and started again resumes:
  the cells already stored are skipped, and its dead leases are taken over.

A method's failure inside a cell becomes an ``error`` row with its traceback, as in a local run;
a programming error outside a method (an exception the local executor would not catch) stops the
study and is raised on the driver with the worker's traceback; a user's mistake (a bad study,
option or address) fails before any cell runs.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import BackdoorLabError, check

#: The name of the Ray task running one cell (its worker's process title is ``ray::run_cell_task``).
TASK_NAME = "run_cell_task"


@dataclass(frozen=True)
class RayOptions:
    """Resources and retries of the Ray executor; a study's ``ray:`` setting, CLI flags override it.

    cpus_per_cell: CPUs each cell's task asks for; the worker runs torch with that many threads.
    gpus_per_cell: GPUs each cell's task asks for; a fraction (0.25) lets cells share one GPU.
        ``null``: 1 where the cell runs on CUDA (``device: cuda``, or ``auto`` on a cluster with
        GPUs), else 0.
    max_retries: how many times Ray runs a cell again whose worker died (the row is never written
        twice: only a finished task's result is stored).
    """

    cpus_per_cell: int = 1
    gpus_per_cell: float | None = None
    max_retries: int = 3

    def validate(self) -> None:
        from ..config import check_fields

        check_fields(self, "ray")
        check(self.cpus_per_cell >= 1, f"ray cpus_per_cell must be an integer >= 1, got {self.cpus_per_cell!r}")
        g = self.gpus_per_cell
        check(g is None or (0 <= g and (g <= 1 or float(g).is_integer())),
              f"ray gpus_per_cell must be a number in [0, 1] or a whole number of GPUs, got {g!r}")
        check(self.max_retries >= 0, f"ray max_retries must be an integer >= 0, got {self.max_retries!r}")

    def replace(self, **over: Any) -> RayOptions:
        """These options with the given ones that are not ``None`` put in their place, validated."""
        import dataclasses

        out = dataclasses.replace(self, **{k: v for k, v in over.items() if v is not None})
        out.validate()
        return out


# ------------------------------------------------------------------------------ worker side
_PIPELINES: dict[tuple[str, str | None, str], Any] = {}


def run_cell_task(cell: Any, cache_root: str, data_dir: str | None, device: str, threads: int,
                  train_record: dict[str, Any] | None, share: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run one cell in a Ray worker; returns ``(outcome, train_record)``.

    ``outcome``: the row's fields (:func:`~backdoorlab.bench.pipeline.execute_cell`) plus ``trained``
    (the train keys this task really trained), ``versions``, ``started_at``, ``host`` and ``pid``.
    ``train_record``: with ``share`` (a model's first cell), the cell's trained artifact as cached,
    for the other cells of its model; else ``None``.
    A worker keeps one pipeline (its in-memory dataset, model and classifier) across the cells it runs.
    """
    import torch

    from .cache import ArtifactCache
    from .pipeline import Pipeline, execute_cell
    from .store import now, versions

    torch.set_num_threads(threads)
    key = (cache_root, data_dir, device)
    pipe = _PIPELINES.get(key)
    if pipe is None:
        _PIPELINES.clear()
        pipe = _PIPELINES[key] = Pipeline(ArtifactCache(cache_root), data_dir, device, progress=False)
    if train_record is not None:  # this node's cache may not be the trainer's: seed it
        tkey = train_record["meta"]["key"]
        with pipe.cache.lock("train", tkey):
            if not pipe.cache.path("train", tkey).exists():
                pipe.cache.put("train", tkey, train_record)
    started, n_trained = now(), len(pipe.trained)
    out = execute_cell(pipe, cell)
    out.update(trained=pipe.trained[n_trained:], versions=versions(), started_at=started,
               host=socket.gethostname(), pid=os.getpid())
    tkey = out["artifacts"].get("train")
    record = pipe.cache.get("train", tkey) if share and tkey else None
    return out, record


# ------------------------------------------------------------------------------ driver side
def _cell_device(device: str, gpus: float | None, cluster_gpus: float) -> tuple[str, float]:
    """The device string a worker runs a cell on, and the GPUs its task asks for."""
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") or (device == "auto" and cluster_gpus > 0) else 0.0
    if gpus > 0:
        check(not device.startswith("cpu"), f"device {device!r} with gpus_per_cell {gpus:g}: "
                                            f"set gpus_per_cell to 0 or the device to cuda or auto")
        check(cluster_gpus >= gpus, f"cells ask for {gpus:g} GPU each, but the Ray cluster has "
                                    f"{cluster_gpus:g}; start workers with GPUs or set gpus_per_cell 0")
        return "cuda", gpus  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gives the task
    check(not device.startswith("cuda"), f"device {device!r} needs gpus_per_cell > 0 with --executor ray")
    return "cpu", 0.0


def connect(ray: Any, address: str | None) -> bool:
    """Connect to the cluster at ``address`` (``None``: ``$RAY_ADDRESS``, else a local one started
    here); returns whether this call connected (and so should disconnect). A ``HOST:PORT`` that
    nothing listens on fails at once with one line (Ray itself would retry for minutes)."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target and target != "auto" and "://" not in target:
        host, sep, port = target.rpartition(":")
        check(sep == ":" and host != "" and port.isdigit(), f"ray address must be HOST:PORT, got {target!r}")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise BackdoorLabError(f"cannot reach a Ray cluster at {target}: {exc.strerror or exc}; "
                                   f"start one with `ray start --head` or give its --address") from None
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        raise BackdoorLabError(f"cannot connect to a Ray cluster at {target or 'a new local one'}: {exc}") from None
    return True


def run_ray(study: Any, store: Any, pipe: Any, todo: list[Any], *, owner: str, since: float,
            log: Callable[[str], None], address: str | None, options: RayOptions, device: str) -> list[Any]:
    """Run ``todo`` (bound cells of ``study``, prepared by ``pipe``) on a Ray cluster; the driver's
    half of :func:`~backdoorlab.bench.pipeline.run_study` (see the module docstring)."""
    from .pipeline import WAIT_POLL_S, _Heartbeat, cell_line, new_row
    from .store import versions

    ray = _import_ray()
    groups: dict[str, list[Any]] = {}  # train key -> its cells, in study order
    keys: dict[str, str] = {}
    for c in todo:
        keys[c.run_id] = k = pipe.train_key(c)
        groups.setdefault(k, []).append(c)
    own = connect(ray, address)
    try:
        cluster = ray.cluster_resources()
        cell_device, gpus = _cell_device(device, options.gpus_per_cell, float(cluster.get("GPU", 0)))
        check(float(cluster.get("CPU", 0)) >= options.cpus_per_cell,
              f"cells ask for {options.cpus_per_cell} CPUs each, but the Ray cluster has {cluster.get('CPU', 0):g}")
        log(f"ray: {len(todo)} cells of {len(groups)} models on {cluster.get('CPU', 0):g} CPUs, "
            f"{cluster.get('GPU', 0):g} GPUs; each cell {options.cpus_per_cell} CPU, {gpus:g} GPU")
        task = ray.remote(run_cell_task).options(
            num_cpus=options.cpus_per_cell, num_gpus=gpus, max_retries=options.max_retries, num_returns=2,
            name=TASK_NAME)
        root = str(pipe.cache.root.resolve())
        data_dir = None if pipe.data_dir is None else str(os.path.abspath(pipe.data_dir))
        rows: list[Any] = []
        pending: dict[Any, tuple[Any, Any]] = {}  # outcome ref -> (cell, train-record ref)
        trained: set[str] = set()  # train keys whose first cell has finished
        training: dict[str, list[Any]] = {}  # train key -> claimed cells waiting for its first cell
        records: dict[str, Any] = {}  # train key -> the ref of its trained artifact, while cells need it
        left: dict[str, int] = {}  # train key -> its cells submitted or waiting, not finished
        held: dict[str, Any] = {}  # cells another process held when we came to them
        vers = versions()

        def submit(cell: Any, record: Any = None, share: bool = False) -> None:
            out_ref, rec_ref = task.remote(cell, root, data_dir, cell_device, options.cpus_per_cell, record, share)
            pending[out_ref] = (cell, rec_ref)

        def start(cell: Any) -> None:  # a cell whose lease we hold
            k = keys[cell.run_id]
            left[k] = left.get(k, 0) + 1
            if k in trained:
                submit(cell, records.get(k))
            elif k in training:  # its model is being trained: wait for it
                training[k].append(cell)
            else:  # the first cell of its model: it trains it (or loads it from the cache)
                training[k] = []
                submit(cell, share=True)

        with _Heartbeat(store, owner):
            try:
                for c in todo:  # the first cell of every model first, so the trainings start at once
                    if store.claim(c.run_id, owner, since):
                        start(c)
                    elif c.run_id not in store.settled([c.run_id], since):
                        held[c.run_id] = c
                done, waiting, last_poll = 0, -1, time.monotonic()
                while pending or held:
                    if pending:
                        ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_POLL_S)
                    else:
                        ready = []
                        time.sleep(WAIT_POLL_S)
                    for ref in ready:
                        cell, rec_ref = pending.pop(ref)
                        try:
                            out = _outcome(ray, ref, options.max_retries)
                        except BaseException:
                            pending[ref] = (cell, rec_ref)  # its lease is released below
                            raise
                        k = keys[cell.run_id]
                        if k not in trained:  # the model's first cell: its followers may start
                            trained.add(k)
                            if "pid" in out:  # the task returned: its second return is the artifact
                                records[k] = rec_ref
                            for f in training.pop(k, []):
                                submit(f, records.get(k))
                        left[k] -= 1
                        if left[k] == 0:  # free the object store of a model no cell needs now
                            records.pop(k, None)
                        row = new_row(study.name, cell, out.get("versions") or vers)
                        for f in ("status", "metrics", "artifacts", "error", "wall_time", "started_at",
                                  "finished_at"):
                            if out.get(f) is not None:
                                setattr(row, f, out[f])
                        written = store.finish(row, owner)
                        rows.append(row)
                        done += 1
                        where = f", {out['host']} pid {out['pid']}" if "pid" in out else ""
                        note = "".join(f", trained {t}" for t in out.get("trained", []))
                        log(cell_line(done, len(todo), cell, row, written, f"{where}{note}"))
                    if held and (not pending or time.monotonic() - last_poll >= WAIT_POLL_S):
                        last_poll = time.monotonic()
                        for rid in store.settled(held, since):
                            del held[rid]
                        leases = store.leases()
                        for rid, c in list(held.items()):
                            lease = leases.get(rid)
                            if (lease is None or not lease["alive"]) and store.claim(rid, owner, since):
                                del held[rid]  # its holder died
                                start(c)
                        if held and not pending and len(held) != waiting:
                            waiting = len(held)
                            log(f"waiting for {waiting} cells held by other processes")
            except BaseException:
                # a programming error in a cell, or the driver interrupted: the cells not finished go
                # back to whoever runs the study next (the leases dropped, the tasks cancelled)
                for ref, (cell, _) in pending.items():
                    _quietly(lambda r=ref: ray.cancel(r, force=True))
                    _quietly(lambda c=cell: store.release(c.run_id, owner))
                for fs in training.values():
                    for c in fs:
                        _quietly(lambda c=c: store.release(c.run_id, owner))
                raise
        return rows
    finally:
        if own:
            ray.shutdown()


def _outcome(ray: Any, ref: Any, retries: int) -> dict[str, Any]:
    """The outcome a cell's task returned. A task whose workers died ``retries + 1`` times (or whose
    node was lost) gives an ``error`` outcome; an exception in the cell that the local executor
    would not catch either (a programming error) is raised, with the worker's traceback."""
    import traceback

    from .store import now

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None
    except ray.exceptions.RayError as exc:  # a system failure: the worker or its node died
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"status": "error", "error": f"{type(exc).__name__}: the cell's worker died {retries + 1} times "
                                            f"(ray max_retries={retries}): {msg}",
                "metrics": {"traceback": traceback.format_exc(limit=2)}, "finished_at": now()}


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # cleaning up after a failure: keep the original exception
        pass


def _import_ray() -> Any:
    from ..errors import require_extra

    require_extra("ray.exceptions", "ray", "--executor ray")  # ray, and the exception types used here
    import ray

    return ray
