"""How visible is the default BadNets patch on GTSRB? Share of non-target test images whose
bottom-right 3x3 corner is already near-white, where a white patch changes (almost) nothing.
This bounds the ASR any model can reach with the default trigger (issue 2 asks for 0.95).

``--failures`` also trains (or reads from the artifact cache under ``BACKDOORLAB_HOME``) the
tests' GTSRB BadNets model (6k / 2k subset, small-cnn, ``tests/_helpers.py``) and breaks its
attack failures down by how much the trigger changes each image: the largest absolute pixel
change (in [0, 1]) that applying the patch makes.

Usage: python benchmarks/bench_gtsrb_corner.py [--failures]   (needs BACKDOORLAB_DATA)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import table, write

from backdoorlab.data import load_dataset

BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 2.0)


def failures() -> dict:
    """ASR failures of the tests' BadNets model per bin of the patch's visible change."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _helpers import trained_gtsrb

    from backdoorlab.train.fit import predict

    t = trained_gtsrb("badnets")
    test = t.bundle.test
    keep = test.y != t.attack.target
    x = test.float()[keep]
    xt = t.attack.apply(x)
    change = (xt - x).abs().flatten(1).amax(1)
    pred = predict(t.model, xt, device="cpu")
    fail = pred != t.attack.target
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        s = (change >= lo) & (change < hi)
        rows.append({"change_from": lo, "change_to": hi, "images": int(s.sum()), "failures": int((fail & s).sum())})
    return {"n_images": len(x), "asr": 1 - float(fail.float().mean()), "failures": int(fail.sum()), "bins": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--failures", action="store_true", help="break the tests' BadNets model's failures down")
    args = ap.parse_args()
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
    path = write("gtsrb_corner", out)
    print(table(["threshold", "share with corner mean above", "share with every corner pixel above"],
                [[r["threshold"], r["mean_above"], r["every_pixel_above"]] for r in rows]))
    if args.failures:
        f = out["failures"]
        print(f"\nBadNets model of the tests: ASR {f['asr']:.3f} ({f['failures']} failures of {f['n_images']})")
        print(table(["patch changes a pixel by", "images", "attack failures"],
                    [[f"[{r['change_from']}, {r['change_to']})", r["images"], r["failures"]] for r in f["bins"]]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
