"""How visible is the default BadNets patch on GTSRB? Share of non-target test images whose
bottom-right 3x3 corner is already near-white, where a white patch changes (almost) nothing.
This bounds the ASR any model can reach with the default trigger (issue 2 asks for 0.95).
Usage: python benchmarks/bench_gtsrb_corner.py   (needs BACKDOORLAB_DATA)
"""

from __future__ import annotations

from _common import table, write

from backdoorlab.data import load_dataset


def main() -> None:
    b = load_dataset("gtsrb")
    corner = b.test.x[b.test.y != 0][:, -3:, -3:, :].float() / 255  # (N, 3, 3, C)
    rows = []
    for t in (0.85, 0.9, 0.95, 0.98):
        rows.append({"threshold": t,
                     "mean_above": float((corner.mean((1, 2, 3)) > t).float().mean()),
                     "every_pixel_above": float((corner.amin((1, 2, 3)) > t).float().mean())})
    path = write("gtsrb_corner", {"n_images": int(corner.shape[0]), "rows": rows})
    print(table(["threshold", "share with corner mean above", "share with every corner pixel above"],
                [[r["threshold"], r["mean_above"], r["every_pixel_above"]] for r in rows]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
