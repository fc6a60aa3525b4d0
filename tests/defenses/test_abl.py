"""ABL (Li et al., NeurIPS 2021): the isolation stage as a filter (``abl-isolation``) and the whole
training-time defense as a remover (``abl``).

On the tests' GTSRB BadNets training set (5,700 images, 570 poisoned, all labelled 0), at a test
budget far below the paper's (both stages are trained from scratch, so this is the costliest part):

* isolation: **1 epoch** instead of ``T_te = 20``, at BackdoorBench's isolation rate ``lr=0.01``
  instead of the reference's 0.1. At 0.1 and batch 64 small-cnn hardly learns in the first epochs
  (train accuracy 0.10-0.12 after 1-3 epochs) and the isolated 1% is 42-100% poison depending on the
  seed; at 0.01 the poison is learned within the first epoch (its median loss 7e-6 against the
  clean samples' 1.5), which is ABL's premise. One epoch never reaches LGA's ``gamma``: the ascent
  branch does not act at this budget (its sign is tested below on its own).
* the remover: the same isolation (run once here and handed to both tests), then **3 epochs** of
  clean training instead of 60, then unlearning at ``unlearning_lr=5e-3`` with
  ``unlearning_stop_acc=0.5`` instead of 20 epochs at 5e-4. The paper's unlearning budget counts
  epochs over the isolated set: 1% of CIFAR-10 is 8 batches an epoch, 1% of this set is one, and 20
  steps at 5e-4 move almost nothing (measured: isolated-sample loss 0.0 -> 0.02, and the ASR change
  came from BatchNorm statistics drifting towards the 57 poisoned images, as a run at lr 1e-9
  reproduces). At fixed epochs the ascent then runs away abruptly (5e-3: ASR 0.63 at epoch 16, 0.0
  at 20, clean accuracy 0.84 at 20 and 0.47 at 24), hence the stop rule.

Measured (``OMP_NUM_THREADS=1``, generator seed 0): isolated 57, all poison (precision 1.0,
recall 0.10), AUROC of the score 0.921, class 0 flagged (isolated share 1.0, train share 0.106).
Remover: the backdoored model CA 0.9615 / ASR 0.939; ABL's model before unlearning holdout accuracy
0.923, after it CA 0.832, ASR 0.0015, RA 0.79, unlearning stopped at epoch 7 of 40. The clean
accuracy is 13 points below the backdoored model's: 4 epochs in all where the backdoored model had
10, and the unlearning's cost (5-10 points at this budget whatever the rate: 1e-3 to 5e-3, stop at
0.5 or 0.0). Thresholds below leave a margin.
"""

from __future__ import annotations

import pytest
import torch

from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.errors import BackdoorLabError

ISOLATION = {"epochs": 1, "lr": 0.01}
REMOVER = {"isolation_epochs": 1, "lr": 0.01, "finetune_epochs": 3, "unlearning_epochs": 40, "unlearning_lr": 5e-3,
           "unlearning_stop_acc": 0.5}


@pytest.fixture(scope="module")
def gtsrb():
    """The session's GTSRB BadNets model deployed at FP32, its scores before repair, and ABL's
    isolation stage run once on its training set (shared by the filter and the remover)."""
    from _helpers import deploy_trained, trained_gtsrb

    from backdoorlab.bench.pipeline import evaluate
    from backdoorlab.compress import compress
    from backdoorlab.defenses.evaluate import Truth

    t = trained_gtsrb("badnets")
    hold = t.poisoned.holdout
    clf = deploy_trained(t, "fp32")
    truth = Truth(t.attack, t.poisoned.split.is_poisoned, t.bundle.test, before=evaluate(clf, t.bundle.test, t.attack))

    def ctx():
        return DefenseContext(clf=clf, clean=hold, num_classes=t.bundle.info.num_classes,
                              generator=torch.Generator().manual_seed(0), train=t.poisoned.split.data, model=t.model,
                              redeploy=lambda m: compress("fp32", m, calib=hold, device="cpu"))

    iso = DEFENSES.build({"name": "abl-isolation", **ISOLATION}).isolate(ctx())
    return t, ctx, truth, iso


