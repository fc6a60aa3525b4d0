"""ANP (Wu & Wang, NeurIPS 2021), CLP (Zheng et al., ECCV 2022) and RNP (Li et al., ICML 2023):
parameter validation, the papers' defaults, pruning that survives int8 deployment on every
registered architecture, and their behaviour on the GTSRB BadNets model."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.classifier import TorchClassifier
from backdoorlab.data import TensorData
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.removers.anp import ANP
from backdoorlab.defenses.removers.clp import CLP
from backdoorlab.defenses.removers.neuron_pruning import bn_units
from backdoorlab.defenses.removers.rnp import RNP
from backdoorlab.errors import BackdoorLabError

ARCHS = ["small-cnn", "preact-resnet18", "vgg16-bn", "mobilenetv2"]


@pytest.mark.parametrize("name,params", [
    ("anp", {"eps": -0.1}), ("anp", {"eps": 2}), ("anp", {"steps": 0}), ("anp", {"steps": 1.5}),
    ("anp", {"alpha": 1.5}), ("anp", {"lr": 0}), ("anp", {"iterations": 0}), ("anp", {"batch_size": 1}),
    ("anp", {"threshold": 1.0}), ("anp", {"threshold": -0.1}), ("anp", {"threshold": "0.2"}),
    ("anp", {"max_acc_drop": 0}), ("anp", {"max_acc_drop": 1.5}), ("anp", {"pgd_steps": 1}),
    ("clp", {"u": -1}), ("clp", {"u": "3"}), ("clp", {"u": float("nan")}), ("clp", {"threshold": 0.2}),
    ("rnp", {"unlearning_lr": 0}), ("rnp", {"unlearning_epochs": 0}), ("rnp", {"clean_threshold": 1.0}),
    ("rnp", {"clean_threshold": -0.2}), ("rnp", {"recovering_lr": -1}), ("rnp", {"recovering_epochs": 2.5}),
    ("rnp", {"alpha": 0}), ("rnp", {"batch_size": 0}), ("rnp", {"threshold": 1.2}),
    ("rnp", {"max_acc_drop": True}), ("rnp", {"unknown": 1}),
])
def test_bad_hyperparameters_are_one_line_errors_before_anything_runs(name, params):
    with pytest.raises(BackdoorLabError) as info:
        DEFENSES.validate({"name": name, **params})
    assert "\n" not in str(info.value)


def test_defaults_are_the_papers():
    for name in ("anp", "clp", "rnp"):
        DEFENSES.validate(name)
        assert DEFENSES.build(name).kind == "remover"
    anp = DEFENSES.build("anp")  # eps 0.4, 1 step, alpha 0.2, mask lr 0.2, 2000 iterations of 128, threshold 0.2
    assert isinstance(anp, ANP)
    assert (anp.eps, anp.steps, anp.alpha, anp.lr, anp.iterations, anp.batch_size, anp.threshold,
            anp.max_acc_drop) == (0.4, 1, 0.2, 0.2, 2000, 128, 0.2, None)
    clp = DEFENSES.build("clp")
    assert isinstance(clp, CLP) and clp.u == 3.0
    rnp = DEFENSES.build("rnp")  # the authors' main.py
    assert isinstance(rnp, RNP)
    assert (rnp.unlearning_lr, rnp.unlearning_epochs, rnp.clean_threshold, rnp.recovering_lr,
            rnp.recovering_epochs, rnp.alpha, rnp.batch_size, rnp.threshold, rnp.max_acc_drop) == \
        (0.01, 20, 0.2, 0.2, 20, 0.2, 128, 0.2, None)


def _model(arch):
    from _helpers import bn_model

    return bn_model(arch)


def _clean(n=12):
    g = torch.Generator().manual_seed(1)
    return TensorData(torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


def _ctx(model, clean, clf=None, redeploy=None):
    clf = clf if clf is not None else TorchClassifier(model, device="cpu")
    return DefenseContext(clf=clf, clean=clean, num_classes=10, generator=torch.Generator().manual_seed(0),
                          model=model, redeploy=redeploy)


# small settings for random 16x16 data: a threshold high enough that the few mask steps prune something
TINY = {"anp": ANP(iterations=8, batch_size=8, lr=1.0, threshold=0.95),
        "rnp": RNP(unlearning_epochs=2, clean_threshold=0.0, recovering_epochs=4, recovering_lr=2.0, batch_size=6,
                   threshold=0.95),
        "clp": CLP(u=1.0)}


def _unit_outputs(module, x, units, pruned, prefix=""):
    """Output of the module that produces each pruned BN channel (the BN, or its conv when BN is folded
    into the conv by int8 deployment), as float, by BN name."""
    named = dict(module.named_modules())
    outs, handles = {}, []
    for u in units:
        if u.bn not in pruned:
            continue
        key = u.conv if (prefix and u.conv_exclusive) else u.bn
        (mod,) = [m for n, m in named.items() if n == prefix + key]

        def hook(m, i, o, k=u.bn):
            outs[k] = o.dequantize() if o.is_quantized else o.detach()
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.mark.parametrize("method", ["anp", "clp", "rnp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_channels_output_exactly_zero_after_int8(method, arch):
    """Each method runs on every registered architecture, and the channels it prunes are exactly 0 in
    the FP32 model and in the FX int8 artifact (BN folded into its conv where it follows one)."""
    from backdoorlab.compress import compress

    model = _model(arch)
    clean = _clean()
    int8 = compress("int8-torch", model, calib=clean)
    defense = TINY[method]
    pruned_model, pruned, facts = defense.prune(_ctx(model, clean, clf=int8))
    assert 0 < facts["channels_pruned"] == sum(len(v) for v in pruned.values()) < facts["channels_total"]
    units = bn_units(pruned_model, method)
    x = clean.float()[:8]
    fp32 = _unit_outputs(pruned_model, x, units, pruned)
    q = compress("int8-torch", pruned_model, calib=clean)
    deployed = _unit_outputs(q.module, x, units, pruned, prefix="inner.model.")
    assert set(fp32) == set(deployed) == set(pruned)
    for name, idx in pruned.items():
        assert fp32[name][:, idx].abs().max() == 0, name
        assert deployed[name][:, idx].abs().max() == 0, name
    assert q.logits(x).abs().sum() > 0
    if arch == "small-cnn":  # repair redeploys as the cell does
        repaired, facts = defense.repair(_ctx(model, clean, clf=int8,
                                              redeploy=lambda m: compress("int8-torch", m, calib=clean)))
        assert repaired.precision == "int8-torch" and facts["channels_pruned"] > 0


@pytest.mark.parametrize("method", ["anp", "clp", "rnp"])
def test_the_callers_model_is_not_changed(method):
    model = _model("small-cnn-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, facts = TINY[method].repair(_ctx(model, _clean(16)))
    assert facts["channels_pruned"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


class _NoData:
    """Stands in for every piece of data: any use fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"CLP read data ({name})")

    def __len__(self):
        raise AssertionError("CLP read data (len)")


