"""EFRAP (Li et al., CVPR 2024) against the int8 and int4 quantization-conditioned backdoors on
the shared GTSRB subset: with the defender's 5% clean holdout it must bring the deployed ASR below
0.20 while clean accuracy drops by less than 3 points. The attack models are the ones
tests/attacks/test_compression_conditioned.py trains (same specs, cached by the pipeline)."""

from __future__ import annotations

import pytest
import torch
from _helpers import QCB_INT4, QCB_INT8, QCB_INT8_W, Trained, gtsrb_study, trained_gtsrb

from backdoorlab.bench.pipeline import evaluate
from backdoorlab.compress import compress
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.errors import BackdoorLabError

# the reference code's 10000 steps per layer take ~15 min here; 1000 steps (90 s) already meet the
# thresholds on the int4 model (BENCHMARKS.md)
EFRAP_CPU = {"name": "efrap", "iters": 1000}


def test_efrap_validates():
    for bad in ({"name": "efrap", "penalty": -1}, {"name": "efrap", "iters": -1}, {"name": "efrap", "lr": 0},
                {"name": "efrap", "batch_size": 0}, {"name": "efrap", "lam": -0.1},
                {"name": "efrap", "flip_ratio": 0.5}):
        with pytest.raises(BackdoorLabError):
            DEFENSES.validate(bad)

def _digits_ctx(precision: str, spec=None):
    from backdoorlab.data import load_dataset
    from backdoorlab.models import build_model

    b = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, b.info.channels, b.info.mean, b.info.std).eval()
    hold = b.train.subset(torch.arange(200))
    clf = compress(spec or precision, model, calib=hold)
    ctx = DefenseContext(clf=clf, clean=hold, num_classes=10, generator=torch.Generator().manual_seed(0), model=model)
    return ctx, b.test.float()[:100]


@pytest.mark.parametrize("precision", ["int8-torch", "int4-w"])
def test_efrap_keeps_the_deployment_grid(precision):
    """With no optimisation EFRAP's rounding is the deployment's own round-to-nearest: the rebuilt
    artifact computes exactly what the original does. Optimising changes some roundings, never the
    precision."""
    ctx, x = _digits_ctx(precision)
    same, facts = DEFENSES.build({"name": "efrap", "iters": 0}).repair(ctx)
    assert same.precision == precision and facts["efrap_not_nearest"] == 0
    torch.testing.assert_close(same.logits(x), ctx.clf.logits(x), rtol=1e-4, atol=1e-4)  # float order only
    flipped, facts = DEFENSES.build({"name": "efrap", "iters": 100, "calib_size": 64}).repair(ctx)
    assert flipped.precision == precision
    assert 0 < facts["efrap_not_nearest"] < 0.5, facts
    assert not torch.equal(flipped.logits(x), ctx.clf.logits(x))


def test_efrap_flips_the_roundings_with_the_largest_error():
    """The error-guided term pulls every weight towards the other rounding with the weight of its
    truncation error: the weights that end up flipped are the ones nearest a rounding midpoint.
    Every result is the floor or the ceiling of W/s."""
    import torch.nn.functional as F

    from backdoorlab.defenses.removers.efrap import EFRAP

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g) * 0.1
    s = w.flatten(1).abs().amax(1) / 7  # a 4-bit grid
    x = torch.randn(64, 4, 8, 8, generator=g)

    def op(inp, weight):
        return F.conv2d(inp, weight, padding=1)

    r = w / s.view(-1, 1, 1, 1)
    nearest = torch.round(r)
    midpoint_distance = (r - r.floor() - 0.5).abs()
    ints = EFRAP(iters=300).round_layer(w, s, x, op, -8, 7)
    assert bool(((ints == r.floor()) | (ints == r.ceil())).all())
    flipped = ints != nearest
    assert 0 < float(flipped.float().mean()) < 0.5
    assert float(midpoint_distance[flipped].mean()) < 0.5 * float(midpoint_distance[~flipped].mean())
    unguided = EFRAP(iters=300, penalty=0.0).round_layer(w, s, x, op, -8, 7)
    assert int((unguided != nearest).sum()) < int(flipped.sum())


