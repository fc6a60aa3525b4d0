"""How visible is the default BadNets patch on GTSRB? Share of non-target test images whose
bottom-right 3x3 corner is already near-white, where a white patch changes (almost) nothing.
This bounds the ASR any model can reach with the default trigger (issue 2 asks for 0.95).

``--failures`` also trains (or reads from the artifact cache under ``BACKDOORLAB_HOME``) the
tests' GTSRB BadNets model (6k / 2k subset, small-cnn, ``tests/_helpers.py``) and breaks its
attack failures down by how much the trigger changes each image: the largest absolute pixel
change (in [0, 1]) that applying the patch makes.

``--sizes N [N ...]`` trains the tests' recipe (small-cnn, 10 epochs, batch 128, lr 0.1, no crop,
BadNets 10%, target 0) on the first N GTSRB training images (0: all 25,087), once per ``--seeds``
seed, through the artifact cache, and scores each model on the full 7,949-image test set, with the
same breakdown of its failures: how ASR grows with the number of poisoned images. ``--train JSON``
overrides entries of that recipe (e.g. ``'{"epochs": 30}'``); the row records the recipe it used.

Usage: python benchmarks/bench_gtsrb_corner.py [--failures] [--sizes 6000 0 --seeds 0 1] [--out PATH]
(needs BACKDOORLAB_DATA)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import table, write

from backdoorlab.data import load_dataset

BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 2.0)


def _tests_helpers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import _helpers

    return _helpers


def failures() -> dict:
    """ASR failures of the tests' BadNets model per bin of the patch's visible change."""
    t = _tests_helpers().trained_gtsrb("badnets")
    return breakdown(t.model, t.attack, t.bundle.test)


def breakdown(model, attack, test) -> dict:
    """``model``'s ASR on ``test`` and its failures per bin of the patch's visible change."""
    from backdoorlab.train.fit import predict

    keep = test.y != attack.target
    x = test.float()[keep]
    xt = attack.apply(x)
    change = (xt - x).abs().flatten(1).amax(1)
    pred = predict(model, xt, device="auto")
    fail = pred != attack.target
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        s = (change >= lo) & (change < hi)
        rows.append({"change_from": lo, "change_to": hi, "images": int(s.sum()), "failures": int((fail & s).sum())})
    return {"n_images": len(x), "asr": 1 - float(fail.float().mean()), "failures": int(fail.sum()), "bins": rows}


def size_cells(sizes: list[int], seeds: list[int], train: dict | None = None) -> list:
    """One BadNets cell per (size, seed): the tests' recipe (``train`` overriding entries of it) on
    the first ``n`` training images (0: all) and the full test set. Validated like a user's study,
    so a bad ``--train`` entry fails here, before anything trains."""
    from backdoorlab.bench.study import Study

    recipe = {**_tests_helpers().GTSRB_TRAIN, **(train or {})}
    return [Study.from_dict({"name": "gtsrb-sizes",
                             "datasets": [{"name": "gtsrb", **({"train_limit": n} if n else {})}],
                             "models": ["small-cnn"], "attacks": ["badnets"], "seeds": [seed],
                             "train": recipe}).cells()[0]
            for n in sizes for seed in seeds]


def by_size(cells: list) -> list[dict]:
    """Train each cell through the artifact cache; CA, ASR and the failure breakdown on the full test set."""
    from backdoorlab.bench.pipeline import Pipeline, evaluate
    from backdoorlab.classifier import TorchClassifier
    from backdoorlab.config import to_dict

    pipe = Pipeline(device="auto", progress=False)
    rows = []
    for cell in cells:
        t = _tests_helpers().Trained(pipe, cell)
        test = t.bundle.test  # the cells set no test_limit: the full test set
        m = evaluate(TorchClassifier(t.model), test, t.attack)
        rows.append({"train_images": len(t.poisoned.split.data), "poisoned": len(t.poisoned.split.poison_idx),
                     "seed": cell.seed, "train": to_dict(cell.train), "ca": m["ca"], "asr": m["asr"],
                     "train_s": t.meta["train_wall"], "failures": breakdown(t.model, t.attack, test)})
        print(f"{rows[-1]['train_images']} images, seed {cell.seed}: CA {m['ca']:.4f}, ASR {m['asr']:.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--failures", action="store_true", help="break the tests' BadNets model's failures down")
    ap.add_argument("--sizes", nargs="+", type=int, default=[], metavar="N",
                    help="train the tests' recipe on the first N training images (0: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--train", type=json.loads, default=None, metavar="JSON",
                    help="override entries of the tests' training recipe for --sizes")
    ap.add_argument("--out", default=None, metavar="PATH",
                    help="write the JSON here instead of benchmarks/results/gtsrb_corner.json")
    args = ap.parse_args()
    if any(n < 0 for n in args.sizes) or any(s < 0 for s in args.seeds):
        ap.error("--sizes and --seeds take non-negative integers")
    if args.train is not None and not isinstance(args.train, dict):
        ap.error("--train takes a JSON object, e.g. '{\"epochs\": 30}'")
    from backdoorlab.errors import BackdoorLabError

    try:
        cells = size_cells(args.sizes, args.seeds, args.train)
    except BackdoorLabError as e:
        ap.error(str(e))
    b = load_dataset("gtsrb")
    corner = b.test.x[b.test.y != 0][:, -3:, -3:, :].float() / 255  # (N, 3, 3, C)
    rows = []
    for t in (0.85, 0.9, 0.95, 0.98):
        rows.append({"threshold": t,
                     "mean_above": float((corner.mean((1, 2, 3)) > t).float().mean()),
                     "every_pixel_above": float((corner.amin((1, 2, 3)) > t).float().mean())})
    out = {"n_images": int(corner.shape[0]), "rows": rows}
    if args.failures:
        out["failures"] = failures()
    if args.sizes:
        out["sizes"] = by_size(cells)
    path = write("gtsrb_corner", out, args.out)
    print(table(["threshold", "share with corner mean above", "share with every corner pixel above"],
                [[r["threshold"], r["mean_above"], r["every_pixel_above"]] for r in rows]))
    if args.failures:
        f = out["failures"]
        print(f"\nBadNets model of the tests: ASR {f['asr']:.3f} ({f['failures']} failures of {f['n_images']})")
        print(table(["patch changes a pixel by", "images", "attack failures"],
                    [[f"[{r['change_from']}, {r['change_to']})", r["images"], r["failures"]] for r in f["bins"]]))
    if args.sizes:
        print("\nBadNets (tests' recipe) by training-set size, on the full test set")
        print(table(["training images", "poisoned", "seed", "CA", "ASR",
                     "failures on images the patch changes by < 0.05"],
                    [[r["train_images"], r["poisoned"], r["seed"], r["ca"], r["asr"],
                      f"{r['failures']['bins'][0]['failures']} of {r['failures']['failures']}"] for r in out["sizes"]]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
