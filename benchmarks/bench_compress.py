"""Deployment precisions (issue 3): latency at batch 1 and batch 256 and artifact size of every
precision, for the default model and PreAct-ResNet18, each as a ratio against PyTorch eager FP32
(``fp32``) and against ONNX Runtime FP32 (``fp32-ort``) measured in the same run.

Weights are untrained (speed and size do not depend on their values) but every calibrated
precision is calibrated properly, on ``--calib-size`` real GTSRB training images (resized to
32x32) when the archive is found, else on seeded uniform noise (recorded in the JSON).
Latency: ``Classifier.latency_ms``, one call per precision per round, rounds interleaved across
precisions, median over rounds; threads fixed by ``--threads`` for PyTorch and ONNX Runtime alike.
The machine's load average is recorded before and after: on a shared 2-core machine, other
processes distort multi-threaded timings.

Usage: python benchmarks/bench_compress.py [--models small-cnn preact-resnet18] [--threads 2]
       [--out benchmarks/results/compress.json]
"""

from __future__ import annotations

import argparse
import os
import time

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

PRECISIONS = ["fp32", "fp16", "bf16", "int8-dynamic", "int8-torch", "int8-torch-x86", "fp32-ort", "int8-ort",
              "int4-w", "w4a8", "prune-l1-50"]
# benchmark names for non-default settings: name -> (spec, row label). ``int8-torch`` runs oneDNN
# kernels; ``int8-torch-x86`` lets PyTorch's x86 engine choose (FBGEMM on CPUs without VNNI).
VARIANTS = {"int8-torch-x86": ({"name": "int8-torch", "backend": "x86"}, "int8-torch (x86 engine)")}


def spec_of(p: str, calib_size: int) -> tuple[dict | str, str | None]:
    """``p`` (a precision or a :data:`VARIANTS` name) -> (compression spec, row label or None)."""
    spec, label = VARIANTS.get(p, ({"name": p}, None))
    if spec["name"] in ("int8-torch", "int8-ort", "w4a8"):
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


def measure(model_name: str, precisions: list[str], calib: TensorData, args) -> list[dict]:
    """Build every precision of one model, then time them **interleaved**: each round calls every
    classifier once (batch 1: ``--repeats-b1`` rounds, batch ``--batch``: ``--repeats-batch``
    rounds) and the median over rounds is kept, so a slow phase of a shared machine hits every
    precision alike instead of the one that happened to run then."""
    import statistics

    torch.manual_seed(args.seed)
    model = build_model(model_name, 43, 3, (0.34, 0.31, 0.32), (0.27, 0.26, 0.27)).eval()
    built = []
    for p in precisions:
        t0 = time.perf_counter()
        spec, label = spec_of(p, args.calib_size)
        clf = compress(spec, model, calib=calib, device="cpu")
        built.append((label or clf.precision, clf, time.perf_counter() - t0))
    x1 = calib.subset(torch.arange(1)).float()
    xb = calib.subset(torch.arange(args.batch) % len(calib)).float()
    times: dict[str, dict[int, list[float]]] = {p: {1: [], args.batch: []} for p, _, _ in built}
    for b, x, rounds, warm in ((1, x1, args.repeats_b1, 3), (args.batch, xb, args.repeats_batch, 1)):
        for _, clf, _ in built:
            clf.latency_ms(batch_size=b, repeats=1, warmup=warm, x=x)
        for _ in range(rounds):
            for p, clf, _ in built:
                times[p][b].append(clf.latency_ms(batch_size=b, repeats=1, warmup=0, x=x))
    rows = []
    for precision, clf, build in built:
        b1 = statistics.median(times[precision][1])
        bb = statistics.median(times[precision][args.batch])
        rows.append({"model": model_name, "precision": precision, "size_bytes": clf.size_bytes,
                     "latency_ms_b1": b1, f"latency_ms_per_image_b{args.batch}": bb,
                     f"latency_ms_b{args.batch}": bb * args.batch, "build_s": build,
                     "int8_layers": clf.int8_layers, "load_avg": os.getloadavg()[0]})
        print(f"  {model_name:16s} {precision:19s} b1 {b1:8.2f} ms  b{args.batch} {bb * args.batch:9.1f} ms  "
              f"size {clf.size_bytes / 1e6:6.2f} MB", flush=True)
    by = {r["precision"]: r for r in rows}
    for r in rows:
        for ref in ("fp32", "fp32-ort"):
            if ref in by:
                r[f"speedup_b1_vs_{ref}"] = by[ref]["latency_ms_b1"] / r["latency_ms_b1"]
                key = f"latency_ms_b{args.batch}"
                r[f"speedup_b{args.batch}_vs_{ref}"] = by[ref][key] / r[key]
                r[f"size_ratio_vs_{ref}"] = by[ref]["size_bytes"] / r["size_bytes"]
    return rows


def markdown(rows: list[dict], b: int) -> str:
    """The results as a markdown table (speed-ups: reference time / this time; higher is faster)."""

    def x(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "n/a"

    header = ["model", "precision", "int8 layers", "b1 ms", f"b{b} ms", "b1 vs fp32", f"b{b} vs fp32",
              "b1 vs fp32-ort", f"b{b} vs fp32-ort", "size MB", "size vs fp32"]
    body = [[r["model"], r["precision"], r["int8_layers"] or "none", f"{r['latency_ms_b1']:.2f}",
             f"{r[f'latency_ms_b{b}']:.0f}", x(r, "speedup_b1_vs_fp32"), x(r, f"speedup_b{b}_vs_fp32"),
             x(r, "speedup_b1_vs_fp32-ort"), x(r, f"speedup_b{b}_vs_fp32-ort"), f"{r['size_bytes'] / 1e6:.2f}",
             f"1/{r['size_ratio_vs_fp32']:.2f}" if "size_ratio_vs_fp32" in r else "n/a"] for r in rows]
    return table(header, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small-cnn", "preact-resnet18"])
    ap.add_argument("--precisions", nargs="+", default=PRECISIONS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats-b1", type=int, default=30)
    ap.add_argument("--repeats-batch", type=int, default=9)
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
    calib, calib_source = calibration_set(max(args.calib_size, args.batch), args.seed)
    load_before = os.getloadavg()
    rows = []
    for name in args.models:
        rows += measure(name, args.precisions, calib, args)
    b = args.batch
    payload = {"benchmark": "compress", "threads": args.threads, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
               "batch": b, "calib_size": args.calib_size,
               "calibration_source": calib_source, "repeats": {"b1": args.repeats_b1, f"b{b}": args.repeats_batch},
               "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "results": rows}
    path = write("compress", payload, args.out)
    print(markdown(rows, b))
    print(f"\n{args.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}); "
          f"'x fp32' = speed-up over PyTorch eager FP32 (higher is faster); "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; results in {path}")


if __name__ == "__main__":
    main()
