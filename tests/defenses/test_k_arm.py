"""K-Arm (Shen et al., ICML 2021) on the GTSRB subset (BadNets target 0, 3x3 white corner patch),
as deployed.

Pre-screening with the authors' ``global_theta=0.95`` sends both GTSRB models down the
label-specific path: on the 300 holdout images with top-11 (43 classes x 0.25), the BadNets target
0 is in the top-11 of 67% of them (the next label 48%; the clean model's most frequent label 42%),
so no label reaches 95% and 124 (125 on the clean model) target-victim pairs become arms, their
victims having 0-23 holdout images each. There the paper's 1000 rounds all go to the arms'
warm-up and neither model is flagged (BadNets: best trigger 62.7 pixels, above the 20.4 bound);
with 3000 rounds the BadNets model is flagged with the wrong label 13 (pair 13 <- 6, a 2.2-pixel
trigger on class 6's two holdout images, symmetric ratio 142). ``test_pre_screening_on_gtsrb``
records this. The scans below therefore set ``global_theta=0.6`` (``GTSRB``), a calibration for
this 43-class task read off these two models, between the BadNets target's 0.67 and the 0.48 /
0.42 of any other label: the BadNets model then has one label-agnostic arm, label 0.

Budget: ``steps=40`` rounds in all (one round = one pass of an arm over its images; 300 for a
label-agnostic arm), the authors' schedule otherwise; the target's trigger is then at ~12 pixels,
under the 35.1-pixel bound (1720 scaled from 224x224 to 32x32).
"""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.evaluate import Truth, run_defense
from backdoorlab.defenses.scanners import KArm
from backdoorlab.defenses.scanners.k_arm import AGNOSTIC, SPECIFIC, pre_screen
from backdoorlab.errors import BackdoorLabError

GTSRB = {"global_theta": 0.6}
BUDGET = {"steps": 40, **GTSRB}


