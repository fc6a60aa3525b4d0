"""The ``backdoorlab`` command: a thin layer over the Python API.

Errors a user can cause print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import BackdoorLabError


def _store_path(arg: str | None) -> Path:
    from .utils import home

    return Path(arg) if arg else home() / "results.sqlite"


def cmd_run(args: argparse.Namespace) -> int:
    from .bench.pipeline import run_study
    from .bench.store import ResultStore
    from .bench.study import Study, bind_sources
    from .report.table import aggregate_table

    if args.data and not Path(args.data).is_dir():
        raise BackdoorLabError(f"--data {args.data} is not a directory")
    study = Study.from_yaml(args.study, variant="gpu" if args.gpu else args.variant)
    cells = study.select(args.only)
    # names, values and data files, before anything is written (with Ray, the workers' devices are theirs)
    study.validate(args.data, cells=cells, check_device=args.executor == "local")
    if args.dry_run:
        print(describe_cells(study.name, cells))
        return 0
    cells = bind_sources(cells, args.data)  # run ids by the content of the files the cells read
    store = ResultStore(_store_path(args.store))
    store.check_writable()
    run_study(study, store, data_dir=args.data, device=args.device,
              progress=False if args.no_progress else None, cells=cells, executor=args.executor,
              address=args.address, cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell)
    rows = store.rows(study.name)
    run_ids = {c.run_id for c in cells}
    rows = [r for r in rows if r.run_id in run_ids]
    print(aggregate_table(rows))
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} cells failed; see `backdoorlab results`", file=sys.stderr)
        return 1
    return 0


def describe_cells(name: str, cells) -> str:
    """``study NAME: N cells = 2 datasets x 1 model x ... ; T trained models`` for a dry run."""
    axes = (("dataset", "datasets"), ("model", "models"), ("attack", "attacks"), ("seed", "seeds"),
            ("compression", "precisions"), ("defense", "defenses"))
    counts = [(len({str(c.seed) if a == "seed" else c.labels[a] for c in cells}), w) for a, w in axes]
    trained = len({(c.labels["dataset"], c.labels["model"], c.labels["attack"], c.seed) for c in cells})
    return (f"study {name}: {len(cells)} cells = " + " x ".join(f"{n} {w if n != 1 else w[:-1]}" for n, w in counts)
            + f"; {trained} trained models; nothing run (--dry-run)")


def cmd_results(args: argparse.Namespace) -> int:
    from .bench.store import ResultStore
    from .report.aggregate import detection_table
    from .report.table import aggregate_table, results_table

    rows = ResultStore(_store_path(args.store)).rows(args.study)
    if not rows:
        print("no results" + (f" for study {args.study!r}" if args.study else ""))
        return 0
    print(aggregate_table(rows, wide=args.wide) if args.aggregate else results_table(rows, wide=args.wide))
    if args.aggregate and any(r.defense != "none" for r in rows):
        print()
        print(detection_table(rows, wide=args.wide))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bench.cache import ArtifactCache
    from .bench.store import ResultStore
    from .report.html import write_report

    store = ResultStore(_store_path(args.store))
    rows = store.rows(args.study)
    if not rows:
        if args.study and store.rows():
            known = sorted({r.study for r in store.rows()})
            raise BackdoorLabError(f"no study {args.study!r} in {store.path} (has: {', '.join(known)})")
        raise BackdoorLabError(f"result store {store.path} holds no results" +
                               (f" for study {args.study!r}" if args.study else ""))
    title = f"backdoorlab report: {args.study}" if args.study else "backdoorlab report"
    print(write_report(rows, args.out, cache=ArtifactCache(args.cache) if args.cache else ArtifactCache(),
                       title=title))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bench.store import ResultStore

    for p in ResultStore(_store_path(args.store)).export(args.out, args.format, args.study):
        print(p)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import fetch

    path = fetch(args.name, args.dest, base_url=args.mirror, progress=sys.stderr.isatty())
    print(path if path is not None else f"dataset {args.name!r} needs no download: it ships with its library")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from .scanning import scan

    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise BackdoorLabError(f"--out {out} exists and is not a directory")
    report = scan(args.model, data=args.data, arch=args.arch, input_size=args.input_size, budget=args.budget,
                  seed=args.seed, progress=False if args.no_progress else sys.stderr.isatty())
    if args.out:
        report.write_html(args.out)
    if args.json:
        print(report.to_json())
    else:
        targets = ", ".join(map(str, report.targets)) or "none"
        fpr = f", false-positive rate {report.fpr:.2f} on {report.fpr_models or ''} clean models".replace("  ", " ") \
            if report.fpr is not None else ""
        score = "" if report.score is None else f" (score {report.score:.3g} vs threshold " \
            f"{report.threshold if report.threshold is None else format(report.threshold, '.3g')}{fpr})"
        print(f"{report.verdict}{score}; suspected target: {targets}"
              + (f"; victims: {', '.join(map(str, report.victims))}" if report.victims else ""))
        for o in report.scanners:
            state = o.error and f"not run: {o.error}" or f"score {o.score:.3g}, {'over' if o.over else 'under'} " \
                f"threshold, {o.seconds:.1f} s on {o.ran_on}"
            print(f"  {o.name}: {state}")
        for n in report.model["notes"]:
            print(f"  note: {n}")
        if args.out:
            print(f"  report: {Path(args.out) / 'index.html'}")
    return report.exit_status


def cmd_list(args: argparse.Namespace) -> int:
    from .attacks import ATTACKS
    from .compress import COMPRESSIONS
    from .data import DATASETS
    from .defenses import DEFENSES
    from .models import MODELS

    regs = {"datasets": DATASETS, "models": MODELS, "attacks": ATTACKS,
            "compress": COMPRESSIONS, "defenses": DEFENSES}
    for kind in [args.kind] if args.kind else regs:
        print(f"{kind}: {', '.join(regs[kind].names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="backdoorlab", description="Backdoor attacks and defenses "
                                "for image classifiers as they are deployed.")
    p.add_argument("--version", action="version", version=f"backdoorlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a study YAML (resumable)")
    r.add_argument("study", help="path to a study .yaml")
    r.add_argument("--data", help="directory holding the datasets (else $BACKDOORLAB_DATA)")
    r.add_argument("--store", help="result store (default $BACKDOORLAB_HOME/results.sqlite)")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default: the study's, else auto)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--variant", help="run one of the study's variants (its 'variants:' settings)")
    r.add_argument("--gpu", action="store_true", help="same as --variant gpu")
    r.add_argument("--dry-run", action="store_true",
                   help="validate the study (names, values, the selected cells' data files) and print its cell "
                   "count; run and write nothing")
    r.add_argument("--only", action="append", metavar="AXIS=VALUE",
                   help="run only matching cells, e.g. --only dataset=gtsrb --only seed=0 (repeatable)")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: cells one after another in this process (default); ray: cells as tasks on a "
                   "Ray cluster, this process writing the store")
    r.add_argument("--address", help="with --executor ray: the cluster's HOST:PORT (default $RAY_ADDRESS, "
                   "else a local cluster started for this run)")
    r.add_argument("--cpus-per-cell", type=int, metavar="N",
                   help="with --executor ray: CPUs (torch threads) per cell (default: the study's ray setting, else 1)")
    r.add_argument("--gpus-per-cell", type=float, metavar="F",
                   help="with --executor ray: GPUs per cell, a fraction shares one (e.g. 0.25; default: 1 where "
                   "cells run on CUDA, else 0)")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("results", help="print the result table")
    s.add_argument("--store")
    s.add_argument("--study", help="only this study")
    s.add_argument("--aggregate", action="store_true", help="mean ± std over seeds")
    s.add_argument("--wide", action="store_true",
                   help="full specs in the table (default: short labels, full specs listed below it)")
    s.set_defaults(fn=cmd_results)

    h = sub.add_parser("report", help="write a self-contained HTML report (tables, figures, triggers) and the "
                       "deployed-precision leaderboard beside it")
    h.add_argument("--out", required=True, help="directory to write index.html, leaderboard.html and figures/ into")
    h.add_argument("--store")
    h.add_argument("--study", help="only this study")
    h.add_argument("--cache", help="artifact cache holding reversed triggers (default $BACKDOORLAB_HOME/artifacts)")
    h.set_defaults(fn=cmd_report)

    e = sub.add_parser("export", help="write the results as CSV and Parquet")
    e.add_argument("--out", default="results", help="output path without extension")
    e.add_argument("--format", nargs="+", default=["csv", "parquet"], choices=["csv", "parquet"])
    e.add_argument("--store")
    e.add_argument("--study")
    e.set_defaults(fn=cmd_export)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a dataset's official archives and verify them")
    f.add_argument("name")
    f.add_argument("--dest", help="where to put it (default $BACKDOORLAB_HOME/data)")
    f.add_argument("--mirror", help="base URL of a mirror holding the same files")
    f.set_defaults(fn=cmd_fetch)

    sc = sub.add_parser("scan", help="is this model file safe to ship? exit 0 clean, 1 backdoored, "
                        "3 inconclusive, 2 error")
    sc.add_argument("model", help="ONNX (FP32 or INT8), safetensors or a PyTorch state dict (with --arch)")
    sc.add_argument("--data", help="clean images: a registered dataset name or a folder <class>/<image>; "
                    "omit for the data-free mode")
    sc.add_argument("--arch", help="architecture of a safetensors / state-dict file (see `backdoorlab list models`)")
    sc.add_argument("--input-size", help="C,H,W where neither the file nor --data fixes it, e.g. 3,32,32")
    sc.add_argument("--budget", default="fast", choices=["fast", "standard", "thorough"])
    sc.add_argument("--out", help="write an HTML report with the recovered trigger into this directory")
    sc.add_argument("--json", action="store_true", help="print the report as JSON")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(fn=cmd_scan)

    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", nargs="?", choices=["datasets", "models", "attacks", "compress", "defenses"])
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .utils import tune_cpu_allocator

        tune_cpu_allocator()  # before any work, so a bad BACKDOORLAB_MALLOC fails first (one line)
        return args.fn(args)
    except BackdoorLabError as exc:
        print(f"backdoorlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --out, a directory given as --store, a full disk ...
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"backdoorlab: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backdoorlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:
        if args.command != "scan":
            raise
        # a bug in a scanner: keep its traceback, but never exit 1, which means "backdoored"
        import traceback

        traceback.print_exc()
        return 2


if __name__ == "__main__":
    sys.exit(main())
