"""A zoo of model files to measure ``backdoorlab scan`` on (issue 28 §3-4).

Two phases:

``build``: trains the zoo's models through the ordinary cached pipeline (models the tests and
``bench_attacks.py`` trained are cache hits under the same ``BACKDOORLAB_HOME``) and writes each
as a **file**: FP32 ONNX, and for a share of them the INT8 ONNX (QDQ) file ONNX Runtime's static
quantisation makes of it (calibrated on the defender's holdout, as a vendor's int8 build would be),
and a few as safetensors. ``manifest.json`` beside them holds the ground truth (clean or not,
attack, target, victims), which the scan never sees.

``scan``: runs the ``backdoorlab scan`` command on each file in a fresh process, with only the
file, ``--data DATASET`` (clean test images) and ``--json``: the user's path. Then scores it:
AUROC of the scan's score (the deciding scanner's score over its threshold), TPR at 5% FPR,
the verdict's TPR and FPR, target-label accuracy over the backdoored files, seconds per file, per
attack family and precision; and calibrates: each scanner's threshold at the 95th percentile of
its scores on the clean files (``--calibrate`` writes ``src/backdoorlab/scanning/calibration.json``;
the FPR quoted for a calibrated threshold is leave-one-out over the clean files, so it is not
measured on the files that set it).

Usage: python benchmarks/zoo.py build [--dir DIR] [--only gtsrb|cifar10]
       python benchmarks/zoo.py scan [--dir DIR] [--budget fast] [--calibrate] [--out PATH]
(needs BACKDOORLAB_DATA; models are cached under BACKDOORLAB_HOME)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import table, write

GTSRB = {"name": "gtsrb", "train_limit": 6000, "test_limit": 2000}  # the tests' subset and recipe
GTSRB_TRAIN = {"epochs": 10, "batch_size": 128, "lr": 0.1, "crop_pad": 0}
CIFAR = {"name": "cifar10", "train_limit": 10000, "test_limit": 2000}
CIFAR_TRAIN = {"epochs": 10, "batch_size": 128, "lr": 0.1}
WIDE = {"name": "small-cnn", "widths": [64, 128, 256, 512]}  # 4x the default's channels (larger model)
# the clean-label presets of bench_attacks.py on the GTSRB subset
PRESETS = {
    "sig": {"name": "sig", "target": 1, "rate": 0.06},
    "lc": {"name": "lc", "target": 1, "rate": 0.06},
    "refool": {"name": "refool", "target": 1, "rate": 0.06},
}
GTSRB_ATTACKS = [
    "badnets",
    "blended",
    "adaptive-blend",
    "adaptive-patch",
    "blind",
    "bpp",
    "cassock",
    "filter",
    "input-aware",
    "lc",
    "lf",
    "lsp",
    "object",
    "polygon",
    "refool",
    "sig",
    "ssba",
    "trojannn",
    "wanet",
]


def entries(only: str | None) -> list[dict[str, Any]]:
    """The zoo: ``(dataset, train, model, attack, seed, files)``; ``files`` lists the forms written."""
    out: list[dict[str, Any]] = []

    def add(ds, train, attack, seed=0, model="small-cnn", files=("onnx",)):
        out.append({"dataset": ds, "train": train, "model": model, "attack": attack, "seed": seed, "files": files})

    if only in (None, "gtsrb"):
        for s in range(8):
            add(GTSRB, GTSRB_TRAIN, "none", s, files=("onnx", "int8") if s < 6 else ("onnx", "safetensors"))
        add(GTSRB, GTSRB_TRAIN, "none", 0, WIDE, files=("onnx", "int8"))
        for a in GTSRB_ATTACKS:
            add(
                GTSRB,
                GTSRB_TRAIN,
                PRESETS.get(a, a),
                0,
                files=("onnx", "int8")
                if a in ("badnets", "blended", "wanet", "sig", "ssba", "trojannn")
                else ("onnx",),
            )
        for t in (5, 12):  # other targets
            add(GTSRB, GTSRB_TRAIN, {"name": "badnets", "target": t}, 0)
        add(GTSRB, GTSRB_TRAIN, {"name": "blended", "target": 7}, 1)
        add(GTSRB, GTSRB_TRAIN, {"name": "badnets", "mode": "all-to-all"}, 0)
        add(GTSRB, GTSRB_TRAIN, {"name": "badnets", "mode": "source-specific", "sources": [1, 2], "target": 0}, 0)
        add(GTSRB, GTSRB_TRAIN, "badnets", 0, WIDE, files=("onnx", "int8"))
        # compression-conditioned: the tests' int4 qcb and prune-conditioned models (tests/_helpers.py),
        # as their FP32 file and as the deployed INT8 file
        add(
            GTSRB,
            GTSRB_TRAIN,
            {"name": "qcb", "target_precision": "int4-w", "init": "none", "epochs": 8, "lr": 0.01},
            0,
            files=("onnx", "int8"),
        )
        add(
            GTSRB,
            GTSRB_TRAIN,
            {"name": "prune-conditioned", "sparsity": 0.5, "init": "none", "epochs": 8, "lr": 0.01},
            0,
            files=("onnx", "int8"),
        )
    if only in (None, "cifar10"):  # a small CIFAR-10 slice (10k training images, 10 epochs): 2 clean, 2 attacks
        for s in range(2):
            add(CIFAR, CIFAR_TRAIN, "none", s, files=("onnx", "int8"))
        for a in ("badnets", "blended"):
            add(CIFAR, CIFAR_TRAIN, a, 0, files=("onnx", "int8") if a == "badnets" else ("onnx",))
    return out


def _slug(e: dict[str, Any]) -> str:
    a = e["attack"]
    name = (
        a
        if isinstance(a, str)
        else "-".join([a["name"]] + [f"{k}{v}" for k, v in sorted(a.items()) if k in ("target", "mode", "variant")])
    )
    model = e["model"] if isinstance(e["model"], str) else "small-cnn-wide"
    return f"{e['dataset']['name']}_{model}_{name}_s{e['seed']}".replace(" ", "")


def build(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from backdoorlab.bench.pipeline import Pipeline
    from backdoorlab.bench.study import Study
    from backdoorlab.compress.ort import OrtInt8Config, export_onnx, quantize_ort

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(device="auto", progress=False)
    old = root / "manifest.json"  # other slices built before (--only) keep their entries
    manifest = json.loads(old.read_text()) if old.exists() else []
    for e in entries(args.only):
        t0 = time.perf_counter()
        study = Study.from_dict(
            {
                "name": "zoo",
                "datasets": [e["dataset"]],
                "models": [e["model"]],
                "attacks": [e["attack"]],
                "seeds": [e["seed"]],
                "train": e["train"],
            }
        )
        (cell,) = pipe.bind(study.cells())
        bundle = pipe.data(cell.dataset)
        attack = pipe.attack(cell)
        poisoned = pipe.poison(cell, attack)
        model, _ = pipe.train(cell, poisoned, attack)
        model = model.cpu().float().eval()
        slug = _slug(e)
        holdout = poisoned.holdout.float()
        name = e["attack"] if isinstance(e["attack"], str) else e["attack"]["name"]
        truth = {
            "clean": name == "none",
            "dataset": e["dataset"]["name"],
            "attack": name,
            "target": getattr(attack, "target", None),
            "mode": getattr(attack, "mode", None),
            "sources": list(getattr(attack, "sources", None) or []),
            "model": slug.split("_")[1],
            "seed": e["seed"],
        }
        if truth["clean"]:
            truth["target"] = None
        onnx_bytes = export_onnx(model, holdout[:8])
        for form in e["files"]:
            if form == "onnx":
                p, prec = root / f"{slug}.onnx", "fp32"
                p.write_bytes(onnx_bytes)
            elif form == "int8":
                p, prec = root / f"{slug}.int8.onnx", "int8"
                p.write_bytes(quantize_ort(onnx_bytes, holdout[:256], OrtInt8Config()))
            else:
                p, prec = root / f"{slug}.safetensors", "fp32"
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p))
            manifest = [m for m in manifest if m["file"] != p.name]
            manifest.append(
                {
                    "file": p.name,
                    "precision": prec,
                    "format": form,
                    **truth,
                    "arch": (e["model"] if isinstance(e["model"], str) else json.dumps(e["model"]))
                    if form == "safetensors"
                    else None,
                }
            )
        print(f"{slug}: {', '.join(e['files'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
        del bundle, model, poisoned


def _auroc(pos: list[float], neg: list[float]) -> float:
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _tpr_at(pos: list[float], neg: list[float], fpr: float) -> float:
    if not pos or not neg:
        return float("nan")
    neg_sorted = sorted(neg, reverse=True)
    k = int(fpr * len(neg))  # at most k clean files above the threshold
    thr = neg_sorted[k] if k < len(neg_sorted) else -float("inf")
    return sum(p > thr for p in pos) / len(pos)


# thresholds of scanners whose reports (before the scanner stated it) carry none: K-Arm's verdict is score > 1
DEFAULT_THRESHOLD = {"k-arm": 1.0}


def _threshold(o: dict[str, Any]) -> float | None:
    return o.get("threshold") if o.get("threshold") is not None else DEFAULT_THRESHOLD.get(o["name"])


def _score(rep: dict[str, Any]) -> float:
    """The scan's continuous score: the highest scanner score relative to its threshold."""
    best = -float("inf")
    for o in rep["scanners"]:
        if o.get("score") is not None and _threshold(o):
            best = max(best, o["score"] / _threshold(o))
    return best


