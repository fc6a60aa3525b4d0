"""The fine-tuning family of removers: plain fine-tuning (``ft``), FT-SAM (Zhu et al., ICCV 2023)
and NAD (Li et al., ICLR 2021): parameter validation, the papers' defaults, the caller's model left
alone on every registered architecture, and the behaviour on the GTSRB BadNets model.

Measured on the GTSRB BadNets model of the tests (small-cnn, 300-image holdout, seed 0; CA / ASR
before -> after; seconds per repair on 2 CPU cores shared with other jobs (load average 6-7),
OMP_NUM_THREADS=1, redeployment and evaluation of the repaired model included):

=========  ==========  ================  ================  ========
method     precision   CA                ASR               seconds
=========  ==========  ================  ================  ========
ft         fp32        0.9605 -> 0.9455  0.9357 -> 0.8548  43-69
ft         int8-torch  0.9610 -> 0.9455  0.9367 -> 0.8543  63
ft-sam     fp32        0.9605 -> 0.9290  0.9357 -> 0.0000  23-32
ft-sam     int8-torch  0.9610 -> 0.9280  0.9367 -> 0.0000  26
nad        fp32        0.9605 -> 0.9265  0.9357 -> 0.4854  23-35
nad        int8-torch  0.9610 -> 0.9235  0.9367 -> 0.4879  26
=========  ==========  ================  ================  ========

Plain fine-tuning leaves BadNets in place (as Liu et al. 2018 report): the trigger's neurons are
dormant on clean data, so clean gradients barely move them. FT-SAM meets its claim with its
epochs scaled to 20 (for runtime); with the paper's 100 the ASR comes back to 0.76 once the
model fits the holdout (module docstring of :mod:`backdoorlab.defenses.removers.ft_sam`). NAD
misses its paper's claim here (module docstring of :mod:`backdoorlab.defenses.removers.nad`): at
BackdoorBench's student learning rate it halves the ASR but does not erase it; the assertions
below are the measured behaviour with a margin.
"""

from __future__ import annotations

import pytest
import torch

from backdoorlab.classifier import TorchClassifier
from backdoorlab.data import TensorData
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.removers.ft import FineTuning
from backdoorlab.defenses.removers.ft_sam import FTSAM, SAMStep
from backdoorlab.defenses.removers.nad import NAD, attention_layers, attention_map
from backdoorlab.errors import BackdoorLabError

ARCHS = ["small-cnn", "preact-resnet18", "vgg16-bn", "mobilenetv2"]
SGD_BAD = [{"epochs": 0}, {"epochs": 2.5}, {"epochs": True}, {"lr": 0}, {"lr": -0.1}, {"lr": float("nan")},
           {"batch_size": 0}, {"weight_decay": -1e-4}, {"momentum": 1.0}, {"momentum": -0.1}, {"unknown": 1}]
BAD = [("ft", p) for p in SGD_BAD] + [("ft-sam", p) for p in SGD_BAD + [
    {"rho": 0}, {"rho": -1.0}, {"rho": "2"}, {"adaptive": "yes"}, {"label_smoothing": 1.0},
    {"label_smoothing": -0.1}]] + [("nad", p) for p in SGD_BAD + [
    {"teacher_epochs": 0}, {"teacher_epochs": 1.5}, {"teacher_lr": 0}, {"beta1": -1}, {"beta3": "1000"},
    {"p": 0}, {"momentum": 0.0}]]


@pytest.mark.parametrize(("name", "params"), BAD, ids=[f"{n}-{p}" for n, p in BAD])
def test_bad_hyperparameters_are_one_line_errors_before_anything_runs(name, params):
    with pytest.raises(BackdoorLabError) as info:
        DEFENSES.validate({"name": name, **params})
    assert "\n" not in str(info.value)


