"""NeuronInspect on the GTSRB subset (BadNets target 0, 3x3 white corner patch; 43 classes).

Budget: ``n_images=100`` of the 300 holdout images (each label: one backward pass per image),
2 s per scan on 2 quiet cores (up to 7 s under load); the default (all 300) gives the same picture.

NeuronInspect does **not** detect this BadNets model, at any budget measured. Generator seeds
0-2 at 100 images, and all 300: no label flagged; the largest anomaly index is 1.25 / 1.47 / 1.39
/ 0.96 (labels 9 / 19 / 1 / 4), and the target 0 ranks 8th / 9th / 25th / 10th lowest of 43 by
the combined feature (the clean model: max index 1.29 / 1.62 / 1.46 / 1.36, label 0 30th-34th).
The cause is the premise: on clean images the target's heatmaps show the traffic sign, not the
trigger corner. Label 0's mean heatmap (100 images) puts 0.8% of its mass on the trigger's 3x3
corner: the most of all 43 labels (median 0.4%; 0.4% for label 0 of the clean model), so the
backdoor leaves a trace, but less than a uniform map's 0.9%; its per-image maxima sit at rows
13-20, columns 8-14, on the sign. small-cnn ends in a global max-pool, so its patch detector has
no fixed place to look at and is silent on clean images; the target's logit is explained by the
sign like any other label's. Nor is any of the three features alone an outlier for label 0
(sparseness 13th, smoothness 7th, persistence 10th lowest at 100 images; persistence 5th-18th
over binarisation quantiles 0.5-0.99).

On another training path of the same cells (another CPU, two threads: the CI machine of
2026-12-07), the picture is the same for the backdoor and worse for false positives: label 0's
index 0.80, not flagged, but label 4 flagged on the BadNets model (index 2.01, largest 14: 2.29)
and labels 16 and 4 on the clean model (largest 2.19), the exponential-tail outlier rule
(threshold 2) being crossed by clean labels. Asserted: the target is never flagged, and the clean
model's largest index stays near the threshold.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.classifier import TorchClassifier
from backdoorlab.data.tensordata import TensorData
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.evaluate import Truth, run_defense
from backdoorlab.defenses.scanners import NeuronInspect
from backdoorlab.defenses.scanners.neuron_inspect import heatmap_features, saliency_maps
from backdoorlab.errors import BackdoorLabError

BUDGET = {"n_images": 100}


def _ctx(clf, clean, num_classes, seed=0):
    return DefenseContext(clf=clf, clean=clean, num_classes=num_classes, generator=torch.Generator().manual_seed(seed))


def _toy(num_classes=8, planted=None):
    """A linear classifier on 3x8x8 images (its saliency is its weights, the same on every image);
    ``planted``: a class whose weights are zero outside a 2x2 patch in the corner (a label explained
    by a few fixed pixels, as a patch backdoor's target is)."""
    torch.manual_seed(0)
    lin = nn.Linear(192, num_classes)
    if planted is not None:
        with torch.no_grad():
            w = torch.zeros(3, 8, 8)
            w[:, 6:, 6:] = 1.0
            lin.weight[planted] = w.flatten()
    return TorchClassifier(nn.Sequential(nn.Flatten(), lin), device="cpu")


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.rand(n, 3, 8, 8, generator=g), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("params, msg", [
    ({"n_images": 1}, "n_images must be None or an integer >= 2"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"lambda_sp": -1}, "lambda_sp must be a number >= 0"),
    ({"lambda_pe": float("nan")}, "lambda_pe must be a number >= 0"),
    ({"lambda_sp": 0, "lambda_sm": 0, "lambda_pe": 0}, "at least one of lambda_sp"),
    ({"persistence_quantile": 1}, r"persistence_quantile must be a number in \(0, 1\)"),
    ({"anomaly_threshold": 0}, "anomaly_threshold must be a number > 0"),
    ({"bogus": 1}, "no parameter 'bogus'"),
])
def test_bad_parameters_are_one_line_errors(params, msg):
    with pytest.raises(BackdoorLabError, match=msg) as err:
        DEFENSES.validate({"name": "neuron-inspect", **params})
    assert "\n" not in str(err.value)


def test_defaults():
    ni = DEFENSES.build("neuron-inspect")
    assert isinstance(ni, NeuronInspect) and ni.n_images is None
    assert ni.lambdas == (1.0, 1.0, 1.0) and ni.persistence_quantile == 0.5 and ni.anomaly_threshold == 2.0


