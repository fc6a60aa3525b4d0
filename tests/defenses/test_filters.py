"""Training-data filters: Activation Clustering and Spectral Signatures.

Two regimes:

* **Synthetic, the papers' regime** (poisoned samples a minority of the target class): both must
  find the poison almost perfectly. Cheap, no training.
* **GTSRB BadNets (target 0)** as the lab trains it: 10% of the training set is poisoned into
  class 0, which holds only ~0.6% of GTSRB, so 570 of the 605 samples labelled 0 are poisoned. Both
  methods assume the poison is a minority of its class; here it is the majority, and the asserts
  record what still holds (measured numbers in the comments, thresholds with a margin).
"""

from __future__ import annotations

import pytest
import torch

from backdoorlab.classifier import Capability, Classifier
from backdoorlab.data.tensordata import TensorData
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.evaluate import Truth, run_defense
from backdoorlab.errors import BackdoorLabError
from backdoorlab.metrics import auroc

FILTERS = ("activation-clustering", "spectral-signatures")


# --- the papers' regime, on synthetic images -------------------------------------------------

class _PixelFeatures(Classifier):
    """Toy artifact whose penultimate features are its input pixels (FEATURES, no GRAD)."""

    precision = "toy"
    capabilities = frozenset({Capability.FEATURES})

    def __init__(self, num_classes: int):
        self.k = num_classes
        self.info = {}

    def logits(self, x):
        return torch.zeros(len(x), self.k)

    def features(self, x, layer="penultimate"):
        return x.flatten(1)


