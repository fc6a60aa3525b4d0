"""The Ray executor against the local one on the same small study, on this machine (issue 30).

One study (digits, small-cnn, 4 attacks x 2 compressions = 8 cells, 4 models) is run

- ``local-1t``: the local executor, torch with 1 thread (what each Ray cell gets);
- ``local-2t``: the local executor, torch with 2 threads (the plain alternative on a 2-core box);
- ``ray-1w`` / ``ray-2w``: the Ray executor on a local Ray cluster of 1 / 2 worker CPUs
  (``ray.init(num_cpus=N)`` in this process; one cell per CPU, 1 thread each),

each twice: ``cold`` (empty artifact cache: every model is trained) and ``warm`` (a new result
store on the cache the cold run filled: no training, so the cells are short and the executor's
own cost shows). Every run is a fresh Python process (so a local run, like each Ray worker, pays
its process's first-use costs: the dataset decode, the int8 kernels' set-up) and each Ray run a
fresh Ray session (worker start-up counted); imports and the session's own start (``ray.init``)
are not in the wall time, ``ray.init`` is reported apart. Per cell: the run's wall time over the
number of cells; ``overhead_per_cell_s``: that minus the local run's (same cache state,
``local-1t``) for ``ray-1w``, the executor's cost per cell when nothing runs in parallel.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py [--epochs 4] [--out FILE]

Writes ``benchmarks/results/ray_executor.json``. Other processes on the machine slow every
configuration; the load average before and after each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table, write  # noqa: E402

ATTACKS = ["none", "badnets", "blended", "sig"]


def study(epochs: int):
    from backdoorlab.bench.study import Study

    return Study.from_dict({"name": "bench-ray", "datasets": ["digits"], "models": ["small-cnn"],
                            "attacks": ATTACKS, "compress": ["fp32", "int8-torch"], "seeds": [0],
                            "train": {"epochs": epochs, "batch_size": 128, "lr": 0.1}})


def run(name: str, st, root: Path, cache_dir: Path, tag: str) -> dict:
    """One configuration in a fresh Python process (this script with ``--one``)."""
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--one", name, "--tag", tag, "--root", str(root), "--cache", str(cache_dir),
           "--epochs", str(st.train.epochs)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{name:9s} {tag}: {out['wall_s']:6.1f} s, {out['wall_per_cell_s']:5.2f} s/cell "
          f"(in cells {out['in_cell_s']:5.1f} s)"
          + (f", ray.init {out['ray_init_s']:.1f} s" if out["ray_init_s"] is not None else "")
          + f", load {out['load_before']:.1f}", flush=True)
    return out


def run_here(name: str, st, root: Path, cache_dir: Path, tag: str) -> dict:
    import ray
    import torch

    from backdoorlab.bench.cache import ArtifactCache
    from backdoorlab.bench.pipeline import run_study
    from backdoorlab.bench.store import ResultStore

    store = ResultStore(root / f"{name}-{tag}.sqlite")
    cache = ArtifactCache(cache_dir)
    load0 = os.getloadavg()[0]
    init_s = None
    kwargs: dict = {}
    if name.startswith("ray"):
        workers = int(name.split("-")[1][0])
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _temp_dir=str(root / "ray"))
        init_s = time.perf_counter() - t0
        kwargs = {"executor": "ray", "cpus_per_cell": 1}
    else:
        torch.set_num_threads(int(name.split("-")[1][0]))
    try:
        t0 = time.perf_counter()
        rows = run_study(st, store, cache=cache, log=lambda s: None, **kwargs)
        wall = time.perf_counter() - t0
    finally:
        if name.startswith("ray"):
            ray.shutdown()
    assert len(rows) == len(st.cells()) and all(r.status == "ok" for r in rows), [r.error for r in rows]
    cells = sum(r.wall_time for r in rows)
    out = {"config": name, "cache": tag, "cells": len(rows), "wall_s": wall, "wall_per_cell_s": wall / len(rows),
           "in_cell_s": cells, "in_cell_per_cell_s": cells / len(rows), "ray_init_s": init_s,
           "load_before": load0, "load_after": os.getloadavg()[0],
           "metrics": {r.run_id: {k: r.metrics[k] for k in ("ca", "asr", "ra")} for r in rows}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local session: no token written to ~/.ray
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of our own, never someone else's
    st = study(args.epochs)
    if args.one:
        import json

        print(json.dumps(run_here(args.one, st, Path(args.root), Path(args.cache), args.tag)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        for name in ("local-1t", "ray-1w", "ray-2w", "local-2t"):
            for tag in ("cold", "warm"):
                results.append(run(name, st, root, root / f"cache-{name}", tag))
    by = {(r["config"], r["cache"]): r for r in results}
    ref = by[("local-1t", "cold")]["metrics"]
    # every executor at one thread per cell: the same numbers (2 threads may round differently)
    same = all(r["metrics"] == ref for r in results if r["config"] != "local-2t")
    same_2t = all(r["metrics"] == ref for r in results if r["config"] == "local-2t")
    for r in results:
        base = by[("local-1t", r["cache"])]
        r["overhead_per_cell_s"] = r["wall_per_cell_s"] - base["wall_per_cell_s"]
        r["speedup_vs_local_1t"] = base["wall_s"] / r["wall_s"]
        r["speedup_vs_local_2t"] = by[("local-2t", r["cache"])]["wall_s"] / r["wall_s"]
        del r["metrics"]
    rows = [[r["config"], r["cache"], r["wall_s"], r["wall_per_cell_s"], r["overhead_per_cell_s"],
             r["speedup_vs_local_1t"], r["speedup_vs_local_2t"], r["ray_init_s"] or "", r["load_before"]]
            for r in results]
    print(table(["config", "cache", "wall s", "s/cell", "overhead s/cell vs local-1t", "speed-up vs local-1t",
                 "speed-up vs local-2t", "ray.init s", "load avg"], rows))
    print(f"metrics (CA/ASR/RA) identical across executors at 1 thread: {same}; local-2t too: {same_2t}")
    path = write("ray_executor", {"study": {"dataset": "digits", "model": "small-cnn", "attacks": ATTACKS,
                                            "compress": ["fp32", "int8-torch"], "epochs": args.epochs,
                                            "cells": len(st.cells()), "models": len(ATTACKS)},
                                  "metrics_identical": same, "metrics_identical_local_2t": same_2t,
                                  "runs": results,
                                  "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py "
                                             f"--epochs {args.epochs}"}, args.out)
    print(path)


if __name__ == "__main__":
    main()
