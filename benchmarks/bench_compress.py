"""Deployment precisions (issues 3 and 29): latency at batch 1 and batch 256 and artifact size of
every precision on every runtime, for the default model and PreAct-ResNet18, each as a ratio
against **its own runtime's FP32** (:data:`OWN_FP32`: ``int8-ort`` against ``fp32-ort``,
``int8-tflite`` against ``fp32-tflite``, ...; PyTorch precisions against eager ``fp32``), and
against PyTorch eager FP32 and ONNX Runtime FP32, all measured in the same run.

Weights: untrained by default (speed and size do not depend on their values), every calibrated
precision calibrated on ``--calib-size`` real GTSRB training images (resized to 32x32) when the
archive is found, else on seeded uniform noise (recorded in the JSON). ``--trained``: the default
model (small-cnn) is the test session's GTSRB BadNets model (``tests/_helpers.trained_gtsrb``,
cached under ``BACKDOORLAB_HOME``), every precision is calibrated on the defender's holdout of
that cell, and each row adds clean accuracy, ASR and RA on the test split
(``backdoorlab.bench.pipeline.evaluate``) and the top-1 agreement of the artifact with its
differentiable surrogate. Other models keep untrained weights (training PreAct-ResNet18 on CPU is
not cheap): their CA/ASR are not measured (the JSON says so) and their agreement is taken on the
first ``--agreement-n-untrained`` test images.

Latency: ``Classifier.latency_ms``, one call per precision per round, rounds interleaved across
precisions, median over rounds; threads fixed by ``--threads`` for every runtime. Warm-up calls
(3 at batch 1, 1 at batch ``--batch``) are untimed and absorb one-off work such as ``int8-pt2e``'s
Inductor compilation at its first call (its seconds are recorded as ``compile_s``). Simulated
artifacts (``info["simulated"]``: ``int4-w``, ``w4a8`` run as fake-quant in FP32) are **not
timed**: their latency is null and the table marks them ``simulated``. The machine's load average
is recorded before and after each model: on a shared 2-core machine, other processes distort
multi-threaded timings.

Usage: python benchmarks/bench_compress.py [--models small-cnn preact-resnet18] [--threads 2]
       [--trained] [--out benchmarks/results/compress.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP threads that spin while waiting lose whole scheduler slices to
# other processes (a 2-thread batch-1 forward of the small CNN then takes ~0.4 s instead of
# ~2 ms); passive waiting removes that artefact. Set before torch loads libgomp; override by
# exporting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import table, write  # noqa: E402

from backdoorlab.compress import compress  # noqa: E402
from backdoorlab.data import TensorData  # noqa: E402
from backdoorlab.models import build_model  # noqa: E402

PRECISIONS = ["fp32", "fp16", "bf16", "int8-dynamic", "int8-torch", "int8-torch-x86", "int8-pt2e",
              "fp32-ort", "int8-ort", "int8-ort-qop", "fp32-openvino", "int8-openvino", "fp32-tflite", "int8-tflite",
              "fp32-executorch", "int8-executorch", "int4-w", "w4a8", "prune-l1-50"]
# benchmark names for non-default settings: name -> (spec, row label). ``int8-torch`` runs oneDNN
# kernels; ``int8-torch-x86`` lets PyTorch's x86 engine choose (FBGEMM on CPUs without VNNI).
VARIANTS = {"int8-torch-x86": ({"name": "int8-torch", "backend": "x86"}, "int8-torch (x86 engine)")}
# every reduced-precision artifact -> the FP32 artifact of its own runtime (same run, same threads):
# PyTorch's (eager, Inductor, fake-quant, pruned) against eager fp32, each other runtime against its twin
OWN_FP32 = {"fp16": "fp32", "bf16": "fp32", "int8-dynamic": "fp32", "int8-torch": "fp32", "int8-torch-x86": "fp32",
            "int8-pt2e": "fp32", "int4-w": "fp32", "w4a8": "fp32", "prune-l1-50": "fp32",
            "int8-ort": "fp32-ort", "int8-ort-qop": "fp32-ort", "int8-openvino": "fp32-openvino",
            "int8-tflite": "fp32-tflite", "int8-executorch": "fp32-executorch"}
# calibrated precisions whose calib_size the benchmark sets (--calib-size); the others keep their
# documented defaults (int8-openvino: NNCF's 300, int8-tflite: 100 as Ma et al., int8-pt2e and
# int8-executorch: 512), recorded per row from the artifact's info
SET_CALIB = ("int8-torch", "int8-ort", "int8-ort-qop", "w4a8")


def own_fp32(p: str) -> str | None:
    """The FP32 reference of benchmark precision ``p`` on its own runtime (itself for an FP32 twin)."""
    if p in OWN_FP32:
        return OWN_FP32[p]
    if p.startswith("prune-"):
        return "fp32"
    return p if p.startswith("fp32") else None


def spec_of(p: str, calib_size: int) -> tuple[dict | str, str | None]:
    """``p`` (a precision or a :data:`VARIANTS` name) -> (compression spec, row label or None)."""
    spec, label = VARIANTS.get(p, ({"name": p}, None))
    if spec["name"] in SET_CALIB:
        return {**spec, "calib_size": calib_size}, label
    return (spec if len(spec) > 1 else spec["name"]), label


def calibration_set(n: int, seed: int) -> tuple[TensorData, str]:
    from backdoorlab.data import load_dataset
    from backdoorlab.errors import BackdoorLabError

    try:
        bundle = load_dataset({"name": "gtsrb", "train_limit": n})
        return bundle.train, "gtsrb train (first images of a stratified subset)"
    except BackdoorLabError:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
        return TensorData(x, torch.zeros(n, dtype=torch.long)), "uniform noise (GTSRB not found)"


def trained_cell():
    """The tests' session GTSRB BadNets model (trained once through the cached pipeline)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")


