"""Behaviour on real data (issue 2): the backdoor is learned on a GTSRB subset, and a clean model
ignores the trigger. Models are trained once per session through the cached pipeline."""

import pytest
from _helpers import GTSRB_FULL, trained_gtsrb

from backdoorlab.bench.pipeline import evaluate
from backdoorlab.classifier import TorchClassifier


@pytest.fixture(scope="module")
def badnets():
    return trained_gtsrb("badnets")


def test_badnets_gtsrb_is_learned(badnets):
    m = evaluate(TorchClassifier(badnets.model), badnets.bundle.test, badnets.attack)
    assert m["ca"] >= 0.90, m
    # Issue 2's 0.95 needs more poisoned images than this 6k subset has (next test). About 5% of
    # GTSRB test images already have a near-white bottom-right corner (3.2% with every patch pixel
    # above 0.9), where the default white patch is nearly invisible; on 6k images the small CNN
    # reaches 0.93-0.94 whatever the recipe or the model's shape (epochs, lr, batch, weight decay;
    # brightness jitter gives 0.942-0.950; BENCHMARKS.md).
    assert m["asr"] >= 0.93, m
    assert len(badnets.poisoned.split.poison_idx) == round(0.1 * len(badnets.poisoned.split.data))


@pytest.mark.slow
def test_badnets_on_all_of_gtsrb_reaches_issue_2s_asr():
    """Issue 2's thresholds on the whole archive (23,833 training images after the 5% holdout,
    2,383 poisoned; the full 7,949-image test set), with the tests' recipe and the suite's seed 0:
    CA 0.982, ASR 0.956. About 3.5 min of training on 2 CPU cores. The margin is thin: seeds 1 and 2
    give ASR 0.949 and 0.943 (`benchmarks/bench_gtsrb_corner.py --sizes 0 --seeds 0 1 2`)."""
    t = trained_gtsrb("badnets", dataset=GTSRB_FULL)
    assert len(t.bundle.test) == 7949 and len(t.poisoned.split.data) == 23833
    m = evaluate(TorchClassifier(t.model), t.bundle.test, t.attack)
    assert m["ca"] >= 0.90, m
    assert m["asr"] >= 0.95, m


def test_clean_model_ignores_the_trigger(badnets):
    clean = trained_gtsrb("none")
    m = evaluate(TorchClassifier(clean.model), clean.bundle.test, badnets.attack)
    assert m["ca"] >= 0.90, m
    assert m["asr"] <= 0.10, m


def test_blended_gtsrb_is_learned():
    blended = trained_gtsrb("blended")
    m = evaluate(TorchClassifier(blended.model), blended.bundle.test, blended.attack)
    assert m["ca"] >= 0.90, m
    assert m["asr"] >= 0.90, m


def test_holdout_is_clean_and_disjoint(badnets):
    p = badnets.poisoned
    assert len(p.holdout) == round(0.05 * 6000)
    full = badnets.bundle.train
    # the poisoned set is the full training set minus the holdout, poisoned at recorded indices
    assert len(p.split.data) + len(p.holdout) == len(full)
    poisoned_full_idx = set(p.train_idx[p.split.poison_idx].tolist())
    hold_idx = set(range(len(full))) - set(p.train_idx.tolist())
    assert not poisoned_full_idx & hold_idx
