"""SIG (Barni, Kallas & Tondi, ICIP 2019): the sinusoidal signal, its clean-label poisoning and
its settings (issue 25)."""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.attacks import ATTACKS, SIG
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def _data(n: int = 300, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def test_signal_is_the_papers_formula_with_backdoorbenchs_defaults():
    atk = ATTACKS.build("sig", info=INFO)
    assert atk.mode == "clean-label" and atk.target == 0 and atk.rate == 0.1
    assert atk.delta == 40 and atk.delta_test == 40 and atk.f == 6
    x = torch.full((2, 3, 32, 32), 0.5)
    want = torch.tensor([0.5 + 40 / 255 * math.sin(2 * math.pi * j * 6 / 32) for j in range(32)])
    out = atk.apply(x)
    torch.testing.assert_close(out, want.view(1, 1, 1, 32).expand(2, 3, 32, 32), atol=1e-6, rtol=0)
    # horizontal: varies along the columns, equal down every column and across channels
    assert torch.equal(out, out[:, :1, :1, :].expand_as(out))
    torch.testing.assert_close(atk.signal(), out[0] - 0.5, atol=1e-6, rtol=0)
    # clipped to [0, 1]
    bright = atk.apply(torch.ones(1, 3, 32, 32))
    assert float(bright.max()) == 1.0 and float(bright.min()) < 1.0


def test_clean_label_poisoning_marks_target_images_only_and_keeps_every_label():
    data = _data()
    atk = SIG(INFO, target=4, rate=0.08)
    split = atk.poison(data, torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == round(0.08 * 300) == 24
    assert (data.y[split.poison_idx] == 4).all() and torch.equal(split.data.y, data.y)
    clean = ~split.is_poisoned
    assert torch.equal(split.data.x[clean], data.x[clean])
    # poisoned images are the triggered ones, stored as whole grey levels
    want = (atk.apply(data.float()[split.poison_idx]) * 255).round()
    got = split.data.float()[split.poison_idx] * 255
    torch.testing.assert_close(got, want, atol=0.01, rtol=0)


def test_test_time_strength_is_separate_from_the_training_signal():
    """``delta_test`` (Barni et al.'s stronger test signal) changes apply() but not the poisoned data."""
    data = _data()
    weak, strong = SIG(INFO, delta=20), SIG(INFO, delta=20, delta_test=40)
    a = weak.poison(data, torch.Generator().manual_seed(0))
    b = strong.poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(a.data.x, b.data.x) and torch.equal(a.poison_idx, b.poison_idx)
    x = torch.full((1, 3, 32, 32), 0.5)
    torch.testing.assert_close(strong.apply(x) - 0.5, 2 * (weak.apply(x) - 0.5), atol=1e-6, rtol=0)


def test_other_objectives_take_the_signal_as_their_trigger():
    data = _data()
    atk = SIG(INFO, mode="all-to-one", target=2)
    split = atk.poison(data, torch.Generator().manual_seed(0))
    assert (split.data.y[split.poison_idx] == 2).all() and (data.y[split.poison_idx] != 2).all()


@pytest.mark.parametrize("params,match", [
    ({"delta": 0}, "delta must be"), ({"delta": 300}, "delta must be"), ({"f": -1}, "f "),
    ({"delta_test": 0}, "delta_test must be"),
])
def test_bad_settings_are_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "sig", **params}, info=INFO)
    assert "\n" not in str(e.value)


def test_a_rate_beyond_the_target_class_is_refused():
    """Clean-label: only target-class images can carry the signal (10% of this toy set)."""
    with pytest.raises(BackdoorLabError, match="can be poisoned"):
        SIG(INFO, rate=0.2).poison(_data(), torch.Generator())
