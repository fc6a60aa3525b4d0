"""Adaptive-Blend and Adaptive-Patch (Qi et al., ICLR 2023; issue 25): partial / faint triggers at
poisoning, cover samples that keep their labels, full triggers at test time, and each backdoor
learned on the GTSRB subset while a clean model ignores the trigger."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import ATTACKS, AdaptiveBlend, AdaptivePatch
from backdoorlab.attacks.adaptive import CoveredSplit, piece_masks
from backdoorlab.data import TensorData
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def toy(n=1000, seed=0, value=None):
    g = torch.Generator().manual_seed(seed)
    if value is None:
        x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    else:
        x = torch.full((n, 32, 32, 3), value, dtype=torch.uint8)
    return TensorData(x, torch.arange(n) % 10)


def test_defaults_are_the_papers():
    b = AdaptiveBlend(INFO)
    assert (b.rate, b.cover_rate, b.alpha, b.test_alpha, b.pieces, b.masked) == (0.003, 0.003, 0.15, 0.2, 16, 8)
    p = AdaptivePatch(INFO)
    assert (p.rate, p.cover_rate, p.test_alpha, p.test_triggers) == (0.003, 0.006, 1.0, (1, 3))
    assert p.alphas.tolist() == pytest.approx([0.5, 0.2, 0.5, 0.3])


def test_piece_masks_cut_a_four_by_four_grid():
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, 6] = True  # row 1, column 2 of the grid
    m = piece_masks(32, 16, keep)[0, 0]
    assert float(m.sum()) == 64 and float(m[8:16, 16:24].sum()) == 64


def test_adaptive_blend_poisons_with_half_the_pattern_and_tests_with_all_of_it():
    atk = AdaptiveBlend(INFO)
    x = torch.zeros(50, 3, 32, 32)
    out = atk.train_trigger(x, torch.Generator().manual_seed(0))
    p = atk.pattern
    blended = (out - 0.15 * p).abs().amax(1) < 1e-6  # pixels where the pattern went in at alpha 0.15
    untouched = out.abs().amax(1) == 0
    assert bool((blended | untouched).all())
    pieces = blended.view(50, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(50, 16, 64)
    assert bool((pieces.all(-1) | ~pieces.any(-1)).all())  # whole 8x8 pieces, on or off
    assert pieces.all(-1).sum(1).tolist() == [8] * 50  # a random half of the 16 pieces per image
    assert len({tuple(r.tolist()) for r in pieces.all(-1)}) > 40  # drawn per image
    xt = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(atk.apply(xt), 0.8 * xt + 0.2 * p)  # the whole pattern at test_alpha


def test_poison_and_cover_samples_are_recorded():
    atk = AdaptiveBlend(INFO, rate=0.02, cover_rate=0.03, target=3)
    data = toy(value=128)
    split = atk.poison(data, torch.Generator().manual_seed(0))
    assert isinstance(split, CoveredSplit)
    p, c = split.poison_idx, split.cover_idx
    assert len(p) == 20 and len(c) == 30 and not set(p.tolist()) & set(c.tolist())
    assert torch.equal(p, p.sort().values) and torch.equal(c, c.sort().values)
    assert (split.data.y[p] == 3).all() and (data.y[p] != 3).all()  # poison: relabelled
    assert torch.equal(split.data.y[c], data.y[c]) and (data.y[c] != 3).all()  # cover: kept, not the target
    changed = (split.data.x != data.x).flatten(1).any(1)
    assert torch.equal(changed, split.is_poisoned)  # every changed image, and only those, is marked
    assert int(split.is_poisoned.sum()) == 50
    again = atk.poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(again.data.x, split.data.x) and torch.equal(again.cover_idx, c)


def test_cover_samples_follow_the_objective():
    data = toy()
    ss = AdaptivePatch(INFO, mode="source-specific", sources=[1, 2], target=0, rate=0.05, cover_rate=0.05)
    split = ss.poison(data, torch.Generator().manual_seed(0))
    assert set(data.y[split.poison_idx].tolist()) <= {1, 2}
    assert not set(data.y[split.cover_idx].tolist()) & {0, 1, 2}  # outside the sources, TaCT-style
    a2a = AdaptiveBlend(INFO, mode="all-to-all", rate=0.05, cover_rate=0.05)
    split = a2a.poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(split.data.y[split.poison_idx], (data.y[split.poison_idx] + 1) % 10)
    assert torch.equal(split.data.y[split.cover_idx], data.y[split.cover_idx])
    cl = AdaptiveBlend(INFO, mode="clean-label", target=4, rate=0.05, cover_rate=0.01)
    split = cl.poison(data, torch.Generator().manual_seed(0))
    assert (data.y[split.poison_idx] == 4).all() and torch.equal(split.data.y, data.y)
    assert (data.y[split.cover_idx] != 4).all()
    with pytest.raises(BackdoorLabError, match="cover_rate"):
        AdaptiveBlend(INFO, cover_rate=0.95).poison(data, torch.Generator())


def test_adaptive_patch_poisons_with_one_faint_patch_and_tests_with_two_full_ones():
    atk = AdaptivePatch(INFO)
    marks, masks = atk.marks, atk.masks
    sizes = [int((m > 0).sum()) for m in masks[:, 0]]
    assert sizes[0] == 25 and sizes[2] == 4 * 9 and sizes[3] == 64  # 5x5 corner, four 3x3 corners, 8x8 square
    assert 120 <= sizes[1] <= 169 and abs(float(masks[1].sum()) - 3.14159 * 6.5**2) < 1.5  # the 13x13 disc
    x = torch.zeros(40, 3, 32, 32)
    out = atk.train_trigger(x, torch.Generator().manual_seed(0))
    which = []
    for img in out:
        hits = [j for j in range(4) if torch.allclose(img, atk.alphas[j] * masks[j] * marks[j], atol=1e-6)]
        assert len(hits) == 1  # exactly one trigger, at its own opacity
        which.append(hits[0])
    assert sorted(which.count(j) for j in range(4)) == [10, 10, 10, 10]  # an equal share each
    xt = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    yt = atk.apply(xt)
    on = (masks[1, 0] == 1) | (masks[3, 0] == 1)
    off = (masks[1, 0] == 0) & (masks[3, 0] == 0)
    full = torch.where(masks[3, 0] == 1, marks[3], marks[1])
    torch.testing.assert_close(yt[:, :, on], full[:, on].expand(3, -1, -1))  # stamped at full opacity
    assert torch.equal(yt[:, :, off], xt[:, :, off])
    assert torch.equal(AdaptivePatch(INFO, trigger_seed=0).marks, marks)
    assert not torch.equal(AdaptivePatch(INFO, trigger_seed=1).marks, marks)


@pytest.mark.parametrize("spec,match", [
    ({"name": "adaptive-blend", "pieces": 15}, "pieces"),
    ({"name": "adaptive-blend", "alpha": 0}, "alpha"),
    ({"name": "adaptive-blend", "test_alpha": 1.5}, "test_alpha"),
    ({"name": "adaptive-blend", "mask_rate": 1.0}, "mask_rate"),
    ({"name": "adaptive-blend", "cover_rate": -0.1}, "cover_rate"),
    ({"name": "adaptive-patch", "alphas": [0.5, 0.5]}, "alphas"),
    ({"name": "adaptive-patch", "test_triggers": [4]}, "test_triggers"),
    ({"name": "adaptive-patch", "test_triggers": [1, 1]}, "test_triggers"),
])
def test_bad_values_fail_with_one_line(spec, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build(spec, info=INFO)
    assert "\n" not in str(e.value)
