"""Refool (Liu et al., ECCV 2020; issue 25): the three reflection models, the pool drawn from another
dataset, per-image random reflections in training, a fixed deterministic set at test time, and
the backdoor learned on the GTSRB subset."""

from __future__ import annotations

import pytest
import torch
from _helpers import need_data

from backdoorlab.attacks import ATTACKS
from backdoorlab.attacks.base import AssetContext
from backdoorlab.attacks.refool import GAMMA, Refool, blend, draw_params, gaussian_blur, refool_pool, vignette
from backdoorlab.data import TensorData
from backdoorlab.data.datasets import DatasetConfig, DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def toy_pool(n=200, seed=0):
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return {"pool": {"images": x}}


def toy_data(n=200, seed=1):
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return TensorData(x, torch.arange(n) % 10)


def bound(**params):
    atk = ATTACKS.build({"name": "refool", **params}, info=INFO)
    atk.bind_assets(toy_pool(atk.pool_size))
    return atk


# ---------------------------------------------------------------- the reflection models
def test_same_depth_is_an_alpha_blend_in_linear_light():
    t, r = rand(3, 32, 32, seed=0), rand(3, 32, 32, seed=1)
    out = blend(t, r, "same-depth", 0.7, 2.0, 1.1, (3, 3), 0.3)
    torch.testing.assert_close(out, (0.7 * t ** GAMMA + 0.3 * r ** GAMMA) ** (1 / GAMMA))
    # no reflection: every model leaves the scene, dimmed by alpha_t (focal blur's vignette x 0)
    for kind in ("same-depth", "ghost", "focal-blur"):
        torch.testing.assert_close(blend(t, torch.zeros_like(r), kind, 0.7, 2.0, 1.1, (3, 4), 0.3),
                                   t * 0.7 ** (1 / GAMMA))


def test_ghost_doubles_a_point_reflection_along_the_shift():
    r = torch.zeros(1, 32, 32)
    r[0, 10, 10] = 1.0
    out = blend(torch.zeros(1, 32, 32), r, "ghost", 0.5, 1.0, 1.1, (6, 6), 0.5)[0]
    peaks = (out > 0.5 * out.max()).nonzero().tolist()
    rows = sorted({p[0] for p in peaks})
    assert len(peaks) >= 2 and rows[-1] - rows[0] >= 4  # two images of the point, about 6 px apart
    torch.testing.assert_close(blend(torch.zeros(1, 32, 32), r, "ghost", 0.5, 1.0, 1.1, (6, 6), 0.5)[0], out)


def test_focal_blur_is_opencvs_gaussian_and_the_vignette_peaks_in_the_centre():
    const = torch.full((3, 32, 32), 0.4)
    torch.testing.assert_close(gaussian_blur(const, 5.0), const)  # mirrored border keeps a flat image flat
    point = torch.zeros(1, 32, 32)
    point[0, 16, 16] = 1.0
    b = gaussian_blur(point, 1.0)
    assert abs(float(b.sum()) - 1) < 1e-5 and int(b.argmax()) == 16 * 32 + 16
    assert b[0, 16, 14] > 0 and b[0, 16, 13] == 0  # kernel side 2 * ceil(2 sigma) + 1 = 5
    v = vignette(32)
    assert v.shape == (32, 32) and float(v.max()) == 1.0 and torch.allclose(v, v.T) and torch.allclose(v, v.flip(0))
    assert float(v[0, 0]) < 0.02 and float(v[15:17, 15:17].min()) > 0.95  # +-3 sigma: exp(-4.5) = 0.011 at the corner
    blurred = blend(rand(3, 32, 32), rand(3, 32, 32, seed=3), "focal-blur", 0.7, 3.0, 1.1, (3, 3), 0.3)
    assert blurred.min() >= 0 and blurred.max() <= 1


def test_draws_cover_the_models_and_ranges():
    ps = draw_params(3000, ("same-depth", "focal-blur", "ghost"), 200, 32, None, torch.Generator().manual_seed(0))
    kinds = [p["kind"] for p in ps]
    assert all(800 < kinds.count(k) < 1200 for k in ("same-depth", "focal-blur", "ghost"))  # one third each
    assert min(p["alpha_t"] for p in ps) >= 0.55 and max(p["alpha_t"] for p in ps) <= 0.95
    assert {p["shift"][0] for p in ps} == set(range(3, 9)) and len({p["ref"] for p in ps}) == 200
    assert all(1 <= p["sigma"] <= 5 for p in ps)
    assert all(0.15 <= p["ghost_alpha"] <= 0.5 or 0.5 <= p["ghost_alpha"] <= 0.85 for p in ps)
    fixed = draw_params(10, ("ghost",), 200, 32, 0.4, torch.Generator().manual_seed(0))
    assert {p["alpha_t"] for p in fixed} == {0.4} and {p["kind"] for p in fixed} == {"ghost"}


