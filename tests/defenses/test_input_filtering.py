"""VIF and AIF with Filtering-then-Contrasting (Do et al., ECCV 2022): parameter checks, the filter's
shapes and determinism, and the behaviour on the tests' GTSRB BadNets model (3x3 white corner patch,
target 0) and on the clean GTSRB model.

Measured on 200 clean + 200 triggered test inputs (``run_defense``, ``eval_limit=200``), 2 CPU
cores, FP32 (``MEASURED`` below; the defaults train 200 epochs over 240 holdout images, 123 s):

* VIF at its defaults: AUROC 0.961 (TPR 0.835 at 1% FPR); the filtered classifier ``C o F`` has ASR
  0.010 (from 0.935) at CA 0.850 (from 0.955); FtC flags 92.5% of the triggered and 14.5% of the
  clean inputs, and the accepted clean inputs are classified at 0.983. The paper reports ASR near 0
  with a CA cost of a few points for VIF on GTSRB and FtC recovering the rest: here the filter's CA
  cost is larger (10 points; a 240-image holdout against the paper's larger clean sets), FtC's
  rejection recovers it on what it accepts.
* AIF at its defaults (303 s): AUROC 0.958, filtered ASR 0.005 at CA 0.800, FtC flags 94% of the
  triggered and 20% of the clean inputs (accepted clean inputs: 0.994).
* The tests run VIF at ``TEST_EPOCHS = 100`` (60 s a fit) with ``frr=0.05``: BadNets AUROC 0.956,
  filtered ASR 0.015 at CA 0.810, FtC flags 92.5% / 19.5%, accepted clean 0.994, test FRR 0.12
  (the threshold is the 95% quantile of 60 calibration images, which are the holdout's, from the
  training tracks; test images run higher, as for TeCo); the clean model: test FRR 0.095, AUROC
  0.497 (the patch means nothing to it), filtered CA 0.865 (FRR 0.17 in the pytest run). At 60
  epochs the filter is too lossy (filtered CA 0.75) and the clean model's FRR 0.285.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import defense_ctx, deploy_trained

from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses.detectors.input_filtering import AIF, VIF, FilterVAE, TriggerGenerator
from backdoorlab.defenses.evaluate import Truth, run_defense
from backdoorlab.errors import BackdoorLabError

TEST_EPOCHS = 100


@pytest.mark.parametrize("spec", [
    {"name": "vif", "epochs": 0}, {"name": "vif", "lr": 0}, {"name": "vif", "lambda_rec": -1},
    {"name": "vif", "score": "l2"}, {"name": "vif", "frr": 1}, {"name": "vif", "calib_fraction": 1.5},
    {"name": "vif", "augment": "yes"}, {"name": "vif", "eval_limit": 5}, {"name": "aif", "mask_bound": 0},
    {"name": "aif", "lambda_adv": -1}, {"name": "aif", "noise_dim": 0}, {"name": "aif", "g_lr": 0},
])
def test_bad_parameters_are_one_line_errors(spec):
    with pytest.raises(BackdoorLabError) as exc:
        DEFENSES.validate(spec)
    assert "\n" not in str(exc.value) and spec["name"] in str(exc.value)


def test_the_networks_keep_the_shapes_and_ranges():
    f = FilterVAE(3, width=8, latent_channels=4)
    x = torch.rand(5, 3, 30, 30)  # not a multiple of 4: padded and cropped back
    out, mu, logvar = f(x, sample=False)
    assert out.shape == x.shape and mu.shape == logvar.shape == (5, 4, 8, 8)
    assert bool(((out >= 0) & (out <= 1)).all())
    assert torch.equal(f(x, sample=False)[0], out)  # the posterior mean: deterministic
    g = TriggerGenerator(3, 32, 32, 10, noise_dim=8, hidden=16)
    m, p = g(torch.randn(4, 8), torch.tensor([0, 1, 2, 9]))
    assert m.shape == (4, 1, 32, 32) and p.shape == (4, 3, 32, 32)
    assert bool(((m >= 0) & (m <= 1) & (p.min() >= 0) & (p.max() <= 1)).all())


def test_defaults_and_kinds():
    v, a = DEFENSES.build("vif"), DEFENSES.build("aif")
    assert isinstance(v, VIF) and isinstance(a, AIF) and v.kind == a.kind == "detector"
    assert (v.epochs, v.lr, v.lambda_rec, v.lambda_kl, v.score_kind, v.frr) == (200, 1e-3, 0.01, 0.003, "kl", 0.01)
    assert (a.lambda_adv, a.mask_bound, a.lambda_mask) == (1.0, 0.05, 10.0)
    with pytest.raises(BackdoorLabError, match="call fit"):
        v.score(None, torch.rand(2, 3, 32, 32))


@pytest.fixture(scope="module")
def gtsrb():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets"), trained_gtsrb("none")


def _row(t, spec, precision="fp32"):
    from backdoorlab.bench.pipeline import evaluate

    clf = deploy_trained(t, precision)
    truth = Truth(t.attack, t.poisoned.split.is_poisoned, t.bundle.test, before=evaluate(clf, t.bundle.test, t.attack))
    return run_defense(DEFENSES.build(spec), defense_ctx(t, clf), truth)[0]


@pytest.mark.data
def test_vif_purifies_triggered_inputs_on_gtsrb_badnets(gtsrb):
    bad, _ = gtsrb
    m = _row(bad, {"name": "vif", "epochs": TEST_EPOCHS, "frr": 0.05, "eval_limit": 200})
    assert m["ran_on"] == "artifact" and m["defense_kind"] == "detector"
    assert m["asr_unfiltered"] > 0.9 and m["ca_unfiltered"] > 0.9
    # the filtered classifier: the backdoor is gone, at a CA cost
    assert m["asr_filtered"] <= 0.1, m
    assert m["ca_filtered"] >= m["ca_unfiltered"] - 0.2, m
    # FtC's contrast flags the triggered inputs, and what it accepts is classified well
    assert m["ftc_flag_triggered"] >= 0.8 and m["ftc_flag_clean"] <= 0.3 and m["asr_ftc"] <= 0.1, m
    assert m["ca_ftc_accepted"] >= m["ca_unfiltered"] - 0.02, m
    # measured 0.956, 0.885, 0.12 on the AVX-512 training path; 0.937, 0.80, 0.265 on the pinned AVX2
    # path of tests/conftest.py (the threshold is a quantile of 60 calibration images, BENCHMARKS.md)
    assert m["auroc"] >= 0.85 and m["tpr_at_5fpr"] >= 0.7 and m["frr"] <= 0.3, m


@pytest.mark.data
def test_vif_on_the_clean_model_keeps_its_false_positive_rate(gtsrb):
    _, clean = gtsrb
    m = _row(clean, {"name": "vif", "epochs": TEST_EPOCHS, "frr": 0.05, "eval_limit": 200})
    # the clean model: the "triggered" inputs carry the patch but nothing learned it
    # measured 0.095 in one process and 0.17 in the test run (same seed; the filter's training is not
    # bit-reproducible across processes here): twice the chosen 5% is not always kept, because the
    # threshold is the quantile of 60 calibration images (a finding, BENCHMARKS.md)
    assert m["frr"] <= 0.25, m
    assert m["asr_unfiltered"] <= 0.05 and m["asr_filtered"] <= 0.05, m
