"""SFD / Ex-Ray (Liu et al., CVPR 2022): natural feature or injected backdoor?

On the GTSRB subset: a source-specific BadNets model (sources 1 and 2, target 0, 3x3 white patch in
the bottom-right corner; ASR 0.996) and the clean model. Each judgement uses the holdout plus the
test images of the two classes (correctly classified: class 1: 123, class 2: 122, class 0: 12; clean
pair: class 5: 95, class 2: 148), at the penultimate layer unless said otherwise.

* BadNets, pair (target 0, victim 1), the attack's own trigger: *injected* (trigger mask 38.7 of 256
  features, class mask 82.5, overlaps 0.30 / 0.64; a clean image's class features copied into its
  stamped copy bring the victim label back for 34% only). The same trigger on victim 2: *natural*,
  a miss (0.86 of the trigger mask lies within the class mask; injected at the authors' layer).
* K-Arm's triggers for 0 <- 1 from the holdout: 40 rounds, a 161-pixel blob that also flips the
  clean model: natural; 100 rounds, 15 pixels: natural, a miss; 300 rounds, 7.8 pixels: injected.
* The scanner, pre-screening cut to the arms aiming at 0: one 4.7-pixel corner trigger (victim 2),
  natural at the penultimate layer, injected and flagged at the authors' layer (``body.16``).
* Clean model, its most confused pair (speed limit 80 read as 50, 5 of 89 test images): K-Arm's
  3.2-pixel trigger reads *natural* (overlaps 0.93 / 0.88, cross-checks 0.97-1.0).

These numbers belong to one training path: another CPU or thread count trains another model from
the same seed (the tests' run with one thread per worker: 128 / 125 test images, K-Arm's holdout
arm converging to another trigger, another most-confused clean pair, victim 2 reading injected).
The default run asserts what held on every path measured (the attack's trigger on victim 1 reads
injected, the clean model's most confused pair reads natural, the scanner's structure); the
path-specific findings (the second source class, K-Arm's holdout triggers by budget, the verdict
by layer) run on demand with ``-m slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.classifier import TorchClassifier
from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses.scanners import SFD
from backdoorlab.defenses.scanners.k_arm import SPECIFIC, KArm
from backdoorlab.defenses.scanners.sfd import (
    INJECTED,
    NATURAL,
    decide,
    split_features_head,
    symmetric_feature_differencing,
)
from backdoorlab.errors import BackdoorLabError

SOURCE_SPECIFIC = {"name": "badnets", "mode": "source-specific", "sources": [1, 2], "target": 0}


@pytest.mark.parametrize("params, msg", [
    ({"epochs": 0}, "sfd: epochs must be an integer >= 1"),
    ({"batch_size": True}, "sfd' batch_size must be an integer"),  # type errors: the registry's message
    ({"lr": 0}, "sfd: lr must be a number > 0"),
    ({"weight": -1}, "sfd: weight must be a number > 0"),
    ({"beta": 1.5}, r"sfd: beta must be a number in \[0, 1\]"),
    ({"gamma": float("nan")}, "sfd: gamma must be a number"),
    ({"layer": "conv5"}, "sfd: layer must be 'penultimate' or 'body.<i>'"),
    ({"layer": 16}, "sfd' layer must be a string"),
    ({"k_arm": "fast"}, "sfd' k_arm must be"),
    ({"k_arm": {"steps": 0}}, "sfd: k_arm: k-arm: steps must be an integer >= 1"),
    ({"k_arm": {"bogus": 1}}, "sfd: k_arm: .*no parameter 'bogus'"),
    ({"bogus": 1}, "no parameter 'bogus'"),
])
def test_bad_parameters_are_rejected_before_running(params, msg):
    with pytest.raises(BackdoorLabError, match=msg) as err:
        DEFENSES.validate({"name": "sfd", **params})
    assert "\n" not in str(err.value)


def test_defaults_are_the_authors():
    s = DEFENSES.build("sfd")
    assert isinstance(s, SFD)
    assert (s.epochs, s.lr, s.batch_size, s.weight) == (400, 5e-2, 10, 10.0)  # mask_prune_by_neuron_mask
    assert (s.beta, s.gamma) == (0.8, 0.8)  # appendix G
    assert isinstance(s.karm, KArm) and s.karm.steps == 1000  # the upstream scanner at its own defaults
    assert DEFENSES.build({"name": "sfd", "k_arm": {"steps": 7}}).karm.steps == 7


def test_the_decision_rule():
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert decide(a, a, [0.0] * 4, 0.8, 0.8)[0] == NATURAL  # the same features
    assert decide(a, b, [0.0] * 4, 0.8, 0.8) == (INJECTED, "trigger features differ from the class features")
    assert decide(a, b, [0.9, 0.9, 0.9, 0.0], 0.8, 0.8)[0] == NATURAL  # three cross-checks pass
    assert decide(a, b, [0.5] * 4, 0.8, 0.8)[0] == NATURAL  # all four at 0.4 or more
    assert decide(a, b, [0.9, 0.9, 0.0, 0.39], 0.8, 0.8)[0] == INJECTED
    # trigger features within the class's: 0.9 of the trigger mask's mass is shared
    assert decide(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.9, 0.0, 0.0, 0.1]), [0.0] * 4, 0.8, 0.8) == (
        NATURAL, "trigger features within the class's")
    # the class mask is the smaller share of the overlap but flips the stamped images
    assert decide(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.5, 1.0, 1.0, 0.0]), [0, 0, 0.9, 0], 0.8,
                  0.8) == (NATURAL, "class mask smaller and it flips the stamped images")


def test_a_model_without_features_and_head_is_refused():
    clf = TorchClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), device="cpu")
    x, y = torch.rand(6, 3, 4, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(BackdoorLabError, match="sfd needs the penultimate features and the last layer") as err:
        symmetric_feature_differencing(clf, x, y, 1, 0, (torch.zeros(1, 4, 4), torch.zeros(3, 4, 4)))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------- GTSRB
def _pair_data(t, target, victim):
    """The holdout plus the test images of the two classes."""
    hold, test = t.poisoned.holdout, t.bundle.test
    sel = torch.nonzero(torch.isin(test.y.long(), torch.tensor([target, victim]))).flatten()
    return torch.cat([hold.float(), test.subset(sel).float()]), torch.cat([hold.y.long(), test.y.long()[sel]])


@pytest.fixture(scope="module")
def badnets():
    from _helpers import trained_gtsrb

    return trained_gtsrb(SOURCE_SPECIFIC)


def test_the_source_specific_badnets_model_is_backdoored(badnets):
    from backdoorlab.bench.pipeline import evaluate

    m = evaluate(TorchClassifier(badnets.model, device="cpu"), badnets.bundle.test, badnets.attack)
    assert m["asr"] > 0.95 and m["ca"] > 0.9


def _judge(t, target, victim, trigger, **kw):
    clf = TorchClassifier(t.model, device="cpu")
    x, y = _pair_data(t, target, victim)
    gen = torch.Generator().manual_seed(0)
    return symmetric_feature_differencing(clf, x, y, target, victim, trigger, generator=gen, **kw)


def test_the_injected_trigger_reads_injected(badnets):
    r = _judge(badnets, 0, 1, badnets.attack.apply)
    assert r["verdict"] == INJECTED and r["rule"] == "trigger features differ from the class features"
    assert r["n_features"] == 256 and r["n_victim"] >= 100 and r["n_target"] >= 5 and r["n_stamped"] >= 100
    assert r["class_reached"] and r["trigger_reached"] and r["trigger_success"] > 0.95
    # measured 38.7 and 82.5 (35.2 / 56.9 and 33.6 / 43.7 on two other training paths)
    assert 25 < r["trigger_mask_size"] < 55 and 35 < r["class_mask_size"] < 110
    assert r["overlap_class"] < 0.5 and r["overlap_trigger"] < 0.8  # measured 0.30, 0.64: below beta
    # the trigger mask moves class images less than the class mask moves stamped ones (0.18, 0.33;
    # 0.63, 0.25 on the pinned AVX2 path of tests/conftest.py), and a clean image's class features
    # copied into its stamped copy bring the victim label back for a third only (0.34; 0.08)
    t_on_c_v, t_on_c_t, c_on_t_v, c_on_t_s = r["cross_checks"]
    assert max(t_on_c_v, t_on_c_t, c_on_t_s) < 0.75 and min(t_on_c_t, c_on_t_s) < 0.5 and c_on_t_v > 0.9
    assert min(r["own_checks"]) > 0.9  # each mask flips its own pairs both ways


@pytest.mark.slow
def test_the_second_source_class_reads_natural(badnets):
    """The same trigger on the other source class, 2: its features lie within the ~77 features
    separating classes 0 and 2 (0.86 of the trigger mask's mass, above beta = 0.8), and the class
    mask restores the victim label on 99% of the stamped images: natural, a miss. (At the
    authors' layer, the output of the second-to-last convolution, ``layer="body.16"``, the same
    pair reads injected: overlaps 0.35 / 0.74, 22 s.)"""
    r = _judge(badnets, 0, 2, badnets.attack.apply)
    assert r["verdict"] == NATURAL and r["rule"] == "trigger features within the class's"
    assert r["overlap_trigger"] > 0.8 and r["cross_checks"][3] > 0.9  # measured 0.86, 0.99


@pytest.mark.slow
@pytest.mark.parametrize("rounds, size, clean_flips, verdict", [
    (40, (150, 170), (0.5, 0.7), NATURAL),  # a 161-pixel central blob that flips the clean model too
    (100, (14, 16), (0.0, 0.01), NATURAL),  # 15 pixels, only the backdoored model flips: a miss
    (300, (7, 9), (0.0, 0.01), INJECTED),  # 7.8 pixels, ditto
])
def test_k_arm_triggers_from_the_holdout(badnets, rounds, size, clean_flips, verdict):
    """K-Arm's label-specific arm 0 <- 1 on the holdout (19 images of class 1), seed 0. None of
    its triggers is the attack's corner patch; whether SFD calls them injected depends on which
    features they carry."""
    from _helpers import trained_gtsrb

    from backdoorlab.defenses.scanners.sfd import stamp

    clf = TorchClassifier(badnets.model, device="cpu")
    hold = badnets.poisoned.holdout
    arms, _ = KArm(steps=rounds).optimise(clf, hold.float(), hold.y, [(0, 1)], SPECIFIC,
                                          torch.Generator().manual_seed(0))
    mask, pattern = arms[0].trigger()
    assert size[0] < arms[0].best_reg < size[1]
    x, y = _pair_data(badnets, 0, 1)
    clean = TorchClassifier(trained_gtsrb("none").model, device="cpu")
    flips = float((clean.predict(stamp(x[y == 1], mask, pattern)) == 0).float().mean())
    assert clean_flips[0] <= flips <= clean_flips[1]
    assert _judge(badnets, 0, 1, (mask, pattern))["verdict"] == verdict


def test_the_most_confused_clean_pair_reads_natural():
    from _helpers import trained_gtsrb

    t = trained_gtsrb("none")
    clf = TorchClassifier(t.model, device="cpu")
    test = t.bundle.test
    pred, true = clf.predict(test.float()), test.y.long()
    confusion = torch.zeros(43, 43, dtype=torch.long).index_put_((true, pred), torch.ones_like(true), accumulate=True)
    confusion.fill_diagonal_(0)
    victim, target = divmod(int(confusion.argmax()), 43)
    assert int(confusion.max()) >= 3  # measured (5, 2, 5): speed limit 80 read as 50; another path (18, 24, 9)
    # the trigger: K-Arm's arm 2 <- 5 on the holdout and the test images of both classes
    r = _judge(t, target, victim, None, k_arm={"steps": 100})
    assert r["trigger_rounds"] == 100 and r["trigger_success"] > 0.95
    # measured 3.2 pixels on the pair (5, 2): a natural backdoor under K-Arm's 20.4-pixel bound; 46.1 on
    # another path's most confused pair (24 read as 18, 9 images), above the bound
    assert r["trigger_l1"] < 50
    assert r["verdict"] == NATURAL and r["rule"] == "class features within the trigger's"
    # measured 0.93, cross-checks 0.97-1.0; 0.83 on the other path (the rule's gamma is 0.8)
    assert r["overlap_class"] > 0.8
    assert r["seconds"] < 25


@pytest.mark.parametrize("precision", ["int8-torch", "int8-ort"])
def test_the_int8_surrogates_split_into_features_and_head(badnets, precision):
    from backdoorlab.compress import compress

    clf = compress(precision, badnets.model, calib=badnets.poisoned.holdout, device="cpu")
    sur = clf.surrogate
    feat, head = split_features_head(sur.module)
    x = badnets.poisoned.holdout.float()[:64]
    with torch.no_grad():
        f = feat(sur._input(x))
        assert f.shape == (64, 256) and torch.equal(head(f), sur.logits(x))
    if precision == "int8-torch":
        xp, yp = _pair_data(badnets, 0, 1)
        r = symmetric_feature_differencing(sur, xp, yp, 0, 1, badnets.attack.apply)
        assert r["verdict"] == INJECTED


def test_the_authors_layer_is_a_body_split(badnets):
    model = badnets.model
    feat, head = split_features_head(model, layer="body.16")
    x = badnets.poisoned.holdout.float()[:8]
    with torch.no_grad():
        f = feat(x)
        assert f.shape == (8, 128, 8, 8) and torch.allclose(head(f), model(x), atol=1e-5)
    with pytest.raises(BackdoorLabError, match="sfd: layer must be 'penultimate' or 'body.<i>'"):
        split_features_head(model, layer="body.99")


def _scan_aiming_at_0(badnets, monkeypatch, layer):
    from backdoorlab.defenses import DefenseContext
    from backdoorlab.defenses.scanners import sfd as sfd_module
    from backdoorlab.defenses.scanners.k_arm import Candidates, pre_screen

    def aiming_at_0(probs, *args, **kwargs):
        c = pre_screen(probs, *args, **kwargs)
        return Candidates(c.trigger_type, [a for a in c.arms if a[0] == 0], c.topk, c.frequency)

    monkeypatch.setattr(sfd_module, "pre_screen", aiming_at_0)
    ctx = DefenseContext(clf=TorchClassifier(badnets.model, device="cpu"), clean=badnets.poisoned.holdout,
                         num_classes=43, generator=torch.Generator().manual_seed(0))
    return DEFENSES.build({"name": "sfd", "layer": layer, "k_arm": {"steps": 300}}).scan(ctx)


def test_the_scanner_judges_each_converged_arm_and_reports_it(badnets, monkeypatch):
    """The scanner end to end at the authors' layer, pre-screening cut to the arms aiming at 0: every
    pair it judged is in the row with its evidence, and the verdict is the pairs' (which victim
    K-Arm's trigger converges on, and so the verdict, move with the training path: see below)."""
    res = _scan_aiming_at_0(badnets, monkeypatch, "body.16")
    m = res.metrics
    assert m["trigger_type"] == SPECIFIC and m["arms"] >= 2 and 0 < m["rounds_used"] <= 300
    # K-Arm finds a trigger for the backdoor's target under its bound
    assert m["pairs"] and all(p["target"] == 0 and p["victim"] != 0 for p in m["pairs"])
    judged = [p for p in m["pairs"] if p["verdict"] is not None]
    assert all(p["trigger_l1"] > 0 and p["n_victim"] >= 1 and p["evidence"] > 1 for p in judged)
    assert res.flagged in ([], [0]) and m["verdict"] is bool(res.flagged)
    assert len(m["natural"]) + len(m["victims"]) == len(judged)
    if res.flagged:
        assert res.score > 1 and res.per_label[0] == res.score


@pytest.mark.slow
@pytest.mark.parametrize("layer, flagged", [("penultimate", []), ("body.16", [0])])
def test_the_scanner_on_k_arm_arms_aiming_at_the_target(badnets, monkeypatch, layer, flagged):
    """The scanner end to end on the holdout, with K-Arm's pre-screening cut to its three arms that
    aim at label 0 (victims 1, 2, 8; of 118). K-Arm converges after 196 rounds with one trigger
    under its 20.4-pixel bound: 4.7 pixels in the corner for victim 2 (it flips 97% of class 2's
    test images on this model, none on the clean one). SFD on the holdout (15 images of class 2,
    3 of class 0) calls it natural at the penultimate layer (a miss) and injected at the authors'
    layer."""
    res = _scan_aiming_at_0(badnets, monkeypatch, layer)
    m = res.metrics
    assert (m["trigger_type"], m["arms"], m["rounds_used"]) == (SPECIFIC, 3, 196)
    (pair,) = m["pairs"]
    assert (pair["target"], pair["victim"], pair["n_victim"], pair["n_target"]) == (0, 2, 15, 3)
    assert 4 < pair["trigger_l1"] < 5.5
    assert res.flagged == flagged and m["verdict"] is bool(flagged)
    if flagged:
        assert m["target"] == 0 and m["victims"] == [2] and m["natural"] == []
        assert res.score == pytest.approx(pair["evidence"]) and res.score > 1 and res.per_label[0] == res.score
    else:
        assert m["target"] is None and res.score == 0 and len(m["natural"]) == 1
        assert set(m["natural"][0]) == {"target", "victim", "class_mask_size", "trigger_mask_size", "overlap_class",
                                        "overlap_trigger", "cross_checks", "rule"}