def measure(model_name: str, precisions: list[str], calib: TensorData, args, trained=None) -> list[dict]:
    """Build every precision of one model, then time them **interleaved**: each round calls every
    (non-simulated) classifier once (batch 1: ``--repeats-b1`` rounds, batch ``--batch``:
    ``--repeats-batch`` rounds) and the median over rounds is kept, so a slow phase of a shared
    machine hits every precision alike instead of the one that happened to run then. Then, with
    ``trained`` (the session's cell), CA / ASR / RA and surrogate agreement per precision."""
    import statistics

    from backdoorlab.bench.pipeline import evaluate
    from backdoorlab.classifier import agreement

    torch.manual_seed(args.seed)
    from backdoorlab.registry import split_spec

    if trained is not None and model_name == split_spec(trained.cell.model)[0]:
        model, weights = trained.model.eval(), "trained: the tests' GTSRB BadNets model (trained_gtsrb('badnets'))"
    else:
        model = build_model(model_name, 43, 3, (0.34, 0.31, 0.32), (0.27, 0.26, 0.27)).eval()
        weights = f"untrained (seed {args.seed}): CA/ASR not meaningful, not measured"
    load_before = os.getloadavg()
    built = []
    for p in precisions:
        t0 = time.perf_counter()
        spec, label = spec_of(p, args.calib_size)
        clf = compress(spec, model, calib=calib, device="cpu")
        built.append((p, label or clf.precision, clf, time.perf_counter() - t0))
        print(f"  built {model_name} {label or clf.precision} in {built[-1][3]:.1f} s", flush=True)
    timed = [(lbl, clf) for _, lbl, clf, _ in built if not clf.info.get("simulated")]
    x1 = calib.subset(torch.arange(1)).float()
    xb = calib.subset(torch.arange(args.batch) % len(calib)).float()
    reps_b = args.repeats_batch
    for spec in args.repeats_batch_for or []:
        name, _, n = spec.partition("=")
        if name == model_name:
            reps_b = int(n)
    times: dict[str, dict[int, list[float]]] = {p: {1: [], args.batch: []} for p, _ in timed}
    t_timing = time.perf_counter()
    for b, x, rounds, warm in ((1, x1, args.repeats_b1, 3), (args.batch, xb, reps_b, 1)):
        for _, clf in timed:  # untimed: absorbs first-call work (int8-pt2e's Inductor compile)
            clf.latency_ms(batch_size=b, repeats=1, warmup=warm, x=x)
        print(f"  {model_name}: warm-up at batch {b} done ({time.perf_counter() - t_timing:.0f} s)", flush=True)
        for i in range(rounds):
            for p, clf in timed:
                times[p][b].append(clf.latency_ms(batch_size=b, repeats=1, warmup=0, x=x))
            if b > 1:
                print(f"  {model_name}: batch {b} round {i + 1}/{rounds} ({time.perf_counter() - t_timing:.0f} s)",
                      flush=True)
    timing_s = time.perf_counter() - t_timing
    load_mid = os.getloadavg()
    rows = []
    key_b = f"latency_ms_b{args.batch}"
    for bench, precision, clf, build in built:
        sim = bool(clf.info.get("simulated"))
        b1 = None if sim else statistics.median(times[precision][1])
        bb = None if sim else statistics.median(times[precision][args.batch])
        info = clf.info
        row = {"model": model_name, "precision": precision, "bench_name": bench, "own_fp32": None,
               "runtime": info.get("runtime"), "runtime_version": info.get("runtime_version"), "simulated": sim,
               "size_bytes": clf.size_bytes, "latency_ms_b1": b1,
               f"latency_ms_per_image_b{args.batch}": bb, key_b: None if bb is None else bb * args.batch,
               "build_s": build, "int8_layers": clf.int8_layers, "calib_size": info.get("calib_size"),
               "calib_images": None if info.get("calib_size") is None else min(info["calib_size"], len(calib)),
               "load_avg": os.getloadavg()[0]}
        if "compile_s" in info:  # int8-pt2e: Inductor compiled during the untimed warm-up calls
            row["compile_s"], row["compiles"] = info["compile_s"], info.get("compiles")
        rows.append(row)
        if sim:
            print(f"  {model_name:16s} {precision:19s} simulated (fake-quant in FP32): not timed  "
                  f"size {clf.size_bytes / 1e6:6.2f} MB", flush=True)
        else:
            print(f"  {model_name:16s} {precision:19s} b1 {b1:8.2f} ms  b{args.batch} {bb * args.batch:9.1f} ms  "
                  f"size {clf.size_bytes / 1e6:6.2f} MB", flush=True)
    by = {r["bench_name"]: r for r in rows}

    def ratios(r: dict, ref_row: dict, suffix: str) -> None:
        timed_both = r["latency_ms_b1"] is not None and ref_row["latency_ms_b1"] is not None
        r[f"speedup_b1_vs_{suffix}"] = ref_row["latency_ms_b1"] / r["latency_ms_b1"] if timed_both else None
        r[f"speedup_b{args.batch}_vs_{suffix}"] = ref_row[key_b] / r[key_b] if timed_both else None
        r[f"size_ratio_vs_{suffix}"] = ref_row["size_bytes"] / r["size_bytes"]

    for r in rows:
        for ref in ("fp32", "fp32-ort"):
            if ref in by:
                ratios(r, by[ref], ref)
        own = own_fp32(r["bench_name"])
        if own in by:
            r["own_fp32"] = by[own]["precision"]
            ratios(r, by[own], "own_fp32")
    # quality: after the timing, so evaluation batches cannot compile graphs inside timed calls
    t_eval = time.perf_counter()
    is_trained = trained is not None and weights.startswith("trained")
    if trained is not None:
        x_test = trained.bundle.test.float()
        x_agree = x_test if is_trained else x_test[:args.agreement_n_untrained]
        for (_, _, clf, _), r in zip(built, rows):
            if is_trained:
                r.update({k: float(v) for k, v in evaluate(clf, trained.bundle.test, trained.attack).items()
                          if k in ("ca", "asr", "ra")})
            sur = getattr(clf, "surrogate", None)
            r["surrogate_agreement"] = agreement(clf, sur, x_agree) if sur is not None else None
            r["agreement_n"] = len(x_agree) if sur is not None else None
    meta = {"model": model_name, "weights": weights, "ca_meaningful": is_trained, "repeats_batch": reps_b,
            "timing_s": round(timing_s, 1), "eval_s": round(time.perf_counter() - t_eval, 1),
            "load_avg_before": load_before, "load_avg_after_timing": load_mid, "load_avg_after": os.getloadavg()}
    return rows, meta