def _synthetic(g: torch.Generator, per_class: int = 200, classes: int = 5, n_poison: int = 20):
    """``classes`` Gaussian classes of 1x4x4 images in [0, 1]; ``n_poison`` images of classes 1..K-1
    get a 2x2 white 'trigger' and label 0 (9% of class 0)."""
    means = 0.3 + 0.4 * torch.rand(classes, 1, 4, 4, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = (means[y] + 0.05 * torch.randn(len(y), 1, 4, 4, generator=g)).clamp(0, 1)
    src = torch.randperm(len(y) - per_class, generator=g)[:n_poison] + per_class  # not from class 0
    xp = x[src].clone()
    xp[:, :, 2:, 2:] = 1.0
    x = torch.cat([x, xp])
    y = torch.cat([y, torch.zeros(n_poison, dtype=torch.long)])
    poisoned = torch.cat([torch.zeros(per_class * classes, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])
    return TensorData(x.float(), y), poisoned


@pytest.mark.parametrize("name", FILTERS)
def test_filter_finds_minority_poison_on_synthetic_data(name):
    g = torch.Generator().manual_seed(0)
    train, poisoned = _synthetic(g)
    ctx = DefenseContext(clf=_PixelFeatures(5), clean=train.subset(torch.arange(10)), num_classes=5,
                         generator=torch.Generator().manual_seed(1), train=train)
    res = DEFENSES.build(name).filter(ctx)
    assert res.scores.shape == (len(train),) and res.removed.shape == (len(train),)
    assert torch.isfinite(res.scores).all()
    assert auroc(res.scores, poisoned.float()) >= 0.95
    assert 0 in res.flagged and res.detected is True
    recall = float((res.removed & poisoned).sum()) / int(poisoned.sum())
    assert recall >= 0.9
    if name == "activation-clustering":  # removes exactly the small cluster of flagged classes
        assert 0 <= float(res.scores.min()) and float(res.scores.max()) < 1
        in_flagged = torch.isin(train.y, torch.tensor(res.flagged))
        assert not bool((res.removed & ~in_flagged).any())
    else:  # 1.5 * eps of every class
        assert int(res.removed.sum()) == sum(round(1.5 * 0.1 * int((train.y == k).sum())) for k in range(5))


# --- GTSRB BadNets, as deployed -----------------------------------------------------------------

def _run(t, precision: str, spec):
    from backdoorlab.compress import compress

    clf = compress(precision, t.model, calib=t.poisoned.holdout, device="cpu")
    ctx = DefenseContext(clf=clf, clean=t.poisoned.holdout, num_classes=t.bundle.info.num_classes,
                         generator=torch.Generator().manual_seed(0), train=t.poisoned.split.data, model=t.model)
    truth = Truth(t.attack, t.poisoned.split.is_poisoned, t.bundle.test)
    return run_defense(DEFENSES.build(spec), ctx, truth)[0]


@pytest.fixture(scope="module")
def badnets():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_spectral_signatures_on_gtsrb_badnets(badnets, precision):
    m = _run(badnets, precision, "spectral-signatures")
    assert m["ran_on"] == "artifact" and m["defense_kind"] == "filter"
    # poisoned 10%, eps 0.1: 15% of every class is removed
    assert m["n_removed"] == sum(round(1.5 * 0.1 * int((badnets.poisoned.split.data.y == k).sum())) for k in range(43))
    if precision == "fp32":  # measured: AUROC 0.848, flagged [0] (anomaly index 3.05); CI's CPU: [0, 4]
        assert m["auroc"] >= 0.8
        assert 0 in m["flagged"] and m["target_flagged"] is True
    else:  # measured: AUROC 0.769; class 0's index falls to 1.73 after int8, nothing flagged
        assert m["auroc"] >= 0.7
    # poison is 94% of class 0, so the clean minority is the outlier: removal catches few poisoned,
    # and the row issues no verdict from the inverted assumption but says why
    assert m["removal_recall"] < 0.2  # measured 0.098
    assert m["target_poison_share"] > 0.9 and m["detected"] is None
    assert "assumes it is a minority" in m["assumption"]


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_spectral_signatures_flags_nothing_on_the_clean_model(precision):
    from _helpers import trained_gtsrb

    m = _run(trained_gtsrb("none"), precision, "spectral-signatures")
    assert m["flagged"] == [] and m["detected"] is False  # measured max index 1.58 / 1.70
    assert m["auroc"] is None and m["target_flagged"] is None


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_activation_clustering_on_gtsrb_badnets(badnets, precision):
    m = _run(badnets, precision, "activation-clustering")
    assert m["ran_on"] == "artifact" and len(m["ac_rel_size"]) == 43 and len(m["ac_silhouette"]) == 43
    # Poison is the majority of class 0, so class 0 does not split into a small cluster (measured
    # relative size 0.33 / 0.28, silhouette 0.096): the target is not flagged, while the permissive
    # silhouette rule (> 0.1) flags 13 clean classes. Class 0's two clusters still part poison from
    # clean, but which of them is the smaller one (the "poison" AC scores) depends on the model: AUROC
    # 0.706 fp32, 0.782 int8-torch here, 0.025 on CI's CPU (the clean images were the small cluster).
    assert max(m["auroc"], 1 - m["auroc"]) >= 0.65
    # Its "detected" here is not a detection: the flags fall on clean classes, as on a clean model
    # (below), so the verdict is scored against the target, never taken alone.
    assert m["n_removed"] > 0 and len(set(m["flagged"]) - {0}) > 0
    assert m["target_flagged"] is (0 in m["flagged"])
    assert m["detected"] is None and "assumes it is a minority" in m["assumption"]


@pytest.mark.parametrize("precision", ["fp32", "int8-torch"])
def test_activation_clustering_flags_classes_of_a_clean_model(precision):
    """AC's clean-model false positive: the silhouette rule flags classes of a model trained on
    clean data, so its verdict on a backdoored model means nothing without this rate."""
    from _helpers import trained_gtsrb

    m = _run(trained_gtsrb("none"), precision, "activation-clustering")
    assert m["detected"] is True and len(m["flagged"]) >= 3, m["flagged"]
    assert m["auroc"] is None and m["target_flagged"] is None


# --- hyperparameters are checked before anything runs ------------------------------------------

@pytest.mark.parametrize("spec", [
    {"name": "spectral-signatures", "eps": 0}, {"name": "spectral-signatures", "eps": 0.7},
    {"name": "spectral-signatures", "eps": "0.1"}, {"name": "spectral-signatures", "anomaly_threshold": -1},
    {"name": "spectral-signatures", "min_class_size": 1},
    {"name": "activation-clustering", "nb_dims": 0}, {"name": "activation-clustering", "size_threshold": 0.6},
    {"name": "activation-clustering", "silhouette_threshold": 1.5},
    {"name": "activation-clustering", "analysis": "distance"}, {"name": "activation-clustering", "nb_clusters": 3},
])
def test_bad_filter_parameters_are_one_line_errors(spec):
    with pytest.raises(BackdoorLabError) as exc:
        DEFENSES.validate(spec)
    assert "\n" not in str(exc.value)


def test_filters_need_features_and_the_training_set():
    class _NoFeatures(_PixelFeatures):
        capabilities = frozenset()

    g = torch.Generator().manual_seed(0)
    train, _ = _synthetic(g)
    for name in FILTERS:
        ctx = DefenseContext(clf=_NoFeatures(5), clean=train, num_classes=5, generator=g, train=train)
        with pytest.raises(BackdoorLabError, match="features"):
            DEFENSES.build(name).filter(ctx)
        ctx = DefenseContext(clf=_PixelFeatures(5), clean=train, num_classes=5, generator=g, train=None)
        with pytest.raises(BackdoorLabError, match="training set"):
            DEFENSES.build(name).filter(ctx)
