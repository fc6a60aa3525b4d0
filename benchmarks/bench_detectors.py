"""Every attack of the library x every run-time input detector, at every deployed precision (issue 27
§4): AUROC (mean +- std over seeds), TPR at 5% FPR, FAR / FRR at the detector's own threshold, and
beside each the **clean model's** rejection rate at the same precision (the detector's false-positive
rate where there is no backdoor to find), with the detector's cost in seconds per 1,000 scored inputs.

This extends the blindspot question from five defenses on BadNets to every run-time detector on
every attack. Black-box detectors (STRIP, SCALE-UP, TeCo) score the deployed artifact itself;
SentiNet's Grad-CAM runs on the artifact's FP32 surrogate and its overlays on the artifact (as the
pipeline runs every defense). The models are bench_attacks' (same dataset, recipe and presets), so
with one ``BACKDOORLAB_HOME`` the two benchmarks train each model once.

It runs one study through the ordinary pipeline (``run_study``): models cached under
``BACKDOORLAB_HOME``, rows in a result store (default ``$BACKDOORLAB_HOME/bench_detectors.sqlite``),
so an interrupted run resumes; ``--no-run`` tabulates what a store holds.

``--eval-limit`` (default 300) caps the clean and the triggered test inputs each detector scores
(the pipeline's default is 1,000): a budget, not part of any method, and the JSON records it.

Usage: python benchmarks/bench_detectors.py [--dataset gtsrb|cifar10] [--seeds 0 1 2]
       [--attacks badnets sig ...] [--detectors strip scale-up teco sentinet '{"name": "sentinet", ...}']
       [--compress fp32 int8-torch int8-ort int4-w prune-l1-50] [--eval-limit 300]
       [--store PATH] [--out PATH] [--no-run]                               (needs BACKDOORLAB_DATA)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from _common import table, write
from bench_attacks import COMPRESS, DATASETS, TRAIN, attack_specs, data_poisoning_attacks, fmt, mean_std

DETECTORS = ["strip", "scale-up", "teco", "sentinet"]


def _per_1000(r) -> float | None:
    n = (r.metrics.get("n_eval_clean") or 0) + (r.metrics.get("n_eval_triggered") or 0)
    wall = r.metrics.get("defense_wall")
    return None if not n or wall is None else 1000.0 * wall / n


def summarise(rows: list, attacks: list[str], specs: list, detectors: list[str], compress: list[str],
              clean_attack: str, no_defense: str) -> tuple[list[dict], list[list], list[list]]:
    """The benchmark's JSON rows, its main table and its per-detector summary from store rows:
    ``attacks`` / ``detectors`` are the store's labels (``specs`` the attack specs, in order),
    ``clean_attack`` the clean model's label and ``no_defense`` the undefended cells' (deployed ASR).
    Each (attack, detector, precision) row carries the clean model's FRR for the same detector and
    precision: the detector's false-positive rate where there is nothing to find."""
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in rows:
        groups[(r.attack, r.defense, r.compression)].append(r)

    def ok(a: str, d: str, c: str) -> list:
        return sorted((r for r in groups.get((a, d, c), []) if r.status == "ok"), key=lambda r: r.seed)

    out_rows, lines = [], []
    summary: dict[tuple[str, str], list[float]] = defaultdict(list)
    for d in detectors:
        for a, spec in zip(attacks, specs):
            for comp in compress:
                rs = ok(a, d, comp)
                clean = ok(clean_attack, d, comp)
                base = ok(a, no_defense, comp)
                errors = [r.error for r in groups.get((a, d, comp), []) if r.status not in ("ok", "running")]
                st = {k: mean_std([r.metrics.get(k) for r in rs]) for k in ("auroc", "tpr_at_5fpr", "far", "frr")}
                clean_frr = mean_std([r.metrics.get("frr") for r in clean])
                asr = mean_std([r.metrics.get("asr") for r in base])
                speed = mean_std([_per_1000(r) for r in rs])
                detected = sum(bool(r.metrics.get("detected")) for r in rs)
                out_rows.append({
                    "attack": a, "spec": spec, "detector": d, "compression": comp, "seeds": [r.seed for r in rs],
                    **{f"{k}_mean": v[0] for k, v in st.items()}, **{f"{k}_std": v[1] for k, v in st.items()},
                    "clean_model_frr_mean": clean_frr[0], "clean_model_frr_std": clean_frr[1],
                    "clean_model_seeds": [r.seed for r in clean], "detected": detected,
                    "asr_deployed_mean": asr[0], "s_per_1000_mean": speed[0], "errors": errors,
                    "per_seed": [{"seed": r.seed, **{k: r.metrics.get(k) for k in
                                                     ("auroc", "tpr_at_1fpr", "tpr_at_5fpr", "far", "frr",
                                                      "threshold", "defense_wall")}} for r in rs]})
                if not math.isnan(st["auroc"][0]):
                    summary[(d, comp)].append(st["auroc"][0])
                lines.append([a, d.split("(")[0], comp, len(rs), fmt(*st["auroc"]), fmt(*st["tpr_at_5fpr"]),
                              fmt(*st["far"]), fmt(*st["frr"]), fmt(*clean_frr), f"{detected}/{len(rs)}",
                              fmt(*asr), "n/a" if math.isnan(speed[0]) else f"{speed[0]:.1f}",
                              "; ".join(errors)[:60]])
    for d in detectors:  # the clean model's own rows: their FRR is the false-positive rate shown above
        for comp in compress:
            clean = ok(clean_attack, d, comp)
            out_rows.append({"attack": clean_attack, "spec": "none", "detector": d, "compression": comp,
                             "seeds": [r.seed for r in clean],
                             "clean_model_frr_mean": mean_std([r.metrics.get("frr") for r in clean])[0],
                             "s_per_1000_mean": mean_std([_per_1000(r) for r in clean])[0]})
    summ = [[d.split("(")[0], comp, len(v), f"{sum(v) / len(v):.3f}", f"{min(v):.3f}", sum(x < 0.8 for x in v)]
            for (d, comp), v in summary.items()]
    return out_rows, lines, summ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="gtsrb")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", help="attack names (default: every registered data-poisoning attack)")
    ap.add_argument("--detectors", nargs="+", default=DETECTORS,
                    help="names or JSON specs with a smaller budget ('{\"name\": \"sentinet\", \"n_overlay\": 10}')")
    ap.add_argument("--compress", nargs="+", default=COMPRESS)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--store", help="result store (default $BACKDOORLAB_HOME/bench_detectors.sqlite)")
    ap.add_argument("--out")
    ap.add_argument("--no-run", action="store_true", help="run no cell: tabulate what the store holds")
    args = ap.parse_args()
    if args.eval_limit < 10:
        ap.error(f"--eval-limit must be at least 10, got {args.eval_limit}")

    from backdoorlab.bench.pipeline import run_study
    from backdoorlab.bench.store import ResultStore
    from backdoorlab.bench.study import Study, bind_sources
    from backdoorlab.config import canonical_json
    from backdoorlab.errors import BackdoorLabError
    from backdoorlab.utils import home

    attacks = attack_specs(args.dataset, args.attacks or data_poisoning_attacks(), variants=False)
    try:
        detectors = [{**(json.loads(d) if d.lstrip().startswith("{") else {"name": d}), "eval_limit": args.eval_limit}
                     for d in args.detectors]
    except json.JSONDecodeError as exc:
        ap.error(f"--detectors: a spec is not JSON: {exc}")
    train = TRAIN[args.dataset]
    try:
        study = Study.from_dict({"name": f"bench-detectors-{args.dataset}", "datasets": [DATASETS[args.dataset]],
                                 "models": ["small-cnn"], "attacks": ["none", *attacks],
                                 "compress": args.compress, "seeds": args.seeds,
                                 "defenses": ["none", *detectors], "train": train})
        study.validate()
    except BackdoorLabError as exc:
        print(f"bench_detectors: error: {exc}", file=sys.stderr)
        return 2
    store_path = Path(args.store) if args.store else home() / "bench_detectors.sqlite"
    if args.no_run and not store_path.is_file():  # never create an empty store only to tabulate it
        print(f"bench_detectors: error: --no-run: no result store at {store_path}", file=sys.stderr)
        return 2
    store = ResultStore(store_path)
    if not args.no_run:
        run_study(study, store, progress=False)
    cells = bind_sources(study.cells())
    run_ids = {c.run_id for c in cells}
    rows = [r for r in store.rows(study.name) if r.run_id in run_ids]
    if not rows:
        print("bench_detectors: error: the store holds no row of this study", file=sys.stderr)
        return 2
    alabel = {canonical_json(c.attack): c.labels["attack"] for c in cells}
    dlabel = {canonical_json(c.defense): c.labels["defense"] for c in cells}
    out_rows, lines, summ_lines = summarise(rows, [alabel[canonical_json(a)] for a in attacks], attacks,
                                            [dlabel[canonical_json(d)] for d in detectors], args.compress,
                                            alabel[canonical_json("none")], dlabel[canonical_json("none")])
    path = write(f"detectors_{args.dataset}", {"dataset": DATASETS[args.dataset], "model": "small-cnn", "train": train,
                                               "seeds": args.seeds, "compress": args.compress,
                                               "eval_limit": args.eval_limit, "rows": out_rows,
                                               "command": "python benchmarks/bench_detectors.py "
                                                          + " ".join(sys.argv[1:])}, args.out)
    print(table(["attack", "detector", "precision", "seeds", "AUROC", "TPR at 5% FPR", "FAR", "FRR",
                 "clean model's FRR (FPR)", "detected", "ASR deployed", "s / 1000 inputs", "errors"], lines))
    print()
    print(table(["detector", "precision", "attacks", "mean AUROC", "worst AUROC", "attacks below 0.8"], summ_lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
