"""BppAttack (Wang, Zhai & Ma, CVPR 2022): colour-depth reduction with Floyd–Steinberg dithering,
and the on-the-fly poisoning with contrastive negative samples (issue 25)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoorlab.attacks import ATTACKS, Bpp
from backdoorlab.attacks.bpp import floyd_steinberg, quantize
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError
from backdoorlab.train.fit import FitState

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def _raster_dither(image: np.ndarray, levels: int) -> np.ndarray:
    """The authors' ``floydDitherspeed`` (numba, per pixel in raster order), written out in float64."""
    image = image.copy()
    _, h, w = image.shape
    for y in range(h):
        for x in range(w):
            old = image[:, y, x].copy()
            new = np.round(old / 255.0 * (levels - 1)) / (levels - 1) * 255
            err = old - new
            image[:, y, x] = new
            if x + 1 < w:
                image[:, y, x + 1] += err * 0.4375
            if y + 1 < h and x + 1 < w:
                image[:, y + 1, x + 1] += err * 0.0625
            if y + 1 < h:
                image[:, y + 1, x] += err * 0.3125
            if x - 1 >= 0 and y + 1 < h:
                image[:, y + 1, x - 1] += err * 0.1875
    return image


@pytest.mark.parametrize("h,w,levels", [(32, 32, 8), (5, 9, 8), (9, 5, 4), (1, 7, 8), (7, 1, 2), (8, 8, 32)])
def test_wavefront_dithering_equals_the_raster_loop(h, w, levels):
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randint(0, 256, (3, 3, h, w), generator=g).double()
    got = floyd_steinberg(x, levels).numpy()
    want = np.stack([_raster_dither(img, levels) for img in x.numpy()])
    assert np.array_equal(got, want)


def test_trigger_is_the_level_grid_with_and_without_dithering():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([round(k * 255 / 7) for k in range(8)], dtype=torch.float32)
    dithered = Bpp(INFO).apply(x)
    assert Bpp(INFO).squeeze_num == 8 and Bpp(INFO).dithering and Bpp(INFO).neg_ratio == 0.1
    assert dithered.shape == x.shape and dithered.dtype == x.dtype
    assert set((dithered * 255).round().unique().tolist()) <= set(grid.tolist())
    plain = Bpp(INFO, dithering=False).apply(x)  # BackdoorBench's default: plain rounding, on k/7
    torch.testing.assert_close(plain, torch.round(torch.round(x * 255) / 255 * 7) / 7)
    # dithering keeps local brightness: 4x4 block means stay closer to the image than plain rounding's
    smooth = torch.nn.functional.avg_pool2d(x, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)

    def block_err(q):
        return float((torch.nn.functional.avg_pool2d(q - smooth, 4)).abs().mean())

    assert block_err(quantize(smooth, 8, True)) < 0.5 * block_err(quantize(smooth, 8, False))
    assert torch.equal(Bpp(INFO).apply(x), dithered)  # deterministic


def test_poison_leaves_the_split_clean():
    data = TensorData(torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8), torch.arange(50) % 10)
    split = Bpp(INFO).poison(data, torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == 0 and torch.equal(split.data.x, data.x) and torch.equal(split.data.y, data.y)


def _state(seed: int = 0) -> FitState:
    return FitState(model=torch.nn.Identity(), optimizer=None, device=torch.device("cpu"),  # type: ignore[arg-type]
                    generator=torch.Generator().manual_seed(seed))


def test_hook_adds_backdoor_and_contrastive_negative_samples():
    atk = Bpp(INFO, target=3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    xo, yo = atk.train_hook().batch(_state(), x, y)
    changed = (xo != x).flatten(1).any(1)
    relabelled = yo != y
    bd = torch.isclose(xo, atk.apply(x), atol=1e-6).flatten(1).all(1) & changed
    # BackdoorBench's counts: int(0.1 * 128) = 12 backdoor samples, int(0.1 * 128) = 12 negatives
    assert int(bd.sum()) == 12 and torch.equal(relabelled, bd) and (yo[bd] == 3).all() and (y[bd] != 3).all()
    neg = changed & ~bd
    assert int(neg.sum()) == 12 and torch.equal(yo[neg], y[neg])  # negatives keep their labels
    # each negative is x + (Q(x_r) - x_r) for another image x_r of the batch
    residual = atk.apply(x) - x
    for i in torch.nonzero(neg).flatten().tolist():
        cand = (x[i:i + 1] + residual).clamp(0, 1)
        hits = torch.isclose(cand, xo[i:i + 1], atol=1e-6).flatten(1).all(1)
        assert bool(hits.any()) and not bool(hits[i])
    assert torch.equal(xo[~changed], x[~changed])


def test_hook_follows_the_objective():
    a2a = Bpp(INFO, mode="all-to-all")
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    xo, yo = a2a.train_hook().batch(_state(), x, y)
    moved = yo != y
    assert int(moved.sum()) == 6 and torch.equal(yo[moved], (y[moved] + 1) % 10)
    clean = Bpp(INFO, mode="clean-label", target=5)
    xo, yo = clean.train_hook().batch(_state(), x, y)
    assert torch.equal(yo, y)
    bd = torch.isclose(xo, clean.apply(x), atol=1e-6).flatten(1).all(1) & (xo != x).flatten(1).any(1)
    assert int(bd.sum()) >= 1 and (y[bd] == 5).all()


@pytest.mark.parametrize("params,match", [
    ({"squeeze_num": 1}, "squeeze_num"), ({"neg_ratio": 1.0}, "neg_ratio"),
    ({"rate": 0.6, "neg_ratio": 0.5}, "rate \\+ neg_ratio"), ({"dithering": "yes"}, "dithering"),
])
def test_bad_settings_are_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "bpp", **params}, info=INFO)
    assert "\n" not in str(e.value)
