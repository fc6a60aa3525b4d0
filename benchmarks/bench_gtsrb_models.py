"""Does the default model's shape limit BadNets ASR on GTSRB? (issue 2 asks for 0.95.)

Trains BadNets (3x3 white patch, bottom-right, target 0, 10%) with the tests' GTSRB recipe
(``tests/_helpers.GTSRB_TRAIN``: 10 epochs, batch 128, lr 0.1, no crop) on the first ``--size``
training images, once per ``--seeds`` seed, for the default ``small-cnn`` and for variants of it
that change one thing each, and scores every model on the full 7,949-image test set:

* ``p-poolfirst``: conv -> max-pool -> BN -> ReLU wherever the default pools (airbench's order:
  batch norm and ReLU then run on a quarter of the activations, the same FLOPs);
* ``p-avg``: global average pooling instead of global max pooling;
* ``p-wide``: widths (64, 128, 256, 256) instead of (32, 64, 128, 256), ~3.6x the FLOPs.

The variants are registered here, not in the library; the models go through the artifact cache
under ``BACKDOORLAB_HOME`` under these names, so a rerun reads them back.

Usage: python benchmarks/bench_gtsrb_models.py [--size 6000] [--seeds 0 1] [--out PATH]
(needs BACKDOORLAB_DATA)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from _common import table, write
from torch import nn

from backdoorlab.models import MODELS
from backdoorlab.models.common import ImageClassifier
from backdoorlab.models.small import small_cnn

VARIANTS = {
    "small-cnn": "the default model",
    "p-poolfirst": "conv -> pool -> BN -> ReLU at each pooling",
    "p-avg": "global average pool",
    "p-wide": "widths 64-128-256-256",
}


def variant(pool_first: bool = False, global_pool: str = "max", widths: Sequence[int] = (32, 64, 128, 256)):
    """A factory of the registered ``small_cnn`` with one thing changed. It rearranges that model's
    own modules instead of defining a second architecture, so the variants' layers (and their
    state-dict keys and initial weights) are the default's."""

    def make(num_classes: int, in_channels: int = 3, mean=(0.5,), std=(0.25,)) -> ImageClassifier:
        model = small_cnn(num_classes, in_channels, mean, std, widths=widths)
        mods = list(model.body)
        if pool_first:  # conv, BN, ReLU, pool -> conv, pool, BN, ReLU
            for i, m in enumerate(mods):
                if isinstance(m, nn.MaxPool2d):
                    mods[i - 2:i + 1] = [m, *mods[i - 2:i]]
        if global_pool == "avg":
            mods = [nn.AdaptiveAvgPool2d(1) if isinstance(m, nn.AdaptiveMaxPool2d) else m for m in mods]
        model.body = nn.Sequential(*mods)
        return model

    return make


def register() -> None:
    for name, factory in (("p-poolfirst", variant(pool_first=True)), ("p-avg", variant(global_pool="avg")),
                          ("p-wide", variant(widths=(64, 128, 256, 256)))):
        if name not in MODELS:
            MODELS.register(name)(factory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=6000, help="training images (0: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None, metavar="PATH")
    args = ap.parse_args()
    if args.size < 0 or any(s < 0 for s in args.seeds):
        ap.error("--size and --seeds take non-negative integers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import _helpers

    from backdoorlab.bench.pipeline import Pipeline, evaluate
    from backdoorlab.bench.study import Study
    from backdoorlab.classifier import TorchClassifier

    register()
    pipe = Pipeline(device="auto", progress=False)
    rows = []
    for name in args.models:
        for seed in args.seeds:
            dataset = {"name": "gtsrb", **({"train_limit": args.size} if args.size else {})}
            cell = Study.from_dict({"name": "gtsrb-models", "datasets": [dataset], "models": [name],
                                    "attacks": ["badnets"], "seeds": [seed], "train": _helpers.GTSRB_TRAIN}).cells()[0]
            t = _helpers.Trained(pipe, cell)
            m = evaluate(TorchClassifier(t.model), t.bundle.test, t.attack)
            rows.append({"model": name, "what": VARIANTS[name], "seed": seed,
                         "train_images": len(t.poisoned.split.data), "test_images": len(t.bundle.test),
                         "ca": m["ca"], "asr": m["asr"], "train_s": t.meta["train_wall"]})
            print(f"{name} seed {seed}: CA {m['ca']:.4f}, ASR {m['asr']:.4f}", flush=True)
    path = write("gtsrb_models", {"train": _helpers.GTSRB_TRAIN, "rows": rows}, args.out)
    print(table(["model", "what", "seed", "CA", "ASR", "train s"],
                [[r["model"], r["what"], r["seed"], r["ca"], r["asr"], r["train_s"]] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
