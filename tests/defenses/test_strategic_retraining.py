"""Strategic retraining (Dhonthi, Hahn & Hashemi, FM 2023): parameter validation, the defaults (ABS's
and the inferred retraining recipe), ABS's pieces on a model with a planted answer, and the
behavioural claim on the GTSRB BadNets model."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses.removers.strategic_retraining import (
    StrategicRetraining,
    _Split,
    sampled_layers,
    seed_indices,
    stimulate,
)
from backdoorlab.errors import BackdoorLabError

NAME = "strategic-retraining"


@pytest.mark.parametrize("params", [
    {"seeds_per_class": 0}, {"n_layers": 0}, {"samp_k": 0}, {"n_samples": 1}, {"top_n_neurons": 0},
    {"max_troj_size": 0}, {"max_troj_size": 1.5}, {"re_steps": 0}, {"re_lr": -0.1}, {"re_mask_weight": -1},
    {"re_batch_size": 0}, {"reasr_bound": 0}, {"reasr_bound": 1.2}, {"top_p": 0}, {"top_p": 2},
    {"max_iterations": 0}, {"epochs": 0}, {"lr": 0}, {"batch_size": True}, {"momentum": 1.5}, {"unknown": 1},
])
def test_bad_hyperparameters_are_one_line_errors_before_anything_runs(params):
    with pytest.raises(BackdoorLabError) as info:
        DEFENSES.validate({"name": NAME, **params})
    assert "\n" not in str(info.value) and NAME in str(info.value)


def test_defaults_are_abs_and_the_documented_recipe():
    sr = DEFENSES.build(NAME)
    assert isinstance(sr, StrategicRetraining) and sr.kind == "remover"
    # ABS's config.json / abs.py (64 of 1024 pixels = 1/16 of the image, 1000 Adam steps at 0.1)
    assert (sr.samp_k, sr.n_samples, sr.top_n_neurons, sr.max_troj_size) == (8.0, 5, 20, 0.0625)
    assert (sr.re_steps, sr.re_lr, sr.re_mask_weight, sr.reasr_bound, sr.seeds_per_class) == (1000, 0.1, 500.0, 0.8, 5)
    # inferred (the paper's text was not available): see the module docstring
    assert (sr.top_p, sr.max_iterations, sr.epochs, sr.lr, sr.batch_size) == (0.5, 5, 10, 0.01, 64)


def test_seed_indices_take_at_most_k_per_class():
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    idx = seed_indices(y, 2, torch.Generator().manual_seed(0))
    assert torch.bincount(y[idx]).tolist() == [2, 1, 2]


def test_stimulation_finds_a_planted_neuron():
    """small-cnn whose head reads channel 7 of the last stage with a large weight to label 3 only:
    stimulating that channel raises label 3 on every seed, so it is the best-scoring neuron."""
    from backdoorlab.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "small-cnn", "widths": (8, 16, 32, 64)}, 10, 3, (0.5,), (0.25,)).eval()
    with torch.no_grad():
        model.head.weight.mul_(0.01)
        model.head.weight[:, 7] = 0.0
        model.head.weight[3, 7] = 5.0
    layers = sampled_layers(model, 2)
    x = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(20) % 10
    label, score = stimulate(_Split(model, layers[-1]), x, y, 8.0, 5)
    assert label.shape == score.shape == (64,)
    assert int(score.argmax()) == 7 and int(label[7]) == 3


# The GTSRB BadNets model (small-cnn, target label 0, 300-image holdout, 43 classes), 2 CPU cores.
# At the defaults a scan reverses 20 candidates for 1000 Adam steps each (minutes per scan on a
# CPU). The test's budget: one seed per class, the best 5 candidates, 100 steps of 16 seeds, one
# round of retraining (then the final scan). Measured (69 s for the repair):
# * first scan: 5 candidates (stimulated labels 12, 13, 39, 38, 25), every reversed 6x6 trigger
#   sends the stamped holdout to label 0, the attack's target, with REASR 0.41-0.90; one (0.902)
#   passes the 0.8 bound: one trojan neuron. small-cnn pools globally, so a patch at the centre of
#   the image fires the corner trigger's detectors.
# * retraining: 105 stamped images (the 50% of the other classes it flips most) + 300 clean, 10
#   epochs: ASR 0.939 -> 0.000 at FP32 and 0.940 -> 0.000 at int8-torch; CA 0.961 -> 0.919 (FP32),
#   0.960 -> 0.915 (int8). The second scan finds zero trojan neurons (largest REASR 0.60).
GTSRB_SPEC = {"name": NAME, "seeds_per_class": 1, "top_n_neurons": 5, "re_steps": 100, "re_batch_size": 16,
              "max_iterations": 1}


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_removes_gtsrb_badnets(precision):
    """The paper's claim: ABS's trojan neurons gone within a few iterations, the backdoor removed,
    benign accuracy kept. Asserted from the numbers above with margins for other training paths:
    ASR < 0.2, zero trojan neurons in the final scan, a CA cost under 7 points (measured 4.2-4.5;
    the cost is the 10 epochs at lr 0.01 on 405 images)."""
    import _helpers

    m = _helpers.repair_gtsrb(GTSRB_SPEC, precision)
    assert m["asr_before"] > 0.85
    assert m["trojan_neurons_per_scan"][0] >= 1, m
    assert 0 in m["trojan_labels_per_scan"][0], m  # the reversed trigger points at the attack's target
    assert m["asr_after"] < 0.2, m
    assert m["detected"] is True
    assert m["trojan_neurons_final"] == 0, m
    assert m["ca_before"] - m["ca_after"] < 0.07, m
    assert m["repaired_precision"] == precision