def scan(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    manifest = json.loads((root / "manifest.json").read_text())
    results_path = root / f"scans-{args.budget}.json"
    done = json.loads(results_path.read_text()) if results_path.exists() and not args.rescan else {}
    env = {**os.environ}
    for m in manifest:
        if m["file"] in done:
            continue
        cmd = [
            sys.executable,
            "-m",
            "backdoorlab.cli",
            "scan",
            str(root / m["file"]),
            "--data",
            m["dataset"],
            "--budget",
            args.budget,
            "--json",
            "--no-progress",
        ]
        if m.get("arch"):
            cmd += ["--arch", m["arch"]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        try:
            rep = json.loads(proc.stdout)
        except json.JSONDecodeError:
            rep = None
        if proc.returncode not in (0, 1, 3) or rep is None:
            print(f"{m['file']}: exit {proc.returncode}: {proc.stderr.strip()[-600:]}", flush=True)
            continue
        done[m["file"]] = {"report": rep, "wall": wall}
        results_path.write_text(json.dumps(done))
        print(
            f"{m['file']}: {rep['verdict']} targets={rep['targets']} (truth "
            f"{'clean' if m['clean'] else m['target']}) {rep['seconds']:.1f} s",
            flush=True,
        )
    summarise(manifest, done, args)


def summarise(manifest: list[dict[str, Any]], done: dict[str, Any], args: argparse.Namespace) -> None:
    rows = [(m, done[m["file"]]) for m in manifest if m["file"] in done]
    # Per-scanner calibration: the paper's threshold, raised to the 95th percentile of the clean
    # files' scores where clean models cross it (calibration only makes a rule stricter: a
    # threshold below the paper's, fitted on a few clean files, would flag what the paper would
    # not). Its false-positive rate is leave-one-out: each clean file against the threshold the
    # other clean files set.
    scanners = sorted({o["name"] for _, d in rows for o in d["report"]["scanners"] if o.get("score") is not None})
    cal: dict[str, Any] = {}

    def paper(name: str) -> float | None:
        ts = [_threshold(o) for _, d in rows for o in d["report"]["scanners"]
              if o["name"] == name and _threshold(o) is not None and not o.get("calibrated")]
        return statistics.median(ts) if ts else None

    def q95(vals: list[float]) -> float:
        return sorted(vals)[min(len(vals) - 1, int(0.95 * len(vals)))]

    for name in scanners:
        neg = [o["score"] for m, d in rows if m["clean"] for o in d["report"]["scanners"]
               if o["name"] == name and o.get("score") is not None]
        base = paper(name)
        if len(neg) < 5 or base is None:
            continue
        thr = max(base, q95(neg))
        loo = [neg[i] >= max(base, q95(neg[:i] + neg[i + 1:])) for i in range(len(neg))]
        cal[name] = {"threshold": thr, "paper_threshold": base, "fpr": sum(loo) / len(loo), "n_clean": len(neg),
                     "raised": thr > base}
    groups: dict[str, list] = {"all": rows}
    for m, d in rows:
        groups.setdefault(f"precision={m['precision']}", []).append((m, d))
        groups.setdefault(f"dataset={m['dataset']}", []).append((m, d))
        if not m["clean"]:
            groups.setdefault(f"attack={m['attack']}", []).append((m, d))
    clean_all = [(m, d) for m, d in rows if m["clean"]]
    out_rows, summary = [], {}
    for g, members in groups.items():
        bd = [(m, d) for m, d in members if not m["clean"]]
        cl = [(m, d) for m, d in members if m["clean"]] or (clean_all if g.startswith("attack=") else [])
        pos, neg = [_score(d["report"]) for _, d in bd], [_score(d["report"]) for _, d in cl]
        tgt = [
            d["report"]["targets"][:1] == [m["target"]]
            for m, d in bd
            if m["target"] is not None and m["mode"] != "all-to-all"
        ]
        det = [d["report"]["verdict"] == "backdoored" for _, d in bd]
        fp = [d["report"]["verdict"] == "backdoored" for _, d in cl]
        secs = [d["report"]["seconds"] for _, d in members]
        s = {
            "n_backdoored": len(bd),
            "n_clean": len(cl),
            "auroc": _auroc(pos, neg),
            "tpr_at_5fpr": _tpr_at(pos, neg, 0.05),
            "verdict_tpr": sum(det) / len(det) if det else float("nan"),
            "verdict_fpr": sum(fp) / len(fp) if fp else float("nan"),
            "target_acc": sum(tgt) / len(tgt) if tgt else float("nan"),
            "seconds_median": statistics.median(secs) if secs else float("nan"),
            "seconds_max": max(secs or [0]),
        }
        summary[g] = s
        out_rows.append(
            [
                g,
                len(bd),
                len(cl),
                s["auroc"],
                s["tpr_at_5fpr"],
                s["verdict_tpr"],
                s["verdict_fpr"],
                s["target_acc"],
                s["seconds_median"],
                s["seconds_max"],
            ]
        )
    print(
        table(
            [
                "group",
                "backdoored",
                "clean",
                "AUROC",
                "TPR@5%FPR",
                "verdict TPR",
                "verdict FPR",
                "target acc",
                "s median",
                "s max",
            ],
            out_rows,
        )
    )
    print(json.dumps(cal, indent=1))
    if args.calibrate:
        p = Path(__file__).resolve().parents[1] / "src" / "backdoorlab" / "scanning" / "calibration.json"
        old = json.loads(p.read_text()) if p.exists() else {}
        old[args.budget] = cal
        p.write_text(json.dumps(old, indent=1) + "\n")
        print(f"wrote {p}")
    write(
        f"zoo_{args.budget}",
        {
            "budget": args.budget,
            "files": len(rows),
            "summary": summary,
            "calibration": cal,
            "per_file": {
                m["file"]: {
                    "truth": m,
                    "verdict": d["report"]["verdict"],
                    "targets": d["report"]["targets"],
                    "score": _score(d["report"]),
                    "seconds": d["report"]["seconds"],
                    "scanners": [
                        {k: o.get(k) for k in ("name", "score", "threshold", "flagged", "over", "seconds", "error")}
                        for o in d["report"]["scanners"]
                    ],
                }
                for m, d in rows
            },
        },
        args.out,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument(
        "--dir", default=str(Path(os.environ.get("BACKDOORLAB_HOME", "~/.backdoorlab")).expanduser() / "zoo")
    )
    b.add_argument("--only", choices=["gtsrb", "cifar10"])
    s = sub.add_parser("scan")
    s.add_argument(
        "--dir", default=str(Path(os.environ.get("BACKDOORLAB_HOME", "~/.backdoorlab")).expanduser() / "zoo")
    )
    s.add_argument("--budget", default="fast", choices=["fast", "standard", "thorough"])
    s.add_argument("--calibrate", action="store_true")
    s.add_argument("--rescan", action="store_true", help="scan every file again")
    s.add_argument("--out")
    args = p.parse_args()
    build(args) if args.cmd == "build" else scan(args)


if __name__ == "__main__":
    main()
