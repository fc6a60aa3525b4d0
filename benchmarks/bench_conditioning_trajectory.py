"""How a compression-conditioned backdoor develops during its training phase: after every
``--every`` epochs the model being fine-tuned is deployed for real (``compress``) at each
precision and CA / ASR are measured on every second image of the GTSRB test subset of the tests
(6000 train / 2000 test, small-cnn). The phase starts from the tests' cached clean or BadNets
model. Writes benchmarks/results/conditioning_<label>.json and prints a markdown table.

Usage: python benchmarks/bench_conditioning_trajectory.py LABEL 'ATTACK_SPEC_JSON' PRECISIONS [--every 2]
  e.g. ... prune50 '{"name": "prune-conditioned", "sparsity": 0.5, "epochs": 8}' fp32,prune-l1-50
(needs BACKDOORLAB_DATA; trained models are cached under BACKDOORLAB_HOME)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("label")
    ap.add_argument("spec", help="the attack spec as JSON (a model-level attack: qcb, pqbackdoor, prune-conditioned)")
    ap.add_argument("precisions", help="comma-separated deployments to measure, e.g. fp32,int8-torch")
    ap.add_argument("--every", type=int, default=2)
    args = ap.parse_args()

    import _helpers
    import torch
    from _helpers import gtsrb_study, trained_gtsrb

    from backdoorlab.attacks import ATTACKS
    from backdoorlab.bench.pipeline import evaluate
    from backdoorlab.compress import compress
    from backdoorlab.train.fit import Hook, fit
    from backdoorlab.utils import generator

    try:
        spec = json.loads(args.spec)
    except json.JSONDecodeError as exc:
        ap.error(f"spec is not valid JSON: {exc}")  # one line, exit 2
    precisions = args.precisions.split(",")
    init = spec.get("init", "badnets" if spec.get("name") == "pqbackdoor" else "none")
    base = trained_gtsrb(init)
    pipe = _helpers._PIPE
    cell = gtsrb_study(attacks=(spec,)).cells()[0]
    bundle = pipe.data(cell.dataset)
    attack = ATTACKS.build(spec, info=bundle.info)
    poisoned = pipe.poison(cell)
    test = bundle.test.subset(torch.arange(0, len(bundle.test), 2))

    def measure(model) -> dict[str, dict[str, float]]:
        m = copy.deepcopy(model).cpu().eval()
        out = {}
        for p in precisions:
            r = evaluate(compress(p, m, calib=poisoned.holdout), test, attack)
            out[p] = {"ca": round(r["ca"], 4), "asr": round(r["asr"], 4)}
        return out

    points = [{"epoch": 0, **measure(base.model)}]
    print(points[-1], flush=True)

    class Probe(Hook):
        def on_epoch_end(self, state, metrics):
            if (state.epoch + 1) % args.every == 0 or state.epoch + 1 == cfg.epochs:
                points.append({"epoch": state.epoch + 1, "train_acc": round(metrics["train_acc"], 4),
                               **measure(state.model)})
                print(points[-1], flush=True)

    cfg = attack.train_config(cell.train)
    t0 = time.perf_counter()
    fit(copy.deepcopy(base.model), poisoned.split.data, cfg, generator=generator(cell.seed, "train"),
        hooks=[attack.train_hook(), Probe()], device="auto", crop_pad=bundle.info.crop_pad,
        hflip=bundle.info.hflip, progress=False)
    wall = time.perf_counter() - t0
    path = write(f"conditioning_{args.label}", {"spec": spec, "init": init, "precisions": precisions,
                                                "test_images": len(test), "wall_s": wall, "points": points})
    print(table(["epoch", *[f"{p} CA / ASR" for p in precisions]],
                [[pt["epoch"], *[f"{pt[p]['ca']:.3f} / {pt[p]['asr']:.3f}" for p in precisions]] for pt in points]))
    print(f"wrote {path} ({wall:.0f} s, including the probes)")


if __name__ == "__main__":
    main()