def test_clp_reads_no_data():
    model = _model("small-cnn-tiny")
    ctx = DefenseContext(clf=_NoData(), clean=_NoData(), num_classes=10, generator=_NoData(), model=model,
                         train=_NoData())
    repaired, facts = CLP(u=1.0).repair(ctx)
    assert facts["channels_pruned"] > 0 and repaired.precision == "fp32"


def test_clp_scores_the_papers_uclc():
    """UCLC of a channel = spectral norm of its (C_in, kh*kw) kernel times |gamma| / sigma."""
    from backdoorlab.defenses.removers.clp import channel_lipschitz

    conv, bn = torch.nn.Conv2d(4, 6, 3, bias=False), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 2)
    want = torch.stack([torch.linalg.svdvals(conv.weight[k].reshape(4, 9))[0] for k in range(6)]) * \
        (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()
    assert torch.allclose(channel_lipschitz(conv, bn), want.detach(), rtol=1e-5)


# ANP's 2000 mask iterations take ~15 min on one CPU thread for the small CNN; the GTSRB tests run
# 100 (~45 s, 5% of the paper's), see the module docstring of backdoorlab.defenses.removers.anp
ANP_GTSRB = {"name": "anp", "iterations": 100}


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_rnp_removes_gtsrb_badnets(precision):
    """The authors' settings (unlearning lr 0.01 to holdout accuracy 0.2, mask lr 0.2 for 20 epochs,
    pruning by mask threshold 0.2) on the 300-image holdout: ASR below 0.2 at a CA cost near the paper's
    5 points (measured 5.05 at int8-torch with one worker thread on the AVX-512 training path; 9.2 and
    8.8 at fp32 and int8-torch on the pinned AVX2 path of tests/conftest.py, so the test allows 10)."""
    import _helpers

    m = _helpers.repair_gtsrb("rnp", precision)
    assert m["asr_before"] > 0.85 and m["repaired_precision"] == precision
    assert m["asr_after"] < 0.2, m
    assert m["ca_before"] - m["ca_after"] < 0.10, m
    assert m["unlearning_reached_threshold"] is True and m["prune_threshold"] == 0.2
    assert 0 < m["channels_pruned"] < m["channels_total"]


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_clp_on_gtsrb_badnets_is_harmless_but_misses_the_backdoor(precision):
    """Measured, not the paper's claim: at u=3 CLP prunes 5 of 672 channels (CA 0.961 -> 0.953) and
    BadNets' ASR stays at 0.94. The small CNN breaks CLP's premise: its most trigger-sensitive
    channels (largest rise of the max-pooled activation under the trigger, in the last three conv
    layers) have the *lowest* UCLCs of their layers (z-scores -0.2 to -1.8; ranks 98-244 of 128/256),
    and no u removes the backdoor before clean accuracy collapses (u=1: ASR 0.01 at CA 0.39)."""
    import _helpers

    m = _helpers.repair_gtsrb("clp", precision)
    assert m["asr_before"] > 0.85 and m["repaired_precision"] == precision
    assert m["ca_before"] - m["ca_after"] < 0.05, m
    assert 0 < m["channels_pruned"] <= 10 and m["clp_u"] == 3.0
    assert m["asr_after"] > 0.85, m  # the backdoor survives (see the docstring)


# a measured shortfall, not a behaviour the default run must guard (its ANP mask optimisation is a second
# 60 s one beside the holdout rule's): on demand with `pytest -m slow`
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_anp_with_the_papers_threshold_needs_more_iterations_than_a_cpu_test_affords(precision):
    """Measured, not the paper's claim: after 100 of the paper's 2000 mask iterations the fixed
    threshold 0.2 prunes 14 of 672 channels; CA is kept (0.961 -> 0.964) but ASR only falls to 0.89.
    The masks have not converged (median 0.985; at 300 iterations threshold 0.2 prunes 42 channels and
    ASR is 0.75): this model's backdoor is spread over ~50 channels (threshold 0.6 after 100
    iterations: 56 channels, ASR 0.10 at CA 0.945)."""
    import _helpers

    m = _helpers.repair_gtsrb(ANP_GTSRB, precision)
    assert m["asr_before"] > 0.85 and m["repaired_precision"] == precision
    assert m["ca_before"] - m["ca_after"] < 0.05, m
    assert m["prune_threshold"] == 0.2 and m["mask_iterations"] == 100
    assert 0 < m["channels_pruned"] < 40, m
    assert m["asr_after"] < m["asr_before"], m


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_anp_with_the_holdout_rule_removes_gtsrb_badnets(precision):
    """The threshold chosen on clean holdout accuracy only (largest of 0, 0.05, ..., 0.9 keeping it within
    2 points) after 100 iterations: measured threshold 0.75, 110 channels, ASR 0.94 -> 0.004, CA
    0.961 -> 0.906 (holdout drop 0.017, test drop 0.055: just over the paper's 5 points, so the bound is
    set from the measurement)."""
    import _helpers

    m = _helpers.repair_gtsrb({**ANP_GTSRB, "max_acc_drop": 0.02}, precision)
    assert m["asr_before"] > 0.85 and m["repaired_precision"] == precision
    assert m["asr_after"] < 0.2, m
    assert m["ca_before"] - m["ca_after"] < 0.08, m
    assert m["holdout_acc_before"] - m["holdout_acc_pruned"] <= 0.02 + 1e-9
    assert m["prune_threshold"] > 0.2 and m["max_acc_drop"] == 0.02
