"""Training throughput of fit(): images/s for the default model and PreAct-ResNet18, and the
achieved FLOP rate as a fraction of this machine's peak FP32 matmul rate, measured in the same
run (issue 2). ``--profile`` also splits one model's training step by operator kind (torch.profiler
self time over 10 steps at batch 256): how much of it is convolution, and the rate the convolutions
themselves reach, against the memory-bound batch norm, ReLU and pooling.
``--models small-cnn p-poolfirst`` compares the default model with its pool-first variant
(``bench_gtsrb_models.py``): the same FLOPs, batch norm and ReLU on a quarter of the activations.
``--allocator-ab R`` reruns the benchmark in R pairs of fresh processes, glibc's default malloc
(``BACKDOORLAB_MALLOC=system``) then the tuned one ``fit()`` sets (``utils.tune_cpu_allocator``),
and reports the ratio of their rates. ``--isa-ab R`` does the same for the kernels this CPU picks
against ATen and oneDNN pinned to AVX2 (``tests/conftest.py``'s one training path).
Usage: python benchmarks/bench_train_throughput.py [--models ...] [--device auto] [--profile]
       [--allocator-ab R] [--isa-ab R]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _common import table, write
from torch.utils.flop_counter import FlopCounterMode

from backdoorlab.data import TensorData
from backdoorlab.models import build_model
from backdoorlab.train import TrainConfig, fit
from backdoorlab.utils import resolve_device, tune_cpu_allocator


def peak_matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` FP32 ``n x n`` matmul rate (GFLOP/s): the practical peak."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def train_flops_per_image(model: torch.nn.Module, size: int = 32) -> float:
    """FLOPs of one forward + backward pass per image (counted by torch's FlopCounterMode)."""
    m = model.train()
    x = torch.rand(8, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    m.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 8


def measure(name: str, n_images: int, epochs: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(name, 10, 3, (0.5,) * 3, (0.25,) * 3)
    flops = train_flops_per_image(model)
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, 256, (n_images, 32, 32, 3), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n_images,), generator=g))
    fit(model, data.subset(torch.arange(min(512, n_images))), TrainConfig(epochs=1), generator=g,
        device=device, crop_pad=4, hflip=True, progress=False)  # warm-up
    r = fit(model, data, TrainConfig(epochs=epochs), generator=g, device=device, crop_pad=4, hflip=True,
            progress=False)
    return {"model": name, "images": n_images * epochs, "images_per_s": r.images_per_s,
            "train_gflop_per_image": flops / 1e9, "achieved_gflops": r.images_per_s * flops / 1e9}


KINDS = (("conv forward", ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution",
                            "aten::cudnn_convolution")),
         ("conv backward", ("aten::convolution_backward",)),
         ("batch norm", ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                         "aten::cudnn_batch_norm", "aten::cudnn_batch_norm_backward")),
         ("relu", ("aten::relu_", "aten::clamp_min_", "aten::threshold_backward")),
         ("pooling", ("aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward",
                      "aten::adaptive_max_pool2d", "aten::adaptive_max_pool2d_backward")))


