"""Neural Polarizer (Zhu et al., NeurIPS 2023), the CETF input detector and CETF's BN-Unlearning repair
(Zhou et al., arXiv 2407.05396, 2024): parameter checks, the polarizer's insertion and int8
deployment, and the behaviour on the GTSRB BadNets model (3x3 white corner patch, target 0) and on
the clean GTSRB model. Numbers in comments were measured on 2 shared CPU cores, OMP_NUM_THREADS=1
(load average 3-5), with the budgets below.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import defense_ctx, deploy_trained, repair_gtsrb

from backdoorlab.compress import compress
from backdoorlab.data import TensorData
from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses.detectors.cetf import CETF, masked, square_masks
from backdoorlab.defenses.evaluate import Truth, run_defense, triggered_test
from backdoorlab.defenses.removers.cetf_repair import CETFRepair
from backdoorlab.defenses.removers.neural_polarizer import NeuralPolarizer, Polarized, default_layer, insert_polarizer
from backdoorlab.errors import BackdoorLabError


@pytest.mark.parametrize("spec", [
    {"name": "neural-polarizer", "epochs": 0}, {"name": "neural-polarizer", "warm_epochs": -1},
    {"name": "neural-polarizer", "lr": 0}, {"name": "neural-polarizer", "norm": "l1"},
    {"name": "neural-polarizer", "trigger_norm": 0}, {"name": "neural-polarizer", "inner_steps": 0},
    {"name": "neural-polarizer", "init": "random"}, {"name": "neural-polarizer", "lmd2": -1},
    {"name": "neural-polarizer", "lmd1": 0, "lmd2": 0, "lmd3": 0, "lmd4": 0}, {"name": "neural-polarizer", "layer": ""},
    {"name": "cetf", "population": 3}, {"name": "cetf", "f": 0}, {"name": "cetf", "cr": 1.5},
    {"name": "cetf", "max_frac": 0}, {"name": "cetf", "fill": "blur"}, {"name": "cetf", "frr": 1},
    {"name": "cetf", "eval_limit": 5}, {"name": "cetf-repair", "variant": "prune"},
    {"name": "cetf-repair", "scan_size": 0}, {"name": "cetf-repair", "portion": 0},
    {"name": "cetf-repair", "detector": {"population": 2}}, {"name": "cetf-repair", "detector": "cetf"},
])
def test_bad_parameters_are_one_line_errors(spec):
    with pytest.raises(BackdoorLabError) as exc:
        DEFENSES.validate(spec)
    assert "\n" not in str(exc.value) and spec["name"].split("-")[0] in str(exc.value)


def test_defaults_are_the_papers():
    npd = DEFENSES.build("neural-polarizer")  # BackdoorBench config/defense/npd/config.yaml
    assert isinstance(npd, NeuralPolarizer) and npd.kind == "remover"
    assert (npd.epochs, npd.warm_epochs, npd.batch_size, npd.lr, npd.warm_lr) == (50, 5, 128, 0.01, 1e-4)
    assert (npd.norm, npd.trigger_norm, npd.adv_lr, npd.inner_steps, npd.init) == ("l2", 3.0, 0.1, 2, "zero")
    assert npd.lmd == (1.0, 0.4, 0.4, 0.4) and (npd.momentum, npd.weight_decay) == (0.9, 5e-4)
    assert isinstance(DEFENSES.build("cetf"), CETF) and DEFENSES.build("cetf").kind == "detector"
    rep = DEFENSES.build("cetf-repair")
    assert isinstance(rep, CETFRepair) and rep.variant == "bn-unlearning"


@pytest.mark.parametrize("arch,layer,convs", [("small-cnn", "body.18", "conv:7/7"),
                                              ("preact-resnet18", "body.8.conv1", "conv:21/21")])
def test_polarizer_starts_as_the_identity_and_runs_in_int8(arch, layer, convs):
    """Inserted in front of BackdoorBench's layer (``layer4.1.conv1`` of PreAct-ResNet18) or the last
    stage's conv: a no-op at insertion (identity conv, fresh BN), traced and quantized by FX with the
    rest of the model (its conv+BN fused into one more int8 conv)."""
    from backdoorlab.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 10, 3, (0.5,), (0.25,)).eval()
    assert default_layer(model) == layer
    channels = {"small-cnn": 128, "preact-resnet18": 512}[arch]
    pol = insert_polarizer(model, layer, channels).eval()
    assert isinstance(pol.get_submodule(layer), Polarized) and not isinstance(model.get_submodule(layer), Polarized)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(pol(x), model(x), atol=1e-4)
    clf = compress("int8-torch", pol, calib=TensorData(x, torch.zeros(16, dtype=torch.long)))
    assert clf.int8_layers == f"{convs}, linear:1/1"
    assert (clf.logits(x).argmax(1) == clf.surrogate.logits(x).argmax(1)).float().mean() >= 0.9


def test_square_masks_and_local_fill():
    ind = torch.tensor([[[30.0, 30.0, 3.0], [0.0, 0.0, 2.0]]])  # (N=1, P=2, 3)
    m = square_masks(ind, 32, 32)
    assert m.shape == (1, 2, 32, 32) and int(m[0, 0].sum()) == 9 and bool(m[0, 0, 29:32, 29:32].all())
    assert int(m[0, 1].sum()) == 4 and bool(m[0, 1, :2, :2].all())  # clipped at the border: (-0.5 -> 0) 2x2
    x = torch.zeros(1, 3, 32, 32)
    x[..., 29:32, 29:32] = 1.0  # a white corner patch on black: the ring around it is black
    out = masked(x, m, "local")
    assert out.shape == (1, 2, 3, 32, 32) and float(out[0, 0].max()) == 0.0  # the patch is gone
    assert torch.equal(out[0, 1], x[0])  # the other square covered black pixels only


# --- GTSRB -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def badnets():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")


# Neural Polarizer at a reduced budget: 2 of the paper's 50 epochs at batch 32 (10 steps an epoch on the
# 300-image holdout), BackdoorBench's GTSRB setting (lmd 0.5, L2 radius 5). Measured on this model
# (module docstring of neural_polarizer): the paper's claim (ASR < 0.2 at a small CA cost) is NOT met
# at any budget tried. 2 epochs (this test): ASR 0.939 -> 0.93x, CA 0.964 -> 0.601 (int8-torch 0.962 ->
# 0.592: the warmed-up BatchNorm standardises the features and the first steps cost accuracy).
# 4 epochs: ASR 0.939 -> 0.933, CA 0.964 -> 0.807 (FP32); int8-torch ASR 0.941 ->
# 0.935, CA 0.962 -> 0.796; 10 epochs: ASR 0.906, CA 0.836 (0.883 at radius 3); 30 epochs: ASR 0.768,
# CA 0.844. Asserted: the backdoor stays and the clean accuracy drops (the behaviour measured).
NPD_SPEC = {"name": "neural-polarizer", "epochs": 2, "batch_size": 32, "lmd2": 0.5, "lmd3": 0.5, "lmd4": 0.5,
            "trigger_norm": 5.0}


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_neural_polarizer_on_gtsrb_badnets(badnets, precision):
    m = repair_gtsrb(NPD_SPEC, precision)
    assert m["asr_before"] > 0.85 and m["layer"] == "body.18" and m["channels"] == 128
    assert m["repaired_precision"] == precision
    lo_asr, max_drop = NPD_BOUNDS
    assert m["asr_after"] > lo_asr, m
    assert m["ca_before"] - m["ca_after"] < max_drop, m


NPD_BOUNDS = (0.85, 0.45)


# CETF at a test budget (population 10, 5 generations; the defaults are 20 and 10), fitted on 40 holdout
# images, scored on 40 clean and 40 triggered test images per precision. Measured AUROC 0.698 (FP32,
# FRR 0.025, FAR 0.425) and 0.715 (int8-torch, Grad-CAM on the surrogate; FRR 0.075, FAR 0.425); with
# population 16 and 8 generations on 60 + 60 images: 0.812 (FP32)
CETF_SPEC = {"name": "cetf", "population": 10, "generations": 5, "fit_size": 40}
CETF_MEASURED = {"fp32": 0.698, "int8-torch": 0.715}


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_cetf_scores_triggered_inputs_higher_on_gtsrb_badnets(badnets, precision):
    clf = deploy_trained(badnets, precision)
    truth = Truth(badnets.attack, badnets.poisoned.split.is_poisoned, badnets.bundle.test)
    m, _ = run_defense(DEFENSES.build(CETF_SPEC), defense_ctx(badnets, clf), truth, eval_limit=40)
    assert m["grad_on"] == ("artifact" if precision == "fp32" else "surrogate")
    assert m["n_eval_clean"] == 40 and m["n_eval_triggered"] == 40
    assert m["auroc"] >= CETF_MEASURED[precision] - 0.1, m


def test_cetf_clean_model_false_positive_rate_stays_near_its_target():
    """The clean GTSRB model at int8-torch, threshold at frr 0.1 on 60 holdout images, 60 clean test
    images: the FPR stays within twice the target."""
    from _helpers import trained_gtsrb

    t = trained_gtsrb("none")
    clf = deploy_trained(t, "int8-torch")
    det = CETF(population=10, generations=5, fit_size=60, frr=0.1)
    det.fit(defense_ctx(t, clf))
    x = t.bundle.test.float()[torch.randperm(len(t.bundle.test), generator=torch.Generator().manual_seed(0))[:60]]
    fpr = float((det.score(clf, x) > det.threshold).float().mean())
    assert fpr <= 0.2, fpr


def test_cetf_extracts_the_corner_trigger(badnets):
    """Triggered test images whose best square flips the prediction: the square sits on the patch."""
    clf = deploy_trained(badnets, "fp32")
    truth = Truth(badnets.attack, badnets.poisoned.split.is_poisoned, badnets.bundle.test)
    _, xt = triggered_test(truth, 20, g=torch.Generator().manual_seed(0))
    ext = CETF(population=10, generations=5).extract(clf, xt)
    flipped = ext.flipped
    assert flipped.float().mean() >= 0.5
    on_patch = ext.mask[flipped][:, 29:32, 29:32].flatten(1).any(1).float().mean()
    assert on_patch >= 0.8, float(on_patch)


# CETF's BN-Unlearning, with triggers from 100 scanned training images (10% of the training set is
# poisoned). Measured with 150 scanned: 19 flagged, ASR 0.939 -> 0.018, CA 0.964 -> 0.951 (FP32), 30 s;
# BN-Cleaning (statistics only) leaves ASR at 0.928.
REPAIR_SPEC = {"name": "cetf-repair", "scan_size": 100, "detector": {"population": 10, "generations": 5,
                                                                     "fit_size": 60}}


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_cetf_repair_removes_gtsrb_badnets(badnets, precision):
    m = repair_gtsrb(REPAIR_SPEC, precision)
    assert m["asr_before"] > 0.85 and m["n_triggers"] >= 5
    assert m["asr_after"] < 0.2, m
    assert m["ca_before"] - m["ca_after"] < 0.05, m
    assert m["repaired_precision"] == precision