@pytest.mark.data
def test_isolation_isolates_poison_on_gtsrb_badnets(gtsrb):
    from backdoorlab.defenses.evaluate import run_defense

    t, ctx, truth, iso = gtsrb
    flt = DEFENSES.build({"name": "abl-isolation", **ISOLATION})
    flt.isolate = lambda c: iso  # the stage the fixture ran, with the same settings
    m, _ = run_defense(flt, ctx(), truth)
    n = len(t.poisoned.split.data)
    assert m["defense_kind"] == "filter" and m["n_removed"] == int(n * 0.01) == 57
    # measured: the 57 isolated samples are all poison (removal precision 1.0, recall 0.10), AUROC 0.921
    assert m["removal_precision"] >= 0.9
    assert m["auroc"] >= 0.85
    # the isolated samples are the lowest-loss ones; class 0 holds all of them (10.6% of the training set)
    assert m["abl_isolated_max_loss"] <= float(iso.losses[~iso.isolated].min())
    assert m["flagged"] == [0] and m["target_flagged"] is True and m["detected"] is True
    assert m["abl_top_class_isolated_share"] >= 0.9 and m["abl_isolation_epochs"] == 1


@pytest.mark.data
def test_abl_trains_a_model_without_the_backdoor_on_gtsrb_badnets(gtsrb):
    from backdoorlab.defenses.evaluate import run_defense

    t, ctx, truth, iso = gtsrb
    rem = DEFENSES.build({"name": "abl", **REMOVER})
    assert (rem.isolation_epochs, rem.lr, rem.gamma, rem.isolation_ratio) == (
        ISOLATION["epochs"], ISOLATION["lr"], 0.5, 0.01)  # the fixture's isolation is this remover's
    rem.isolate = lambda c: iso
    rem.dormancy = None
    m, _ = run_defense(rem, ctx(), truth)
    # measured: backdoored CA 0.9615 / ASR 0.939 -> ABL's model CA 0.832, ASR 0.0015 (RA 0.79);
    # the clean-accuracy gap is the 4-epoch budget's and the unlearning's (module docstring)
    assert m["asr_before"] >= 0.9 and m["ca_before"] >= 0.95
    assert m["asr_after"] <= 0.1 and m["detected"] is True
    assert m["ca_after"] >= 0.78
    assert m["repaired_precision"] == "fp32" and m["isolated"] == 57
    assert m["isolation_epochs"] == 1 and m["finetune_epochs"] == 3
    assert m["unlearning_stopped_at"] is not None and m["isolated_acc_after_unlearning"] <= 0.5
    assert m["isolated_loss_after_unlearning"] > m["isolated_loss_before_unlearning"]


# --- the pieces, and the settings ------------------------------------------------------------------

def test_lga_descends_above_gamma_and_ascends_below():
    from backdoorlab.defenses.filters.abl import LocalGradientAscent

    lga = LocalGradientAscent(0.5)
    for value, sign in ((2.0, 1.0), (0.1, -1.0)):
        w = torch.tensor(value, requires_grad=True)
        lga.loss(None, None, None, None, w * 1.0).backward()
        assert float(w.grad) == sign