def test_efrap_refuses_what_it_cannot_repair():
    ctx, _ = _digits_ctx("int4-w", {"name": "int4-w", "group_size": 32})
    with pytest.raises(BackdoorLabError, match="per-channel int4-w"):
        DEFENSES.build("efrap").repair(ctx)
    ctx, _ = _digits_ctx("fp16")
    with pytest.raises(BackdoorLabError, match="int8-torch and"):
        DEFENSES.build("efrap").repair(ctx)


def _repair_conditioned(spec: dict, precision: str):
    """The cached conditioned GTSRB model for ``spec``, deployed at ``precision``, and EFRAP's repair:
    ``(trained, metrics before, repaired classifier, metrics after, EFRAP's facts)``."""
    import _helpers

    trained_gtsrb("none")
    t = Trained(_helpers._PIPE, gtsrb_study(attacks=(spec,)).cells()[0])
    clf = compress(precision, t.model, calib=t.poisoned.holdout)
    before = evaluate(clf, t.bundle.test, t.attack)
    ctx = DefenseContext(clf=clf, clean=t.poisoned.holdout, num_classes=t.bundle.info.num_classes,
                         generator=torch.Generator().manual_seed(0), model=t.model)
    repaired, facts = DEFENSES.build(EFRAP_CPU).repair(ctx)
    return t, before, repaired, evaluate(repaired, t.bundle.test, t.attack), facts


# The paper's threat model (Tian et al.'s weight-only conditioning, tests/attacks:
# test_weight_only_qcb_int8_backdoor_rides_on_weight_rounding). Its 47-minute training does not
# fit CI: `pytest -m slow`.
@pytest.mark.slow
def test_efrap_removes_the_int8_conditioned_backdoor():
    t, before, repaired, after, facts = _repair_conditioned(QCB_INT8_W, "int8-torch")
    assert before["asr"] >= 0.9, before  # the deployed model is backdoored
    assert repaired.precision == "int8-torch"
    assert after["asr"] < 0.20, (before, after, facts)
    assert after["ca"] > before["ca"] - 0.03, (before, after, facts)
    # only int8-torch and int4-w deployments are repaired
    with pytest.raises(BackdoorLabError):
        DEFENSES.build("efrap").repair(DefenseContext(clf=compress("fp32", t.model), clean=t.poisoned.holdout,
                                                      num_classes=43, generator=torch.Generator(), model=t.model))


# A limitation, asserted (BENCHMARKS.md): conditioned through calibrated activation ranges, the
# int8 backdoor is carried by the clipping of one layer's activations (tests/attacks:
# test_qcb_int8_backdoor_rides_on_activation_clipping), which a weight-rounding repair leaves in
# place (measured ASR 0.967 -> 0.946). `pytest -m slow`.
@pytest.mark.slow
def test_efrap_leaves_a_clipping_carried_int8_backdoor():
    _, before, _, after, facts = _repair_conditioned(QCB_INT8, "int8-torch")
    assert before["asr"] >= 0.9, before
    assert after["asr"] >= 0.8, (before, after, facts)
    assert facts["efrap_not_nearest"] > 0, facts  # it did flip roundings


# The int4 conditioned backdoor works (tests/attacks); its 7.5-minute training does not fit CI: `pytest -m slow`.
# Measured at 1000 steps: ASR 0.967 -> 0.040, CA 0.922 -> 0.953 (BENCHMARKS.md).
@pytest.mark.slow
def test_efrap_removes_the_int4_conditioned_backdoor():
    _, before, repaired, after, facts = _repair_conditioned(QCB_INT4, "int4-w")
    assert before["asr"] >= 0.9, before
    assert repaired.precision == "int4-w"
    assert after["asr"] < 0.20, (before, after, facts)
    assert after["ca"] > before["ca"] - 0.03, (before, after, facts)