def markdown(rows: list[dict], b: int) -> str:
    """The results as a markdown table (speed-ups: reference time / this time; higher is faster).
    ``own`` = the precision's own runtime's FP32 (:data:`OWN_FP32`); simulated rows are not timed."""

    def x(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if r.get(key) is not None else "n/a"

    def ms(r: dict, key: str, fmt: str) -> str:
        return "—" if r.get(key) is None else format(r[key], fmt)

    def q(r: dict, key: str) -> str:
        return f"{r[key]:.3f}" if r.get(key) is not None else "n/a"

    header = ["model", "precision", "runtime", "simulated", "int8 layers", "b1 ms", f"b{b} ms", "own FP32",
              "b1 vs own", f"b{b} vs own", "size vs own", "b1 vs fp32", f"b{b} vs fp32", "size MB", "CA", "ASR",
              "agree sur"]
    body = [[r["model"], r["precision"], r.get("runtime") or "?", "simulated" if r.get("simulated") else "",
             r["int8_layers"] or "none", ms(r, "latency_ms_b1", ".2f"), ms(r, f"latency_ms_b{b}", ".0f"),
             r.get("own_fp32") or "n/a", x(r, "speedup_b1_vs_own_fp32"), x(r, f"speedup_b{b}_vs_own_fp32"),
             f"1/{r['size_ratio_vs_own_fp32']:.2f}" if r.get("size_ratio_vs_own_fp32") else "n/a",
             x(r, "speedup_b1_vs_fp32"), x(r, f"speedup_b{b}_vs_fp32"), f"{r['size_bytes'] / 1e6:.2f}",
             q(r, "ca"), q(r, "asr"), q(r, "surrogate_agreement")] for r in rows]
    return table(header, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small-cnn", "preact-resnet18"])
    ap.add_argument("--precisions", nargs="+", default=PRECISIONS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats-b1", type=int, default=30)
    ap.add_argument("--repeats-batch", type=int, default=9)
    ap.add_argument("--repeats-batch-for", nargs="*", metavar="MODEL=N",
                    help="batch rounds for one model (e.g. preact-resnet18=5), overriding --repeats-batch")
    ap.add_argument("--trained", action="store_true",
                    help="the default model is the tests' trained GTSRB BadNets model; adds CA/ASR/agreement")
    ap.add_argument("--agreement-n-untrained", type=int, default=512,
                    help="test images for the surrogate agreement of untrained models (with --trained)")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/compress.json)")
    ap.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier results JSON")
    args = ap.parse_args()
    if args.table:
        import json

        with open(args.table) as fh:
            done = json.load(fh)
        print(markdown(done["results"], done["batch"]))
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    trained = None
    if args.trained:
        t0 = time.perf_counter()
        trained = trained_cell()
        calib = trained.poisoned.holdout
        calib_source = (f"the defender's clean holdout of the tests' GTSRB BadNets cell ({len(calib)} images; "
                        f"each precision calibrates on its first min(calib_size, {len(calib)}))")
        print(f"trained model ready in {time.perf_counter() - t0:.1f} s; calibration: {calib_source}", flush=True)
        torch.set_num_threads(args.threads)  # the pipeline may have changed it
    else:
        calib, calib_source = calibration_set(max(args.calib_size, args.batch), args.seed)
    rows, models = [], []
    for name in args.models:
        r, meta = measure(name, args.precisions, calib, args, trained)
        rows += r
        models.append(meta)
    b = args.batch
    payload = {"benchmark": "compress", "threads": args.threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
               "batch": b, "calib_size": args.calib_size, "calibration_source": calib_source,
               "trained": args.trained, "own_fp32": OWN_FP32,
               "repeats": {"b1": args.repeats_b1, f"b{b}": args.repeats_batch,
                           "per_model": {m["model"]: m["repeats_batch"] for m in models}},
               "notes": ["latency_ms_* are null for simulated artifacts (info.simulated: fake-quant run in FP32); "
                         "they are not timed",
                         "speedup_*_vs_own_fp32: the FP32 artifact of the same runtime (own_fp32 column) divided by "
                         "this one, measured interleaved in the same run; >1 is faster",
                         "int8-pt2e compiles with Inductor at its first call; the untimed warm-up calls absorb it "
                         "(compile_s)"],
               "models": models, "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "results": rows}
    path = write("compress", payload, args.out)
    print(markdown(rows, b))
    print(f"\n{args.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}); "
          f"'vs own' = speed-up over the same runtime's FP32 artifact, 'vs fp32' over PyTorch eager FP32 "
          f"(higher is faster); load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"results in {path}")


if __name__ == "__main__":
    main()