def profile_step(name: str, device: torch.device, batch: int = 256, steps: int = 10) -> dict:
    """Self time of one ``fit()``-like SGD step per operator kind, and the convolutions' FLOP rate."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(name, 10, 3, (0.5,) * 3, (0.25,) * 3).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    conv_flops = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "convolution" in str(op))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    self_us = {e.key: getattr(e, attr) for e in prof.key_averages()}
    total = sum(self_us.values())
    kinds = {k: sum(self_us.get(op, 0.0) for op in ops) for k, ops in KINDS}
    kinds["other"] = total - sum(kinds.values())
    conv_s = (kinds["conv forward"] + kinds["conv backward"]) / 1e6
    return {"model": name, "batch": batch, "steps": steps, "step_ms": total / steps / 1e3,
            "share": {k: v / total for k, v in kinds.items()},
            "conv_gflops": conv_flops * steps / max(conv_s, 1e-9) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["small-cnn", "preact-resnet18"],
                    help="registered models, or bench_gtsrb_models' variants of the default (p-poolfirst, ...)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    ap.add_argument("--profile", action="store_true", help="split the first model's step by operator kind")
    ap.add_argument("--allocator-ab", type=int, metavar="R", default=0,
                    help="R pairs of fresh processes: glibc's default malloc against the tuned one")
    ap.add_argument("--isa-ab", type=int, metavar="R", default=0,
                    help="R pairs of fresh processes: the CPU's own kernels against ATen and oneDNN pinned to AVX2")
    args = ap.parse_args()
    for kind in ("allocator", "isa"):
        rounds = getattr(args, f"{kind}_ab")
        if rounds:
            if args.profile or resolve_device(args.device).type != "cpu":
                ap.error(f"--{kind}-ab measures CPU training only, without --profile")
            return ab(args, kind, rounds)
    from bench_gtsrb_models import register

    register()
    from backdoorlab.models import MODELS

    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS.names())}")
    dev = resolve_device(args.device)
    allocator = tune_cpu_allocator() if dev.type == "cpu" else None  # fit() would set it; before the peak too
    sizes = {"small-cnn": (4096, 2), "preact-resnet18": (512, 1)}
    peak_before = peak_matmul_gflops(dev)
    rows = [measure(m, *sizes.get(m, (1024, 1)), dev) for m in args.models]
    prof = profile_step(args.models[0], dev) if args.profile else None
    peak = max(peak_before, peak_matmul_gflops(dev))
    for r in rows:
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
    payload = {"device": str(dev), "allocator": allocator, "peak_matmul_gflops": peak, "rows": rows,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if prof is not None:
        prof["conv_fraction_of_peak"] = prof["conv_gflops"] / peak
        payload["profile"] = prof
    path = write("train_throughput", payload, args.out)
    print(f"peak FP32 matmul: {peak:.1f} GFLOP/s on {dev}")
    print(table(["model", "images/s", "train GFLOP/image", "achieved GFLOP/s", "fraction of peak"],
                [[r["model"], r["images_per_s"], r["train_gflop_per_image"], r["achieved_gflops"],
                  r["fraction_of_peak"]] for r in rows]))
    if prof is not None:
        print(f"\n{prof['model']}, one SGD step at batch {prof['batch']}: {prof['step_ms']:.1f} ms; the "
              f"convolutions run at {prof['conv_gflops']:.1f} GFLOP/s ({prof['conv_fraction_of_peak']:.3f} of peak)")
        print(table(["operator kind", "share of step time"], [[k, v] for k, v in prof["share"].items()]))
    print(f"wrote {path}")


# the A/B comparisons: for each, its setting name in the rows and the environment of each mode
_ISA_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
AB = {
    "allocator": {"system": {"BACKDOORLAB_MALLOC": "system"}, "tuned": {"BACKDOORLAB_MALLOC": "tuned"}},
    # tests/conftest.py's pinning against the kernels this CPU would pick
    "isa": {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}},
}


def ab(args: argparse.Namespace, kind: str, rounds: int) -> None:
    """Alternate fresh processes under each setting of ``kind`` (process-wide, set once): the
    ratio of the second mode's training rate to the first's, measured in the same run."""
    modes = AB[kind]
    first, second = list(modes)
    runs: list[dict] = []  # one fresh process per round, setting and model: its peak RSS is that model's
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode, extra in modes.items():
                env = {k: v for k, v in os.environ.items() if kind != "isa" or k not in _ISA_VARS}
                for m in args.models:
                    out = os.path.join(tmp, f"{r}-{mode}-{m}.json")
                    subprocess.run([sys.executable, __file__, "--models", m, "--device", "cpu", "--out", out],
                                   env={**env, **extra}, check=True, stdout=subprocess.DEVNULL)
                    got = json.loads(open(out).read())
                    if kind == "allocator":
                        assert got["allocator"] == mode, got["allocator"]
                    x = got["rows"][0]
                    runs.append({"round": r, kind: mode, "peak_matmul_gflops": got["peak_matmul_gflops"],
                                 "peak_rss_mb": got["peak_rss_mb"],
                                 "cpu_capability": got["machine"]["torch_cpu_capability"], **x})
                    print(f"round {r} {mode}: {m} {x['images_per_s']:.0f} images/s ({x['fraction_of_peak']:.3f} "
                          f"of peak), peak RSS {got['peak_rss_mb']:.0f} MB", flush=True)
    summary = []
    for m in args.models:
        def of(key: str, mode: str, m: str = m) -> list[float]:
            return [run[key] for run in runs if run[kind] == mode and run["model"] == m]

        rate, frac, rss = ({mode: of(k, mode) for mode in modes}
                           for k in ("images_per_s", "fraction_of_peak", "peak_rss_mb"))
        summary.append({"model": m, "images_per_s": {k: statistics.mean(v) for k, v in rate.items()},
                        "peak_rss_mb": {k: max(v) for k, v in rss.items()},
                        "fraction_of_peak": {k: [min(v), statistics.mean(v), max(v)] for k, v in frac.items()},
                        f"ratio_{second}_to_{first}": statistics.mean(rate[second]) / statistics.mean(rate[first])})
    name = "train_throughput_allocator" if kind == "allocator" else f"train_throughput_{kind}"
    path = write(name, {"rounds": rounds, "modes": modes, "runs": runs, "summary": summary}, args.out)
    print(table(["model", f"{first} images/s", f"{second} images/s", f"{second} / {first}",
                 f"fraction of peak {first} (min-max)", f"fraction of peak {second} (min-max)",
                 f"peak RSS {first} / {second} (MB)"],
                [[s["model"], s["images_per_s"][first], s["images_per_s"][second], s[f"ratio_{second}_to_{first}"],
                  "{:.3f}-{:.3f}".format(*s["fraction_of_peak"][first][::2]),
                  "{:.3f}-{:.3f}".format(*s["fraction_of_peak"][second][::2]),
                  f"{s['peak_rss_mb'][first]:.0f} / {s['peak_rss_mb'][second]:.0f}"] for s in summary]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