def test_fresh_copy_keeps_the_architecture_and_draws_new_weights():
    from backdoorlab.defenses.filters.abl import fresh_copy
    from backdoorlab.models import build_model

    model = build_model("small-cnn", 10, 3, (0.5,), (0.25,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    a = fresh_copy(model, torch.Generator().manual_seed(3))
    b = fresh_copy(model, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is unchanged
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # seeded by the generator
    assert not torch.equal(a.head.weight, model.head.weight) and a.head.weight.shape == model.head.weight.shape


def test_class_verdict_flags_the_class_holding_more_than_its_share():
    from backdoorlab.defenses.filters.abl import class_verdict

    y = torch.tensor([0] * 10 + [1] * 80 + [2] * 10)
    isolated = torch.zeros(100, dtype=torch.bool)
    isolated[:3] = True  # three of class 0 (10% of the set)
    assert class_verdict(y, isolated, 3)[0] == [0]
    isolated[:] = False
    isolated[10:14] = True  # four of class 1: its share is 0.8, it holds 1.0 of the isolated
    assert class_verdict(y, isolated, 3)[0] == [1]
    y = torch.tensor([0, 1] * 50)
    isolated[:] = False
    isolated[:2] = True  # one each: the top class holds 0.5, its share
    assert class_verdict(y, isolated, 2)[0] == []


def test_stop_rule_keeps_the_weights_of_the_stopping_epoch():
    from backdoorlab.defenses.removers.abl import StopWhenUnlearned
    from backdoorlab.train.fit import FitState

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = FitState(model, opt, torch.device("cpu"), torch.Generator())
    stop = StopWhenUnlearned(0.5)
    stop.on_epoch_end(state, {"train_acc": 0.9})
    assert stop.epoch is None
    state.epoch = 4
    stop.on_epoch_end(state, {"train_acc": 0.4})
    kept = model.weight.detach().clone()
    stop.loss(state, None, None, None, torch.tensor(1.0))
    assert stop.epoch == 5 and opt.param_groups[0]["lr"] == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    assert torch.equal(stop.restore_(model).weight, kept)


def test_defaults_are_the_papers_and_abl_is_a_training_time_method():
    from backdoorlab.defenses.removers.abl import ABL

    f = DEFENSES.build("abl-isolation")
    assert (f.epochs, f.gamma, f.isolation_ratio, f.lr, f.batch_size, f.weight_decay, f.momentum) == (
        20, 0.5, 0.01, 0.1, 64, 1e-4, 0.9)
    r = DEFENSES.build("abl")
    assert (r.isolation_epochs, r.finetune_epochs, r.unlearning_epochs) == (20, 60, 20)
    assert (r.lr, r.finetune_lr, r.unlearning_lr, r.unlearning_stop_acc) == (0.1, 0.1, 5e-4, None)
    assert "training-time" in ABL.__doc__ and "architecture" in ABL.__doc__


@pytest.mark.parametrize("spec", [
    {"name": "abl-isolation", "epochs": 0}, {"name": "abl-isolation", "gamma": 0},
    {"name": "abl-isolation", "isolation_ratio": 1}, {"name": "abl-isolation", "lr": -1},
    {"name": "abl-isolation", "batch_size": 0}, {"name": "abl-isolation", "momentum": 1},
    {"name": "abl", "finetune_epochs": -1}, {"name": "abl", "unlearning_epochs": 0},
    {"name": "abl", "unlearning_lr": 0}, {"name": "abl", "unlearning_stop_acc": 1},
    {"name": "abl", "isolation_epochs": 1.5}, {"name": "abl", "finetune_lr": float("nan")},
])
def test_bad_parameters_are_one_line_errors(spec):
    with pytest.raises(BackdoorLabError) as exc:
        DEFENSES.validate(spec)
    assert "\n" not in str(exc.value)


def test_isolation_needs_the_architecture_and_the_training_set():
    from backdoorlab.data.tensordata import TensorData

    data = TensorData(torch.zeros(20, 3, 8, 8), torch.zeros(20, dtype=torch.long))
    flt = DEFENSES.build({"name": "abl-isolation", "epochs": 1})
    with pytest.raises(BackdoorLabError, match="training set"):
        flt.filter(DefenseContext(clf=None, clean=data, num_classes=2, generator=torch.Generator(), train=None))
    with pytest.raises(BackdoorLabError, match="architecture"):
        flt.filter(DefenseContext(clf=None, clean=data, num_classes=2, generator=torch.Generator(), train=data))