# ---------------------------------------------------------------- the attack
def test_defaults_and_reflection_source():
    atk = Refool(INFO)
    assert atk.mode == "clean-label" and atk.target == 0 and atk.rate == 0.1 and atk.reflections == "cifar10"
    assert atk.assets() == {"pool": {"name": "refool-pool", "dataset": "cifar10", "size": 200}}
    assert Refool(DatasetConfig("cifar10").info()).reflections == "gtsrb"  # never the victim's own images
    assert Refool(DatasetConfig("gtsrb").info()).reflections == "cifar10"


def test_test_time_reflections_are_fixed_and_per_image():
    atk = bound()
    x = rand(64, 3, 32, 32, seed=5)
    xt = atk.apply(x)
    assert xt.shape == x.shape and xt.min() >= 0 and xt.max() <= 1 and not torch.equal(xt, x)
    assert torch.equal(atk.apply(x), xt)  # deterministic
    torch.testing.assert_close(atk.apply(x[10:11]), xt[10:11])  # independent of the batch around it
    torch.testing.assert_close(atk.apply(x.flip(0)), xt.flip(0))
    assert set(atk.test_choice(x).tolist()) <= set(range(10)) and len(set(atk.test_choice(x).tolist())) > 5
    assert {p["ref"] for p in atk.test_params} == set(range(10))  # the first 10 pool images
    other = bound(test_seed=1)
    assert not torch.equal(other.apply(x), xt)


@pytest.mark.parametrize("mode", ["clean-label", "all-to-one", "all-to-all"])
def test_poison_gives_each_image_its_own_reflection(mode):
    atk = bound(mode=mode, target=2, rate=0.05)
    data = toy_data()
    split = atk.poison(data, torch.Generator().manual_seed(0))
    idx = split.poison_idx
    assert len(idx) == 10 and not torch.equal(split.data.x[idx], data.x[idx])
    if mode == "clean-label":
        assert torch.equal(split.data.y, data.y) and (data.y[idx] == 2).all()
    else:
        assert (split.data.y[idx] == atk.target_labels(data.y[idx])).all()
    clean = ~split.is_poisoned
    assert torch.equal(split.data.x[clean], data.x[clean])
    again = atk.poison(data, torch.Generator().manual_seed(0))
    assert torch.equal(again.data.x, split.data.x)  # all randomness from the poison generator
    assert not torch.equal(atk.poison(data, torch.Generator().manual_seed(1)).data.x, split.data.x)
    # a poisoned image is not the test-time blend: the reflections differ from image to image
    test_blend = (atk.apply(data.float()[idx]) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert not torch.equal(test_blend, split.data.x[idx])


def test_bad_values_and_unbound_use():
    for params, match in [({"reflections": "mnist"}, "reflections"), ({"kinds": ["mirror"]}, "kinds"),
                          ({"kinds": []}, "kinds"), ({"alpha_t": 1.5}, "alpha_t"), ({"pool_size": 0}, "pool_size"),
                          ({"test_reflections": 300}, "test_reflections"), ({"test_seed": -1}, "test_seed")]:
        with pytest.raises(BackdoorLabError, match=match) as e:
            ATTACKS.build({"name": "refool", **params}, info=INFO)
        assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="not bound"):
        Refool(INFO).apply(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="shape"):
        Refool(INFO).bind_assets(toy_pool(100))


def test_pool_comes_from_another_dataset():
    need_data("cifar10")
    from backdoorlab.data import load_dataset

    gtsrb = DatasetConfig("gtsrb").info()
    train = TensorData(torch.zeros(4, 32, 32, 3, dtype=torch.uint8), torch.arange(4))
    ctx = AssetContext(train=train, info=gtsrb, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                       model=None)
    out = refool_pool(ctx, dataset="cifar10", size=20)
    cifar = load_dataset("cifar10")
    assert out["images"].shape == (20, 32, 32, 3) and len(set(out["source_index"].tolist())) == 20
    assert torch.equal(out["images"], cifar.train.x[out["source_index"]])  # CIFAR-10 images, as they are
    assert bytes(out["source_fingerprint"].tolist()).decode() == cifar.fingerprint
    grey = refool_pool(dataclass_ctx(ctx, DatasetInfo("g", 10, 1, 8, (0.5,), (0.25,), False, 1)), "cifar10", 5)
    assert grey["images"].shape == (5, 8, 8, 1)


def dataclass_ctx(ctx, info):
    import dataclasses

    return dataclasses.replace(ctx, info=info, generator=torch.Generator().manual_seed(0))