def test_features_measure_sparse_smooth_persistent_maps():
    blob = torch.zeros(10, 8, 8)
    blob[:, 2:5, 2:5] = 1.0  # the same compact 3x3 blob in every map
    sp, sm, pe = heatmap_features(blob, 0.5)
    assert sp == 9.0 and pe == 0.0
    # |Laplacian| of the blob: 4 corners x 2 + 4 edge middles x 1 + 12 outside neighbours x 1
    assert sm == 24.0
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(10, 8, 8, generator=g)
    sp2, sm2, pe2 = heatmap_features(noise, 0.5)
    assert sp2 > 3 * sp and sm2 > sm and pe2 > 20  # ~half the 64 pixels disagree between two maps
    moved = blob.clone()
    moved[5:] = torch.roll(blob[5:], shifts=(3, 3), dims=(1, 2))  # half the maps elsewhere: not persistent
    assert heatmap_features(moved, 0.5)[2] == pytest.approx(2 * 18 * 25 / 90)  # 18 pixels on in 5 of 10


def test_saliency_maps_are_normalised_per_image():
    clf = _toy()
    x = _images(5).float()
    maps = saliency_maps(clf.logits, x, [0, 3], batch_size=2)
    assert maps.shape == (2, 5, 8, 8) and maps.min() == 0 and maps.amax(dim=(2, 3)).eq(1).all()
    w = clf.module[1].weight.detach()[3].view(3, 8, 8).abs().amax(0)
    assert torch.allclose(maps[1, 0], (w - w.min()) / (w.max() - w.min()), atol=1e-6)


def test_a_label_explained_by_a_fixed_patch_is_flagged():
    res = NeuronInspect().scan(_ctx(_toy(planted=5), _images(12), 8))
    m = res.metrics
    assert res.flagged == [5] and m["verdict"] is True and m["target"] == 5 and res.score > 2
    assert m["sparseness"][5] == min(m["sparseness"]) and m["n_images"] == 12
    assert len(res.per_label) == 8 and res.images["heatmap"].shape == (8, 1, 8, 8)
    assert NeuronInspect().scan(_ctx(_toy(), _images(12), 8)).flagged == []


def test_it_needs_clean_images():
    with pytest.raises(BackdoorLabError, match="needs at least 2 clean holdout images"):
        NeuronInspect().scan(_ctx(_toy(), _images(1), 8))


@pytest.fixture(scope="module")
def badnets():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")


def test_neuron_inspect_on_the_badnets_model(badnets):
    from backdoorlab.compress import compress

    clf = compress("fp32", badnets.model, calib=badnets.poisoned.holdout, device="cpu")
    truth = Truth(badnets.attack, badnets.poisoned.split.is_poisoned, badnets.bundle.test)
    ctx = _ctx(clf, badnets.poisoned.holdout, 43)
    m, images = run_defense(DEFENSES.build({"name": "neuron-inspect", **BUDGET}), ctx, truth)
    assert m["grad_on"] == "artifact" and m["n_images"] == BUDGET["n_images"]
    assert images["heatmap"].shape == (43, 1, 32, 32)
    assert 0 <= images["heatmap"].min() and images["heatmap"].max() <= 1
    assert len(m["sparseness"]) == len(m["smoothness"]) == len(m["persistence"]) == len(m["combined"]) == 43
    # measured: not detected (see the module docstring): no flag, label 0 no outlier
    assert m["target_flagged"] is False and 0 not in m["flagged"], m
    assert m["per_label"][0] < 2 and m["defense_score"] < 2.6, m
    # the cause: label 0's heatmaps on clean images are not on the trigger's 3x3 corner
    hm = images["heatmap"][0, 0]
    assert float(hm[29:32, 29:32].sum() / hm.sum()) < 2 * 9 / 1024


def test_neuron_inspect_on_a_clean_model():
    from _helpers import trained_gtsrb

    from backdoorlab.compress import compress

    t = trained_gtsrb("none")
    clf = compress("fp32", t.model, calib=t.poisoned.holdout, device="cpu")
    res = DEFENSES.build({"name": "neuron-inspect", **BUDGET}).scan(_ctx(clf, t.poisoned.holdout, 43))
    # measured 1.29-1.62 (nothing flagged); 2.19 on another training path (labels 16 and 4 flagged)
    assert res.score < 2.6 and 0 not in res.flagged