def _ctx(t, clf, seed=0):
    return DefenseContext(clf=clf, clean=t.poisoned.holdout, num_classes=t.bundle.info.num_classes,
                          generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("params, msg", [
    ({"steps": 0}, "k-arm: steps must be an integer >= 1"),
    ({"rounds": 1.5}, "k-arm' rounds must be an integer"),  # type errors: the registry's message
    ({"warmup_rounds": 0}, "k-arm: warmup_rounds must be an integer >= 1"),
    ({"batch_size": True}, "k-arm' batch_size must be an integer"),
    ({"lr": -0.1}, "k-arm: lr must be a number > 0"),
    ({"init_cost": 0}, "k-arm: init_cost must be a number > 0"),
    ({"cost_multiplier": 1.0}, "k-arm: cost_multiplier must be a number > 1"),
    ({"attack_succ_threshold": 1.5}, r"k-arm: attack_succ_threshold must be a number in \(0, 1\]"),
    ({"gamma": 0}, r"k-arm: gamma must be a number in \(0, 1\]"),
    ({"global_theta": float("nan")}, "k-arm: global_theta must be a number"),
    ({"local_theta": 2}, "k-arm: local_theta must be a number"),
    ({"epsilon_for_bandits": -0.1}, r"k-arm: epsilon_for_bandits must be a number in \[0, 1\]"),
    ({"beta": 0}, "k-arm: beta must be a number > 0"),
    ({"global_det_bound": -1}, "k-arm: global_det_bound must be a number > 0"),
    ({"ratio_det_bound": "10"}, "k-arm' ratio_det_bound must be a number"),
    ({"ratio_det_bound": 0}, "k-arm: ratio_det_bound must be a number > 0"),
    ({"early_stop": "yes"}, "k-arm' early_stop must be true or false"),
    ({"sym_check": 1}, "k-arm' sym_check must be true or false"),
    ({"bogus": 1}, "no parameter 'bogus'"),
])
def test_bad_parameters_are_rejected_before_running(params, msg):
    with pytest.raises(BackdoorLabError, match=msg) as err:
        DEFENSES.validate({"name": "k-arm", **params})
    assert "\n" not in str(err.value)


def test_defaults_are_the_authors_main_py():
    k = DEFENSES.build("k-arm")
    assert isinstance(k, KArm) and k.steps == 1000
    hp = k.hp
    assert (hp.batch_size, hp.lr, hp.rounds, hp.warmup_rounds, hp.init_cost) == (32, 0.1, 60, 2, 1e-3)
    assert (hp.patience, hp.cost_multiplier, hp.attack_succ_threshold) == (5, 1.5, 0.99)
    assert (hp.early_stop, hp.early_stop_threshold, hp.early_stop_patience) == (False, 1.0, 10)
    assert (hp.epsilon_for_bandits, hp.reset_cost_to_zero, hp.beta) == (0.3, True, 1e4)
    assert (k.gamma, k.global_theta, k.local_theta) == (0.25, 0.95, 0.9)
    assert (k.single_color_opt, k.central_init, k.sym_check) == (True, True, True)
    assert (k.global_det_bound, k.local_det_bound, k.ratio_det_bound) == (1720, 1000, 10)
    # sizes in pixels of 224x224 images, scaled by area to 32x32; beta by the area ratio squared
    hp32, bounds, s = k.scaled(32, 32)
    assert s == pytest.approx(1024 / 224**2)
    assert bounds["global"] == pytest.approx(1720 * s) and bounds["local"] == pytest.approx(1000 * s)
    assert bounds["ratio"] == 10 and hp32.beta == pytest.approx(1e4 * s * s)


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_pre_screening_label_agnostic_and_specific():
    # K = 4 <= 8 classes: top-2. Label 3 is in every image's top-2: a label-agnostic candidate
    p = _probs([[0.6, 0.0, 0.0, 0.4], [0.0, 0.7, 0.0, 0.3], [0.0, 0.1, 0.5, 0.4], [0.2, 0.0, 0.0, 0.8]])
    c = pre_screen(p)
    assert (c.trigger_type, c.arms, c.topk) == (AGNOSTIC, [(3, None)], 2)
    assert c.frequency == pytest.approx([0.5, 0.25, 0.25, 1.0])
    # no label-agnostic one (no label in 95% of the top-2s); label 1 is second for every image
    # predicted 0 or 3, label 0 for those predicted 2, label 3 for those predicted 1
    p = _probs([[0.6, 0.3, 0.0, 0.1], [0.5, 0.4, 0.1, 0.0], [0.1, 0.2, 0.0, 0.7], [0.3, 0.0, 0.6, 0.1],
                [0.35, 0.05, 0.6, 0.0], [0.0, 0.9, 0.0, 0.1]])
    c = pre_screen(p)
    assert c.trigger_type == SPECIFIC and c.arms == [(0, 2), (1, 0), (1, 3), (3, 1)]
    assert pre_screen(p, local_theta=1.0).arms == c.arms
    assert pre_screen(p, local_theta=0.5).arms == c.arms
    # 12 classes -> top-3; each class's two images have different runners-up: no candidate
    rows = []
    for v in range(12):
        for j in range(2):
            r = [0.0] * 12
            r[v], r[(v + 1 + j) % 12], r[(v + 3 + 2 * j) % 12] = 0.7, 0.2, 0.1
            rows.append(r)
    c = pre_screen(_probs(rows))
    assert c.topk == 3 and c.trigger_type is None and c.arms == []
    assert c.frequency == pytest.approx([0.25] * 12)


def test_pre_screening_keeps_three_victims_per_target():
    # 12 classes -> top-3; label 0 follows each of 1..5 in the top-3: its 3 most probable victims stay
    rows = []
    for v, p0 in zip(range(1, 6), (0.1, 0.3, 0.05, 0.2, 0.25)):
        r = [0.0] * 12
        r[v], r[0], r[(v % 5) + 6] = 1 - p0 - 0.01, p0, 0.01
        rows.append(r)
    for v in range(7, 12):  # further classes, so that label 0 is in the top-3 of half the images only
        r = [0.0] * 12
        r[v], r[1], r[2] = 0.9, 0.06, 0.04
        rows.append(r)
    c = pre_screen(_probs(rows))
    assert c.topk == 3 and c.trigger_type == SPECIFIC
    assert [v for t, v in c.arms if t == 0] == [2, 5, 4]


@pytest.fixture(scope="module")
def badnets():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")


# int8-torch (gradients from the surrogate) on demand (`-m slow`, 14 s); the scan tests run K-Arm
# on an INT8 ONNX file in the default run
@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8-torch", marks=pytest.mark.slow)])
def test_k_arm_flags_the_badnets_target(badnets, precision):
    from backdoorlab.compress import compress

    clf = compress(precision, badnets.model, calib=badnets.poisoned.holdout, device="cpu")
    truth = Truth(badnets.attack, badnets.poisoned.split.is_poisoned, badnets.bundle.test)
    m, images = run_defense(DEFENSES.build({"name": "k-arm", **BUDGET}), _ctx(badnets, clf), truth)
    assert m["grad_on"] == ("artifact" if precision == "fp32" else "surrogate")
    assert m["detected"] is True and m["target_flagged"] is True and m["flagged"] == [0]
    assert m["verdict"] is True and m["target"] == 0 and m["victims"] == []
    assert m["trigger_type"] == AGNOSTIC and m["defense_score"] > 1
    assert m["best_mask_l1"] < m["bounds"]["global"]
    assert m["rounds_used"] <= BUDGET["steps"] and m["symmetric"] is None
    assert m["best_reversed_asr_artifact"] >= 0.6
    assert len(m["per_label"]) == 43 and m["per_label"][0] == pytest.approx(m["defense_score"])
    n = len(m["arms"])
    assert images["mask"].shape == (n, 1, 32, 32) and images["pattern"].shape == (n, 3, 32, 32)
    assert images["trigger"].shape == (n, 3, 32, 32)
    for img in images.values():
        assert img.min() >= 0 and img.max() <= 1


def test_k_arm_flags_nothing_on_a_clean_model():
    from _helpers import trained_gtsrb

    from backdoorlab.compress import compress

    t = trained_gtsrb("none")
    clf = compress("fp32", t.model, device="cpu")
    # no label-agnostic candidate: ~125 label-specific arms of a few images each, so the paper's
    # full budget of 1000 rounds costs about as much as 40 rounds of one label-agnostic arm
    res = DEFENSES.build({"name": "k-arm", "steps": 1000, **GTSRB}).scan(_ctx(t, clf))
    m = res.metrics
    assert res.flagged == [] and res.score <= 1 and m["verdict"] is False and m["target"] is None
    assert m["trigger_type"] == SPECIFIC and len(m["arms"]) > 100 and m["rounds_used"] <= 1000
    assert m["best_mask_l1"] is None or m["best_mask_l1"] >= m["bounds"]["local"]
    assert len(res.per_label) == 43 and res.images["mask"].shape == (len(m["arms"]), 1, 32, 32)


def test_pre_screening_on_gtsrb(badnets):
    """The authors' thresholds on the tests' models (see the module docstring)."""
    from _helpers import trained_gtsrb

    from backdoorlab.compress import compress
    from backdoorlab.defenses.scanners.k_arm import _softmax

    freq = {}
    for name, t in (("badnets", badnets), ("none", trained_gtsrb("none"))):
        probs = _softmax(compress("fp32", t.model, device="cpu"), t.poisoned.holdout.float())
        c = pre_screen(probs)
        assert c.topk == 11 and c.trigger_type == SPECIFIC and len(c.arms) > 100
        freq[name] = sorted(c.frequency, reverse=True)
        calibrated = pre_screen(probs, global_theta=GTSRB["global_theta"])
        if name == "badnets":
            # the target leads (which of its victims make the top-k moves with the training path)
            assert c.frequency.index(freq[name][0]) == 0 and sum(a[0] == 0 for a in c.arms) >= 2
            assert calibrated.trigger_type == AGNOSTIC and calibrated.arms == [(0, None)]
        else:
            assert calibrated.trigger_type == SPECIFIC
    # measured 0.67 against < 0.5 (0.82 / 0.42 and 0.77 / 0.50 on two other training paths)
    assert 0.6 <= freq["badnets"][0] <= 0.9 and freq["badnets"][1] <= 0.55
    assert freq["badnets"][0] - freq["badnets"][1] >= 0.15
    assert freq["none"][0] < 0.45


def test_the_bandit_spends_its_rounds_on_the_target(badnets):
    """Four label-agnostic arms, the infected label among them, 80 rounds: the target's arm gets
    more rounds than any other and ends with by far the smallest trigger. (The scheduler's descent
    rate is a mean over the arm's own rounds, so it falls as an arm is chosen: on these arms the
    choice stays close to round-robin, 22 rounds for the target against 19-20 for the others.)"""
    from backdoorlab.compress import compress

    clf = compress("fp32", badnets.model, device="cpu")
    hold = badnets.poisoned.holdout
    karm = KArm(steps=80)
    pairs = [(t, None) for t in (12, 0, 25, 40)]
    arms, used = karm.optimise(clf, hold.float(), hold.y, pairs, AGNOSTIC, torch.Generator().manual_seed(0))
    rounds = {a.target: a.rounds for a in arms}
    assert used == sum(rounds.values()) == 80
    assert all(rounds[0] > r for t, r in rounds.items() if t != 0), rounds
    sizes = sorted((a.best_reg, a.target) for a in arms)
    assert sizes[0][1] == 0 and math.isfinite(sizes[0][0]) and sizes[0][0] < 0.5 * sizes[1][0]
    assert all(p.grad is None and p.requires_grad for p in clf.module.parameters())  # restored