def test_defaults_are_the_papers():
    for name in ("ft", "ft-sam", "nad"):
        DEFENSES.validate(name)
        assert DEFENSES.build(name).kind == "remover"
    ft = DEFENSES.build("ft")  # BackdoorBench config/defense/ft/config.yaml
    assert isinstance(ft, FineTuning)
    assert (ft.epochs, ft.lr, ft.batch_size, ft.weight_decay, ft.momentum) == (100, 0.01, 256, 5e-4, 0.9)
    sam = DEFENSES.build("ft-sam")  # BackdoorBench config/defense/ft-sam/config.yaml, adaptive SAM
    assert isinstance(sam, FTSAM)
    assert (sam.rho, sam.adaptive, sam.label_smoothing, sam.lr, sam.batch_size, sam.weight_decay) == (
        2.0, True, 0.1, 0.01, 256, 5e-4)
    assert sam.epochs == 20  # scaled from 100 for runtime (two passes per batch; module docstring)
    nad = DEFENSES.build("nad")  # the authors' config.py / BackdoorBench config/defense/nad
    assert isinstance(nad, NAD)
    assert (nad.teacher_epochs, nad.teacher_lr, nad.epochs, nad.lr, nad.batch_size, nad.weight_decay,
            nad.momentum, nad.betas, nad.p) == (10, 0.1, 20, 0.01, 64, 1e-4, 0.9, (500.0, 1000.0, 1000.0), 2.0)


def test_attention_map_is_a_unit_vector_over_positions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, 4, 6, generator=g)
    m = attention_map(a)
    assert m.shape == (5, 24) and (m >= 0).all()
    assert torch.allclose(m.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(attention_map(3 * a), m, atol=1e-5)  # scale-free
    assert torch.allclose(m, attention_map(-a), atol=1e-6)  # |a|^p


@pytest.mark.parametrize("arch", ARCHS)
def test_nad_picks_the_last_three_stages(arch):
    from backdoorlab.models import build_model

    model = build_model(arch, 10, 3, (0.5,), (0.25,))
    names = attention_layers(model)
    assert len(names) == 3
    named = dict(model.named_modules())
    shapes = {}
    hs = [named[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape)) for n in names]
    with torch.no_grad():
        model.eval()(torch.rand(2, 3, 32, 32))
    for h in hs:
        h.remove()
    sizes = [shapes[n][-1] for n in names]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3  # three resolutions, falling
    expected = {"small-cnn": ([64, 128, 256], [16, 8, 4]), "preact-resnet18": ([128, 256, 512], [16, 8, 4]),
                "vgg16-bn": ([256, 512, 512], [8, 4, 2]), "mobilenetv2": ([32, 96, 1280], [16, 8, 4])}[arch]
    assert ([shapes[n][1] for n in names], sizes) == expected
    model.train()  # the probe leaves the mode as it was
    attention_layers(model)
    assert model.training


def test_sam_step_moves_and_restores_the_weights():
    from backdoorlab.train.fit import FitState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = FitState(model, opt, torch.device("cpu"), torch.Generator().manual_seed(0))
    hook = SAMStep(rho=0.5, adaptive=True)
    hook.on_fit_start(state)
    before = [p.detach().clone() for p in model.parameters()]
    stats = model[1].running_mean.clone()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    logits = model(x)
    loss0 = torch.nn.functional.cross_entropy(logits, y)
    stats_after_first = model[1].running_mean.clone()
    loss1 = hook.loss(state, x, y, logits, loss0)
    moved = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, moved))
    assert torch.equal(model[1].running_mean, stats_after_first) and not torch.equal(stats, stats_after_first)
    assert float(loss1.detach()) >= float(loss0.detach()) - 1e-6  # ascent does not lower the loss (1st order)
    state.optimizer.zero_grad()
    loss1.backward()
    state.optimizer.step()  # lr 0: only the restore moves the weights
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(before, model.parameters()))


def _tiny(arch):
    from backdoorlab.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 10, 3, (0.5,), (0.25,)).eval()
    g = torch.Generator().manual_seed(1)
    clean = TensorData(torch.rand(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g))
    ctx = DefenseContext(clf=TorchClassifier(model, device="cpu"), clean=clean, num_classes=10,
                         generator=torch.Generator().manual_seed(0), model=model)
    return model, clean, ctx


