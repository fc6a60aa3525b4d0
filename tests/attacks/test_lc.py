"""LC, the label-consistent attack (Turner et al. 2019; issue 25): the corner trigger at full and
a reduced amplitude, the PGD asset, clean-label poisoning with the adversarial images, and the
backdoor learned on the GTSRB subset."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import ATTACKS
from backdoorlab.attacks.base import AssetContext
from backdoorlab.attacks.lc import LabelConsistent, lc_adversarial, pgd_away, stamp, trigger_signs
from backdoorlab.data import TensorData
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import build_model

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
SMALL = DatasetInfo("toy8", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, False, 1)  # 8x8: PGD on 2 cores in a second


def toy_data(n=200, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    return TensorData(x, torch.arange(n) % 10)


def toy_ctx(data, seed=0):
    torch.manual_seed(seed)  # the toy model's initial weights (tests seed; the library never does)
    model = build_model("small-cnn", SMALL.num_classes, SMALL.channels, SMALL.mean, SMALL.std).eval()
    return AssetContext(train=data, info=SMALL, generator=torch.Generator().manual_seed(seed),
                        device=torch.device("cpu"), model=lambda spec: model)


def bound_lc(data, **params):
    """An LC attack on 8x8 toy images with its asset built on a toy (untrained) model."""
    atk = ATTACKS.build({"name": "lc", "steps": 5, **params}, info=SMALL)
    (name, spec), = atk.assets().items()
    atk.bind_assets({name: lc_adversarial(toy_ctx(data), **{k: v for k, v in spec.items() if k != "name"})})
    return atk


# ---------------------------------------------------------------- the trigger
def test_corner_trigger_is_turner_et_als_checkerboard():
    s = trigger_signs("all-corners", 32)
    assert int((s != 0).sum()) == 36  # 3x3 in each of the four corners, nothing else
    assert (s[3:29, :] == 0).all() and (s[:, 3:29] == 0).all()
    br = s[29:, 29:]
    assert torch.equal(br, torch.tensor([[-1., -1., 1.], [-1., 1., -1.], [1., -1., 1.]]))
    assert torch.equal(trigger_signs("bottom-right", 32)[29:, 29:], br)
    assert int((trigger_signs("bottom-right", 32) != 0).sum()) == 9
    assert torch.equal(s[:3, :3], torch.tensor([[1., -1., -1.], [-1., 1., -1.], [1., -1., 1.]]))


def test_test_trigger_is_full_amplitude_and_training_trigger_may_be_reduced():
    default = LabelConsistent(INFO)
    assert default.amplitude == 1.0 and default.test_amplitude == 1.0  # BackdoorBench's setting
    assert default.mode == "clean-label" and default.target == 0 and default.rate == 0.1
    x = torch.full((2, 3, 32, 32), 0.5)
    assert torch.equal(default.poison_images(x), default.apply(x))
    atk = LabelConsistent(INFO, amplitude=16 / 255)  # Turner et al.'s least visible training trigger
    xt = atk.apply(x)
    s = atk.signs
    assert (xt[:, :, s == 1] == 1).all() and (xt[:, :, s == -1] == 0).all()  # white and black squares
    assert torch.equal(xt[:, :, s == 0], x[:, :, s == 0])  # nothing else touched
    assert torch.equal(atk.apply(x), xt)  # deterministic
    xp = atk.poison_images(x)
    torch.testing.assert_close((xp - x)[:, :, s != 0].abs(), torch.full_like(xp[:, :, s != 0], 16 / 255))
    assert torch.equal(xp[:, :, s == 0], x[:, :, s == 0])
    torch.testing.assert_close(stamp(torch.ones(1, 1, 8, 8), trigger_signs("all-corners", 8), 0.25).min(),
                               torch.tensor(0.75))  # clipped to [0, 1]: only black squares move a white image


# ---------------------------------------------------------------- the adversarial images
def test_pgd_stays_in_the_eps_ball_and_raises_the_loss():
    data = toy_data(16)
    ctx = toy_ctx(data)
    model = ctx.model("none")
    x, y = data.float(), data.y
    adv = pgd_away(model, x, y, 8 / 255, 1.5 / 255, 10)
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(x), y)
        after = torch.nn.functional.cross_entropy(model(adv), y)
    assert after > before
    assert torch.equal(adv, pgd_away(model, x, y, 8 / 255, 1.5 / 255, 10))  # no random start


def test_asset_perturbs_every_target_image_within_eps():
    data = toy_data()
    out = lc_adversarial(toy_ctx(data), target=3, eps=8 / 255, step=2 / 255, steps=5)
    assert torch.equal(out["index"], torch.nonzero(data.y == 3).flatten())
    diff = (out["images"].int() - data.x[out["index"]].int()).abs()
    assert int(diff.max()) <= 8 and int(diff.max()) >= 7  # at the L_inf bound (rounded to grey levels)
    assert float(out["adv_acc"]) <= float(out["clean_acc"])


def test_poison_uses_adversarial_images_with_the_reduced_trigger_and_keeps_labels():
    data = toy_data()
    atk = bound_lc(data, target=3, rate=0.05, amplitude=32 / 255)
    split = atk.poison(data, torch.Generator().manual_seed(1))
    idx = split.poison_idx
    assert len(idx) == 10 and (data.y[idx] == 3).all() and torch.equal(split.data.y, data.y)
    pos = {int(i): k for k, i in enumerate(atk.adv_index)}
    adv = atk.adv_images[[pos[int(i)] for i in idx]]
    expect = (stamp(adv.permute(0, 3, 1, 2).float() / 255, atk.signs, 32 / 255) * 255).round().to(torch.uint8)
    assert atk.signs.shape == (8, 8) and int((atk.signs != 0).sum()) == 36  # the corners tile an 8x8 image
    assert torch.equal(split.data.x[idx], expect.permute(0, 2, 3, 1))
    clean = ~split.is_poisoned
    assert torch.equal(split.data.x[clean], data.x[clean])
    again = atk.poison(data, torch.Generator().manual_seed(1))
    assert torch.equal(again.data.x, split.data.x)


def test_every_objective_check_and_unbound_use():
    with pytest.raises(BackdoorLabError, match="mode must be clean-label") as e:
        ATTACKS.build({"name": "lc", "mode": "all-to-one"}, info=INFO)
    assert "\n" not in str(e.value)
    for params, match in [({"eps": -0.1}, "eps"), ({"amplitude": 0}, "amplitude"), ({"trigger": "top"}, "trigger"),
                          ({"steps": -1}, "steps"), ({"rate": 0.2}, None)]:
        if match is None:  # rate 0.2: more than the 10% target class holds, refused at poisoning time
            atk = bound_lc(toy_data(), **params)
            with pytest.raises(BackdoorLabError, match="can be poisoned"):
                atk.poison(toy_data(), torch.Generator())
            continue
        with pytest.raises(BackdoorLabError, match=match):
            ATTACKS.build({"name": "lc", **params}, info=INFO)
    with pytest.raises(BackdoorLabError, match="at least 6x6"):
        ATTACKS.build("lc", info=DatasetInfo("tiny", 10, 1, 5, (0.5,), (0.25,), False, 0))
    with pytest.raises(RuntimeError, match="not bound"):
        LabelConsistent(SMALL).poison(toy_data(), torch.Generator())
    other = bound_lc(toy_data(seed=1))  # an asset built for other images is refused, not used
    with pytest.raises(RuntimeError, match="other data"):
        other.poison(toy_data(seed=0), torch.Generator().manual_seed(0))
