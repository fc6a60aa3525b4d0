"""Dataset load time: first load (decode + cache write) against second load (cache read), in one
run with a fresh cache (issue 2 goal: second CIFAR-10 load under 2 s); and the cost of the content
fingerprint that keys every run id and cache entry (issue 24): hashing the archive once, then the
stat check of an unchanged file, each as a share of the second load.
Usage: python benchmarks/bench_data_load.py [--datasets cifar10 gtsrb]
"""

from __future__ import annotations

import argparse
import os
import shutil
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
        from backdoorlab.data import load_dataset, locate
        from backdoorlab.data.fingerprint import fingerprint

        for name in args.datasets:
            path = locate(name)
            t = time.perf_counter()
            fingerprint(path)
            fp_first = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(100):
                fingerprint(path)
            fp_cached = (time.perf_counter() - t) / 100
            shutil.rmtree(os.path.join(home, "fingerprints"))  # the first load below hashes again
            t = time.perf_counter()
            b = load_dataset(name)
            first = time.perf_counter() - t
            t = time.perf_counter()
            load_dataset(name)
            second = time.perf_counter() - t
            rows.append({"dataset": name, "images": len(b.train) + len(b.test), "first_s": first,
                         "second_s": second, "speedup": first / second, "archive_mb": path.stat().st_size / 1e6,
                         "fingerprint_first_s": fp_first, "fingerprint_cached_s": fp_cached,
                         "fingerprint_first_share_of_second_load": fp_first / second,
                         "fingerprint_cached_share_of_second_load": fp_cached / second})
    path = write("data_load", {"rows": rows}, args.out)
    print(table(["dataset", "images", "first load (s)", "second load (s)", "speed-up", "archive (MB)",
                 "hash once (s)", "cached check (ms)", "cached check / second load"],
                [[r["dataset"], r["images"], r["first_s"], r["second_s"], r["speedup"], r["archive_mb"],
                  r["fingerprint_first_s"], r["fingerprint_cached_s"] * 1e3,
                  r["fingerprint_cached_share_of_second_load"]] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
