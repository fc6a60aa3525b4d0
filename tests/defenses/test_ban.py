"""BAN on the GTSRB subset (43 classes, 32x32, small-cnn; target 0): BadNets (3x3 white corner
patch), two triggers that are not patches, Blended and WaNet (a warp; its ASR on this subset is
only about 0.35), and the clean model.

Budget: the paper's defaults (README detection command: eps 0.3, 30 noise steps on a batch of 128,
20 x 20 mask steps); a scan costs 10-17 s on one CPU thread, so no smaller budget is needed.

What was measured (fp32, holdout of 300 images, seeds 0 / 1; "acc" = clean accuracy of the noised
model, the statistic the 0.25 threshold is applied to, "share" = share of the other labels'
images the noised model sends to its most predicted label):

=========  ===============================  ================================  =========================
model      eps 0.3 (default): acc, top,     eps 0.5: acc, top, share          negative features + noise
           share                                                              (eps 0.3): acc, top
=========  ===============================  ================================  =========================
BadNets    0.517 / 0.543, 0, 0.45 / 0.41    0.030 / 0.133, 0, 0.98 / 0.86     0.010, 0 / 0.010, 0
Blended    0.380 / 0.183, 0, 0.50 / 0.79    0.060 / 0.013, 0, 0.75 / 0.99     0.040, 4 / 0.033, 25
WaNet      0.013 / 0.027, 0, 1.00 / 0.98    0.010 / 0.010, 0, 1.00 / 1.00     0.010, 0 / 0.010, 0
clean      0.823 / 0.800, 4 / 5, 0.12/0.07  0.370 / 0.387, 4 / 5, 0.21 / 0.26  0.027, 25 / 0.020, 28
=========  ===============================  ================================  =========================

So at the paper's defaults BAN detects WaNet (target 0) and does not flag the clean model, but
misses BadNets (seed 0 and 1) and Blended at seed 0: their noised models do send their errors to
label 0 (share 0.41-0.79 against the clean model's 0.07-0.12), yet keep more than a quarter of
their accuracy, because eps 0.3 is too weak a perturbation for this small CNN (the threshold 0.25
comes from the reference's CIFAR-10 ResNet-18). At eps 0.5 all three are detected with target 0
and the clean model is not flagged (its accuracy 0.37-0.39). Applying the threshold to the
negative features instead (``decide_on="noise-negative"``) flags every model, the clean one
included: the mask objective maximises the negative features' loss, so they collapse onto one
label for any model (the target for BadNets and WaNet, an arbitrary label for Blended and the
clean model). On the int8-torch surrogate (BatchNorm folded; BN re-created on the convs) the
clean model keeps 0.843 (eps 0.3), WaNet collapses to 0 (0.013), BadNets keeps 0.78 (label 5).

The table's WaNet row is the default-width model; the tests now scan the narrow small-cnn's WaNet
model (widths 16-128, shared with ``tests/attacks/test_library_gtsrb.py``; ASR 0.29): at eps 0.3 it
is detected with target 0 at fp32 (acc 0.080, share 0.929) and int8-torch (0.073), and the narrow
clean model is not (acc 0.570, share 0.298; 3-5 s a scan).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.classifier import TorchClassifier
from backdoorlab.data.tensordata import TensorData
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.evaluate import Truth, run_defense
from backdoorlab.defenses.scanners import BAN
from backdoorlab.errors import BackdoorLabError

BUDGET: dict = {}


@pytest.mark.parametrize("params, msg", [
    ({"eps": 0}, "eps must be a number in"),
    ({"eps": 1.5}, "eps must be a number in"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"mask_lambda": -1}, "mask_lambda must be a number >= 0"),
    ({"mask_lr": 0}, "mask_lr must be a number > 0"),
    ({"mask_epochs": True}, "mask_epochs must be an integer"),
    ({"batches_per_epoch": 0}, "batches_per_epoch must be an integer"),
    ({"batch_size": 1}, "batch_size must be an integer >= 2"),
    ({"n_images": 1}, "n_images must be None or an integer >= 2"),
    ({"acc_threshold": 1.0}, "acc_threshold must be a number in"),
    ({"acc_threshold": float("nan")}, "acc_threshold must be a number in"),
    ({"project": "yes"}, "project must be true or false"),
    ({"decide_on": "mask"}, "decide_on must be one of noise, noise-negative"),
    ({"bogus": 1}, "no parameter 'bogus'"),
])
def test_bad_parameters_are_rejected_before_running(params, msg):
    with pytest.raises(BackdoorLabError, match=msg) as err:
        DEFENSES.validate({"name": "ban", **params})
    assert "\n" not in str(err.value)


def test_defaults_are_the_authors_detection_settings():
    ban = DEFENSES.build("ban")
    assert isinstance(ban, BAN)
    assert (ban.eps, ban.steps, ban.mask_lambda, ban.mask_lr) == (0.3, 30, 0.75, 0.01)
    assert (ban.mask_epochs, ban.batches_per_epoch, ban.batch_size) == (20, 20, 128)
    assert ban.acc_threshold == 0.25 and ban.n_images is None
    assert ban.project is False and ban.decide_on == "noise"


def _tiny_data(n=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g)
    return TensorData(x, torch.arange(n) % 2)


def test_a_model_without_a_global_pool_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    ctx = DefenseContext(clf=TorchClassifier(model, device="cpu"), clean=_tiny_data(), num_classes=2,
                         generator=torch.Generator().manual_seed(0))
    with pytest.raises(BackdoorLabError, match="no global-pool module") as err:
        BAN().scan(ctx)
    assert "\n" not in str(err.value)


def test_the_caller_model_is_untouched_and_the_scan_is_seeded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clf = TorchClassifier(model, device="cpu")
    ban = BAN(steps=2, mask_epochs=2, batches_per_epoch=2, batch_size=4)
    runs = [ban.scan(DefenseContext(clf=clf, clean=_tiny_data(), num_classes=2,
                                    generator=torch.Generator().manual_seed(3))) for _ in range(2)]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert runs[0].score == runs[1].score and runs[0].per_label == runs[1].per_label
    m = runs[0].metrics
    assert m["neurons"] == "batchnorm" and m["neuron_layers"] == 1 and m["feature_shape"] == [4, 8, 8]
    assert runs[0].images["feature_mask"].shape == (4, 1, 8, 8)
    assert sum(runs[0].per_label) == pytest.approx(1.0)


def _ctx(t, clf, seed=0):
    return DefenseContext(clf=clf, clean=t.poisoned.holdout, num_classes=t.bundle.info.num_classes,
                          generator=torch.Generator().manual_seed(seed))


def _scan(attack, precision="fp32", seed=0):
    from _helpers import trained_gtsrb

    from backdoorlab.compress import compress

    t = trained_gtsrb(attack)
    clf = compress(precision, t.model, calib=t.poisoned.holdout, device="cpu")
    truth = Truth(t.attack, t.poisoned.split.is_poisoned, t.bundle.test)
    return run_defense(DEFENSES.build({"name": "ban", **BUDGET}), _ctx(t, clf, seed), truth)


_SCANS: dict = {}
# WaNet runs on the narrow small-cnn of tests/attacks/test_library_gtsrb.py (the same cached model as that
# module's WaNet case, so one training per session instead of two: the default-width one took 99 s)
NARROW = {"name": "small-cnn", "widths": [16, 32, 64, 128]}
MODELS = {"wanet": NARROW, "none-narrow": NARROW}


def _scan(attack, precision="fp32", seed=0, **params):
    """Run BAN (the paper's defaults unless ``params``) once per setting in the session."""
    key = (attack, precision, seed, tuple(sorted(params.items())))
    if key not in _SCANS:
        import time

        from _helpers import trained_gtsrb

        from backdoorlab.compress import compress

        t = trained_gtsrb(attack.removesuffix("-narrow"), model=MODELS.get(attack, "small-cnn"))
        clf = compress(precision, t.model, calib=t.poisoned.holdout, device="cpu")
        truth = Truth(t.attack, t.poisoned.split.is_poisoned, t.bundle.test)
        t0 = time.perf_counter()
        m, images = run_defense(DEFENSES.build({"name": "ban", **params}), _ctx(t, clf, seed), truth)
        m["test_seconds"] = time.perf_counter() - t0
        _SCANS[key] = (m, images)
    return _SCANS[key]


def _common(m, images):
    assert m["defense_kind"] == "scanner" and m["grad_on"] in ("artifact", "surrogate")
    assert m["decide_on"] == "noise" and m["acc_threshold"] == 0.25
    assert m["acc_clean"] >= 0.95  # the unperturbed model is accurate
    assert m["verdict"] is m["detected"] and m["defense_score"] == pytest.approx(1 - m["acc_noise"])
    assert len(m["per_label"]) == 43 and sum(m["per_label"]) == pytest.approx(1.0)
    width = m["feature_shape"][0]  # small-cnn's last conv block (256 wide; 128 narrow), the global max-pool's input
    assert m["feature_shape"] == [width, 4, 4] and width in (128, 256)
    assert m["feature_layer"] == ("body.21" if m["grad_on"] == "artifact" else m["feature_layer"])
    assert images["feature_mask"].shape == (width, 1, 4, 4)
    assert images["feature_mask"].min() >= 0 and images["feature_mask"].max() <= 1
    assert m["n_images"] == m["n_eval"] == 300 and m["seconds"] < 60


def test_the_clean_model_is_not_flagged():
    m, images = _scan("none")
    _common(m, images)
    assert m["neurons"] == "batchnorm" and m["neuron_layers"] == 6
    assert m["detected"] is False and m["flagged"] == [] and m["target"] is None
    assert m["acc_noise"] >= 0.7  # measured 0.823: the noise leaves the clean model most of its accuracy
    assert m["top_share_noise"] <= 0.2  # measured 0.12: and its errors spread over labels
    # the literal reading (threshold on the negative features) would flag it: they collapse for any model
    assert m["acc_noise_negative"] < 0.25 and m["top_share_noise_negative"] >= 0.9  # measured 0.027, 1.0


def test_wanet_is_detected_with_its_target():
    m, images = _scan("wanet")
    _common(m, images)
    assert m["detected"] is True and m["flagged"] == [0] and m["target"] == 0 and m["target_flagged"] is True
    # measured 0.080, 0.929 on the narrow model (0.013, 0.997 at the default width)
    assert m["acc_noise"] <= 0.15 and m["top_share_noise"] >= 0.8
    clean, _ = _scan("none-narrow")  # the narrow clean model is not flagged: measured acc 0.570, share 0.298
    assert clean["detected"] is False and clean["acc_noise"] >= 0.35


# the misses at the paper's eps, the other triggers and the int8 clean case run on demand (`-m slow`),
# to keep the default run within its 20 minutes (each GTSRB case 10-17 s)
SLOW = pytest.mark.slow


@SLOW
@pytest.mark.parametrize("attack, acc_lo, share_lo", [("badnets", 0.4, 0.3), ("blended", 0.3, 0.3)])
def test_badnets_and_blended_are_missed_at_the_paper_eps(attack, acc_lo, share_lo):
    """Measured, not wished: at eps 0.3 the noised BadNets / Blended models keep 0.517 / 0.380 of
    their accuracy (> 0.25), though their errors go to the target (share 0.45 / 0.50)."""
    m, images = _scan(attack)
    _common(m, images)
    assert m["detected"] is False and m["flagged"] == []
    assert m["acc_noise"] >= acc_lo and m["top_label_noise"] == 0 and m["top_share_noise"] >= share_lo
    clean, _ = _scan("none")
    assert m["acc_noise"] < clean["acc_noise"] and m["top_share_noise"] > 2 * clean["top_share_noise"]


@pytest.mark.parametrize("attack", ["badnets", pytest.param("blended", marks=SLOW), pytest.param("wanet", marks=SLOW)])
def test_a_stronger_noise_detects_every_trigger_with_its_target(attack):
    m, images = _scan(attack, eps=0.5)
    _common(m, images)
    assert m["detected"] is True and m["flagged"] == [0] and m["target"] == 0 and m["target_flagged"] is True
    assert m["acc_noise"] <= 0.15  # measured 0.030 (BadNets), 0.060 (Blended), 0.010 (WaNet)


def test_a_stronger_noise_leaves_the_clean_model_unflagged():
    m, images = _scan("none", eps=0.5)
    _common(m, images)
    # measured 0.370, and 0.267 on another CI machine (the model's training path moves with the CPU)
    assert m["detected"] is False and 0.2 <= m["acc_noise"] <= 0.55


@pytest.mark.parametrize("attack, detected", [pytest.param("none", False, marks=SLOW), ("wanet", True)])
def test_the_int8_surrogate_gets_batchnorm_re_created_on_its_folded_convs(attack, detected):
    m, images = _scan(attack, "int8-torch")
    _common(m, images)
    assert m["grad_on"] == "surrogate" and m["neurons"] == "folded-conv" and m["neuron_layers"] == 6
    assert m["detected"] is detected and m["flagged"] == ([0] if detected else [])
    # measured: clean 0.843 (fp32 0.823), WaNet (narrow) 0.073 (fp32 0.080)
    assert (m["acc_noise"] <= 0.15) if detected else (m["acc_noise"] >= 0.7)


def test_batchnorm_re_created_on_folded_convs_is_exact_without_noise():
    from backdoorlab.defenses.scanners.ban import FoldedNeurons, _neurons

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    x = _tiny_data(16).float()
    units, kind = _neurons(model)
    assert kind == "folded-conv" and [u.bn for u in units] == ["0"]
    with torch.no_grad():
        ref = model(x)
        nm = FoldedNeurons(model, units, x)
        nm.perturbed = True  # zero noise, statistics of x: the standardise-rescale round trip is the identity
        out = model(x)
        nm.noise_w[0].fill_(0.5)
        assert not torch.allclose(model(x), ref, atol=1e-3)
        nm.remove()
    assert torch.allclose(out, ref, atol=1e-4) and torch.equal(model(x), ref)
