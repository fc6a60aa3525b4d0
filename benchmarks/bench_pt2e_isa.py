"""Does an ``int8-pt2e`` artifact classify the same on every x86 CPU? The same models, deployed once
per oneDNN instruction-set cap, each in its own process (oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once):
agreement of the artifact with its surrogate (the PT2E graph replayed in float, which is what
gradient defenses attack), and CA / ASR / RA of the artifact and of the surrogate.

oneDNN's u8 x s8 kernels take VNNI's ``vpdpbusd`` where the CPU has it and AVX2's ``vpmaddubsw``
otherwise, whose pairwise int16 sums saturate over the full-range uint8 activations that
``X86InductorQuantizer``'s default config calibrates (compress/pt2e.py). ``AVX2`` stands for an
AVX2-only CPU; ``native`` is whatever this CPU offers (the JSON's ``machine.isa`` and each row's
``onednn_vnni`` say which kernel ran).

The models are trained (or loaded from the cache) once, by this process, on the tests' GTSRB recipe
and subset; the deploying processes load them from ``BACKDOORLAB_HOME``. Set ``ATEN_CPU_CAPABILITY``
and ``ONEDNN_MAX_CPU_ISA`` for the training path (tests/conftest.py pins AVX2).

Usage: python benchmarks/bench_pt2e_isa.py [--attacks none badnets blended] [--seeds 0]
       [--isa AVX2 native] [--out PATH]                                        (needs BACKDOORLAB_DATA)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import table, write
from bench_attacks import DATASETS, TRAIN


def _study(attacks: list[str], seeds: list[int]):
    from backdoorlab.bench.study import Study

    study = Study.from_dict({"name": "bench-pt2e-isa", "datasets": [DATASETS["gtsrb"]], "models": ["small-cnn"],
                             "attacks": attacks, "seeds": seeds, "train": TRAIN["gtsrb"]})
    study.validate()
    return study


def _models(study):
    """(cell, bundle, attack, poisoned, model) for every cell, trained once and cached."""
    from backdoorlab.bench.pipeline import Pipeline

    pipe = Pipeline(device="cpu", progress=False)
    for cell in pipe.bind(study.cells()):
        attack = pipe.attack(cell)
        poisoned = pipe.poison(cell, attack)
        model, _ = pipe.train(cell, poisoned, attack)
        yield cell, pipe.data(cell.dataset), attack, poisoned, model


def _deploy_and_measure(attacks: list[str], seeds: list[int]) -> list[dict]:
    from backdoorlab.bench.pipeline import evaluate
    from backdoorlab.classifier import agreement
    from backdoorlab.compress import compress

    rows = []
    for cell, bundle, attack, poisoned, model in _models(_study(attacks, seeds)):
        clf = compress("int8-pt2e", model, calib=poisoned.holdout, device="cpu")
        x = bundle.test.float()
        row = {"attack": cell.labels["attack"], "seed": cell.seed, "onednn_vnni": clf.info["onednn_vnni"],
               "agreement_test": agreement(clf, clf.surrogate, x),
               "agreement_holdout": agreement(clf, clf.surrogate, poisoned.holdout.float())}
        for name, c in (("artifact", clf), ("surrogate", clf.surrogate)):
            if cell.labels["attack"] == "none":
                row[name] = {"ca": float((c.predict(x) == bundle.test.y).float().mean())}
            else:
                row[name] = evaluate(c, bundle.test, attack)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", nargs="+", default=["none", "badnets", "blended"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--isa", nargs="+", default=["AVX2", "native"],
                    help="oneDNN caps (ONEDNN_MAX_CPU_ISA values); 'native': no cap")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_deploy_and_measure(args.attacks, args.seeds)))
        return 0
    from backdoorlab.errors import BackdoorLabError

    try:
        for _ in _models(_study(args.attacks, args.seeds)):  # train here, once; the workers load
            pass
    except BackdoorLabError as exc:
        print(f"bench_pt2e_isa: error: {exc}", file=sys.stderr)
        return 2
    rows, lines = [], []
    for isa in args.isa:
        env = dict(os.environ)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        env.pop("DNNL_MAX_CPU_ISA", None)
        if isa != "native":
            env["ONEDNN_MAX_CPU_ISA"] = isa
        cmd = [sys.executable, __file__, "--worker", "--attacks", *args.attacks, "--seeds", *map(str, args.seeds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"bench_pt2e_isa: error: the worker for {isa} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        for r in json.loads(out.stdout.strip().splitlines()[-1]):
            r["onednn_max_cpu_isa"] = isa
            rows.append(r)
            a, s = r["artifact"], r["surrogate"]
            lines.append([r["attack"], r["seed"], isa, r["onednn_vnni"], round(r["agreement_test"], 4),
                          round(a["ca"], 4), round(s["ca"], 4), round(a.get("asr", float("nan")), 4),
                          round(s.get("asr", float("nan")), 4)])
    path = write("pt2e_isa", {"dataset": DATASETS["gtsrb"], "model": "small-cnn", "train": TRAIN["gtsrb"],
                              "training_path": {k: os.environ.get(k)
                                                for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
                              "rows": rows, "command": "python benchmarks/bench_pt2e_isa.py " + " ".join(sys.argv[1:])},
                 args.out)
    print(table(["attack", "seed", "oneDNN cap", "VNNI", "agreement (test)", "CA artifact", "CA surrogate",
                 "ASR artifact", "ASR surrogate"], lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
