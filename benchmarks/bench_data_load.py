"""Dataset load time: first load (decode + cache write) against second load (cache read), in one
run with a fresh cache (issue 2 goal: second CIFAR-10 load under 2 s).
Usage: python benchmarks/bench_data_load.py [--datasets cifar10 gtsrb]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import table, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", nargs="+", default=["cifar10", "gtsrb"])
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["BACKDOORLAB_HOME"] = home
        from backdoorlab.data import load_dataset

        for name in args.datasets:
            t = time.perf_counter()
            b = load_dataset(name)
            first = time.perf_counter() - t
            t = time.perf_counter()
            load_dataset(name)
            second = time.perf_counter() - t
            rows.append({"dataset": name, "images": len(b.train) + len(b.test), "first_s": first,
                         "second_s": second, "speedup": first / second})
    path = write("data_load", {"rows": rows}, args.out)
    print(table(["dataset", "images", "first load (s)", "second load (s)", "speed-up"],
                [[r["dataset"], r["images"], r["first_s"], r["second_s"], r["speedup"]] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