TINY = {"ft": {"epochs": 1, "batch_size": 4}, "ft-sam": {"epochs": 1, "batch_size": 4},
        "nad": {"epochs": 1, "teacher_epochs": 1, "batch_size": 4}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["ft", "ft-sam", "nad"])
def test_runs_on_every_architecture_and_leaves_the_callers_model_alone(name, arch):
    model, clean, ctx = _tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    repaired, facts = DEFENSES.build({"name": name, **TINY[name]}).repair(ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training  # the caller's mode too
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    x = clean.float()[:3]
    out = repaired.logits(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert facts["epochs"] == 1 and facts["lr"] > 0
    changed = any(not torch.equal(before[k], v.cpu()) for k, v in repaired.module.state_dict().items()
                  if v.dtype.is_floating_point)
    assert changed
    if name == "nad":
        assert len(facts["attention_layers"]) == 3 and facts["teacher_epochs"] == 1
        assert sum(len(m._forward_hooks) for m in repaired.module.modules()) == 0  # distillation hooks removed
    if name == "ft-sam":
        assert facts["rho"] == 2.0 and facts["adaptive"] is True


def test_same_generator_same_repair():
    model, clean, ctx = _tiny("small-cnn")
    spec = {"name": "ft-sam", **TINY["ft-sam"]}
    a, _ = DEFENSES.build(spec).repair(ctx)
    ctx.generator = torch.Generator().manual_seed(0)
    b, _ = DEFENSES.build(spec).repair(ctx)
    assert all(torch.equal(u, v) for u, v in zip(a.module.state_dict().values(), b.module.state_dict().values()))


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_ft_sam_removes_gtsrb_badnets(precision):
    """FT-SAM's removal holds on the artifact as deployed: ASR < 0.2 on every run measured (0.000),
    at a CA cost of 3.2 points with this generator (CA 0.961 -> 0.929 / 0.928) and 5.6 with the
    benchmark cell's (0.905; seeds 1 and 2: 0.9225): the paper's 5-point bound holds on some runs
    only, so the test allows 7."""
    import _helpers

    m = _helpers.repair_gtsrb("ft-sam", precision)
    assert m["asr_before"] > 0.85
    assert m["asr_after"] < 0.2, m
    assert m["ca_before"] - m["ca_after"] < 0.07, m
    assert m["detected"] is True and m["repaired_precision"] == precision
    assert m["epochs"] == 20 and m["rho"] == 2.0 and m["adaptive"] is True


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_nad_reduces_but_does_not_erase_gtsrb_badnets(precision):
    """NAD misses its paper's claim on this 300-image holdout (measured, seed 0: ASR 0.936 -> 0.485,
    CA 0.961 -> 0.927; seeds 1 and 2: ASR 0.466 / 0.741, CA 0.911 / 0.918; cause in the nad module
    docstring; the benchmark's cell, with another generator, reached 0.202). Asserted: the teacher
    fits the holdout, the ASR falls by at least 0.15, and the CA cost stays under 6 points (3.4 at
    seed 0; seed 1 costs 4.95). Where it lands between 0.2 and 0.75 moves with the seed, so the
    test does not pin it."""
    import _helpers

    m = _helpers.repair_gtsrb("nad", precision)
    assert m["asr_before"] > 0.85
    assert m["asr_after"] < m["asr_before"] - 0.15, m
    assert m["ca_before"] - m["ca_after"] < 0.06, m
    assert m["teacher_holdout_acc"] > 0.9 and m["repaired_precision"] == precision
    assert m["attention_layers"] == ["body.9", "body.16", "body.20"]


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_plain_finetuning_leaves_gtsrb_badnets_in_place(precision):
    """Plain fine-tuning keeps CA and does NOT remove BadNets (measured: ASR 0.936 -> 0.855 at fp32,
    CA 0.961 -> 0.946), as Liu et al. 2018 report for fine-tuning alone."""
    import _helpers

    m = _helpers.repair_gtsrb("ft", precision)
    assert m["asr_before"] > 0.85
    assert m["asr_after"] > 0.6, m
    assert m["ca_before"] - m["ca_after"] < 0.05, m
    assert m["detected"] is False and m["epochs"] == 100 and m["final_train_acc"] > 0.95
