import numpy as np
import pytest
import torch
from PIL import Image

from backdoorlab.attacks import ATTACKS, BadNets, Blended
from backdoorlab.data import load_dataset
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def toy_data(n=200, seed=0):
    from backdoorlab.data import TensorData

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    return TensorData(x, torch.arange(n) % 10)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_poisons_and_triggers(name):
    """Smoke test for every registered attack: recorded indices, labels, untouched rest."""
    atk = ATTACKS.build(name, info=INFO)
    data = toy_data()
    split = atk.poison(data, torch.Generator().manual_seed(1))
    assert len(split.data) == len(data)
    idx = split.poison_idx
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == len(idx)
    clean = ~split.is_poisoned
    assert torch.equal(split.data.x[clean], data.x[clean]) and torch.equal(split.data.y[clean], data.y[clean])
    assert torch.equal(split.original_labels, data.y)
    if atk.init_from() is not None:  # model-level attacks (conditioned on compression) leave the data clean
        assert len(idx) == 0 and torch.equal(split.data.y, data.y)
    elif name != "none" and len(idx):  # data poisoning (an attack that poisons on the fly may record none)
        assert len(idx) == round(atk.rate * len(data))
        assert set(idx.tolist()) <= set(atk.candidates(data.y).tolist())  # the objective's candidates only
        if atk.mode == "clean-label":
            assert torch.equal(split.data.y, data.y) and (data.y[idx] == atk.target).all()
        else:
            assert (split.data.y[idx] == atk.target_labels(data.y[idx])).all()
            assert (data.y[idx] != atk.target_labels(data.y[idx])).all()  # the trigger must move every one
        assert not torch.equal(split.data.x[idx], data.x[idx])
    x = data.float()[:8]
    xt = atk.apply(x)
    assert xt.shape == x.shape and float(xt.min()) >= 0 and float(xt.max()) <= 1
    assert not torch.equal(xt, x)
    again = atk.poison(data, torch.Generator().manual_seed(1))
    assert torch.equal(again.poison_idx, idx)  # same generator seed, same poison


def test_badnets_default_patch_is_white_3x3_bottom_right():
    atk = BadNets(INFO)
    x = torch.zeros(2, 3, 32, 32)
    xt = atk.apply(x)
    assert (xt[:, :, 29:, 29:] == 1).all()
    assert xt.sum() == 2 * 3 * 9
    assert atk.target == 0 and atk.rate == 0.1 and atk.mode == "all-to-one"


def test_badnets_options():
    atk = BadNets(INFO, patch_size=4, position=[0, 2], color=[1.0, 0.0, 0.5], pattern="checkerboard")
    xt = atk.apply(torch.zeros(1, 3, 32, 32))
    assert xt[0, 0, 0, 2] == 1 and xt[0, 1, 0, 2] == 0 and xt[0, 2, 0, 2] == 0.5
    assert xt[0, 0, 0, 3] == 0  # checkerboard off-square
    assert xt[0, :, 4:, :].sum() == 0
    a2a = BadNets(INFO, mode="all-to-all")
    y = torch.tensor([0, 5, 9])
    assert a2a.target_labels(y).tolist() == [1, 6, 0]
    assert a2a.counted(y).all()
    for pos in ("top-left", "top-right", "bottom-left", "center"):
        assert BadNets(INFO, position=pos).apply(torch.zeros(1, 3, 32, 32)).sum() == 27


def test_blended_formula_and_image_pattern(tmp_path):
    atk = Blended(INFO)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(atk.apply(x), 0.8 * x + 0.2 * atk.pattern)
    assert atk.alpha == 0.2 and atk.rate == 0.1 and atk.target == 0
    img = tmp_path / "kitty.png"
    Image.fromarray(np.full((50, 40, 3), 255, np.uint8)).save(img)
    atk2 = Blended(INFO, pattern=str(img), alpha=0.5)
    torch.testing.assert_close(atk2.apply(torch.zeros(1, 3, 32, 32)), torch.full((1, 3, 32, 32), 0.5))
    with pytest.raises(BackdoorLabError, match="does not exist"):
        Blended(INFO, pattern=str(tmp_path / "missing.png"))


@pytest.mark.parametrize("params,match", [
    ({"rate": 1.5}, "rate must be in"),
    ({"rate": 0}, "rate must be in"),
    ({"target": 10}, r"target label must be an integer in \[0, 9\]"),
    ({"target": -1}, "target label"),
    ({"patch_size": 40}, "patch_size"),
    ({"position": "middle"}, "position must be one of"),
    ({"mode": "one-to-one"}, "mode must be one of"),
    ({"color": [2, 0, 0]}, "color must be"),
])
def test_bad_values_fail_with_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "badnets", **params}, info=INFO)
    assert "\n" not in str(e.value)


def test_rate_larger_than_candidates_is_refused():
    atk = BadNets(INFO, rate=0.95)  # 95% of the set, but target-class images can't be used
    with pytest.raises(BackdoorLabError, match="can be poisoned"):
        atk.poison(toy_data(), torch.Generator())


def test_none_probe_measures_trigger_without_poisoning():
    b = load_dataset("digits")
    atk = ATTACKS.build({"name": "none", "probe": {"name": "blended", "target": 3}}, info=b.info)
    split = atk.poison(b.train, torch.Generator())
    assert len(split.poison_idx) == 0 and torch.equal(split.data.x, b.train.x)
    assert (atk.target_labels(b.test.y) == 3).all()
