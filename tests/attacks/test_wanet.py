"""WaNet (Nguyen & Tran, ICLR 2021): the warping field, the on-the-fly poisoning of each batch with
its noise mode, and the objectives' target mapping (issue 25)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backdoorlab.attacks import ATTACKS, WaNet
from backdoorlab.attacks.wanet import warping_field
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError
from backdoorlab.train.fit import FitState, TrainConfig, fit

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def _state(seed: int = 0) -> FitState:
    return FitState(model=torch.nn.Identity(), optimizer=None, device=torch.device("cpu"),  # type: ignore[arg-type]
                    generator=torch.Generator().manual_seed(seed))


def _batch(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_field_is_the_papers_formula():
    """BackdoorBench's / the paper's code, written out independently: k x k control points in
    [-1, 1] scaled to mean |.| = 1, bicubic upsampling, identity grid from meshgrid('ij') stacked
    as (y, x), ``(identity + s * noise / H) * grid_rescale`` clamped to [-1, 1]."""
    g = torch.Generator().manual_seed(7)
    ins = torch.rand(1, 2, 4, 4, generator=g) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=32, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=32)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((y, x), 2)[None, ...]
    want = torch.clamp((identity_grid + 0.5 * noise_grid / 32) * 1, -1, 1)
    atk = WaNet(INFO, grid_seed=7)
    torch.testing.assert_close(atk.grid, want)
    assert atk.k == 4 and atk.s == 0.5 and atk.grid_rescale == 1 and atk.cross_ratio == 2 and atk.rate == 0.1
    img = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(atk.apply(img), F.grid_sample(img, want.repeat(2, 1, 1, 1), align_corners=True))


def test_field_is_fixed_by_its_seed_and_subtle():
    a, b, c = WaNet(INFO), WaNet(INFO), WaNet(INFO, grid_seed=1)
    assert torch.equal(a.grid, b.grid) and not torch.equal(a.grid, c.grid)
    assert a.state_dict() == {}  # not learned: nothing to store with the model
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(a.apply(x), b.apply(x))
    ident = warping_field(32, s=1e-12)
    shift_px = (a.grid - ident).abs() * 31 / 2  # grid units -> pixels
    assert 0.05 < float(shift_px.mean()) < 0.5 and float(shift_px.max()) < 1.5  # sub-pixel, as in the paper
    xt = a.apply(x)
    assert xt.shape == x.shape and xt.dtype == x.dtype and 0 <= float(xt.min()) and float(xt.max()) <= 1
    torch.testing.assert_close(WaNet(INFO, s=1e-9).apply(x), x, atol=1e-5, rtol=0)  # no strength: identity


def test_poison_leaves_the_split_clean():
    data = TensorData(torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8), torch.arange(50) % 10)
    split = WaNet(INFO).poison(data, torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == 0 and torch.equal(split.data.x, data.x) and torch.equal(split.data.y, data.y)


def test_hook_poisons_each_batch_with_backdoor_and_noise_samples():
    atk = WaNet(INFO, target=3)
    x, y = _batch()
    xo, yo = atk.train_hook().batch(_state(), x, y)
    assert xo.shape == x.shape and yo.shape == y.shape and x is not xo
    changed_label = yo != y
    changed_image = (xo != x).flatten(1).any(1)
    warped = torch.isclose(xo, atk.apply(x), atol=1e-6).flatten(1).all(1) & changed_image
    # the paper's counts: int(0.1 * 128) = 12 backdoor samples, int(2 * 12) = 24 noise-mode ones
    assert int(warped.sum()) == 12 and int(changed_label.sum()) == 12
    assert torch.equal(changed_label, warped) and (yo[warped] == 3).all() and (y[warped] != 3).all()
    noise = changed_image & ~warped
    assert int(noise.sum()) == 24 and torch.equal(yo[noise], y[noise])  # noise mode keeps the label
    assert int((~changed_image).sum()) == 128 - 36  # the rest is clean
    assert 0 <= float(xo.min()) and float(xo.max()) <= 1
    # deterministic under the run's generator, fresh noise under another draw
    xo2, yo2 = atk.train_hook().batch(_state(), x, y)
    assert torch.equal(xo, xo2) and torch.equal(yo, yo2)
    xo3, _ = atk.train_hook().batch(_state(1), x, y)
    assert not torch.equal(xo3[noise], xo[noise])


def test_all_to_all_maps_y_to_y_plus_one_mod_k():
    """The paper's released code (and BackdoorBench once) relabelled all-to-all backdoor samples with
    ``remainder(y, K)``, i.e. not at all; the mapping is ``(y + 1) mod K`` (Gu et al.)."""
    atk = WaNet(INFO, mode="all-to-all")
    k = torch.arange(10)
    assert atk.target_labels(k).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert bool(atk.counted(k).all())
    x, y = _batch(256, seed=3)
    xo, yo = atk.train_hook().batch(_state(), x, y)
    bd = yo != y
    assert int(bd.sum()) == 25  # int(0.1 * 256); no backdoor sample keeps its label
    assert torch.equal(yo[bd], (y[bd] + 1) % 10)
    assert torch.isclose(xo[bd], atk.apply(x[bd]), atol=1e-6).all()


def test_source_specific_and_clean_label_pick_their_candidates():
    x, y = _batch(256, seed=4)
    ss = WaNet(INFO, mode="source-specific", sources=[2, 5], target=0)
    xo, yo = ss.train_hook().batch(_state(), x, y)
    bd = yo != y
    assert bd.any() and set(y[bd].tolist()) <= {2, 5} and (yo[bd] == 0).all()
    cl = WaNet(INFO, mode="clean-label", target=4)
    xo, yo = cl.train_hook().batch(_state(), x, y)
    assert torch.equal(yo, y)  # clean-label: no label changes
    warped = torch.isclose(xo, cl.apply(x), atol=1e-6).flatten(1).all(1) & (xo != x).flatten(1).any(1)
    assert warped.any() and (y[warped] == 4).all()


def test_hook_trains_through_fit_and_counts_its_samples():
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(300) % 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    res = fit(model, data, TrainConfig(epochs=1, batch_size=100, augment=False, channels_last=False),
              generator=torch.Generator().manual_seed(0), hooks=[WaNet(INFO).train_hook()], device="cpu",
              progress=False)
    h = res.history[0]
    assert h["n_backdoor"] == 30 and h["n_noise"] == 60  # 3 batches of 100: 10 + 20 each
    assert 0 <= h["train_asr"] <= 1 and 0 <= h["train_noise_acc"] <= 1


@pytest.mark.parametrize("params,match", [
    ({"k": 1}, "k must be"), ({"k": 64}, "k must be"), ({"s": 0}, "s must be"), ({"s": "big"}, "s "),
    ({"cross_ratio": -1}, "cross_ratio"), ({"rate": 0.5}, r"rate \* \(1 \+ cross_ratio\)"),
    ({"grid_rescale": 0}, "grid_rescale"), ({"grid_seed": -1}, "grid_seed"),
])
def test_bad_values_fail_with_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "wanet", **params}, info=INFO)
    assert "\n" not in str(e.value)
