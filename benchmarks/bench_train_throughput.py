"""Training throughput of fit(): images/s for the default model and PreAct-ResNet18, and the
achieved FLOP rate as a fraction of this machine's peak FP32 matmul rate, measured in the same
run (issue 2). Usage: python benchmarks/bench_train_throughput.py [--models ...] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import table, write
from torch.utils.flop_counter import FlopCounterMode

from backdoorlab.data import TensorData
from backdoorlab.models import build_model
from backdoorlab.train import TrainConfig, fit
from backdoorlab.utils import resolve_device


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["small-cnn", "preact-resnet18"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    sizes = {"small-cnn": (4096, 2), "preact-resnet18": (512, 1)}
    peak_before = peak_matmul_gflops(dev)
    rows = [measure(m, *sizes.get(m, (1024, 1)), dev) for m in args.models]
    peak = max(peak_before, peak_matmul_gflops(dev))
    for r in rows:
        r["fraction_of_peak"] = r["achieved_gflops"] / peak
    path = write("train_throughput", {"device": str(dev), "peak_matmul_gflops": peak, "rows": rows}, args.out)
    print(f"peak FP32 matmul: {peak:.1f} GFLOP/s on {dev}")
    print(table(["model", "images/s", "train GFLOP/image", "achieved GFLOP/s", "fraction of peak"],
                [[r["model"], r["images_per_s"], r["train_gflop_per_image"], r["achieved_gflops"],
                  r["fraction_of_peak"]] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
