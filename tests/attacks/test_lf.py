"""LF, the low-frequency trigger (Zeng, Park, Mao & Jia, ICCV 2021): the low-pass filter, the
DeepFool steps, the universal-perturbation search, and the trigger as a cached asset (issue 25)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.attacks import ATTACKS, LowFrequency
from backdoorlab.attacks.base import ASSETS, AssetContext
from backdoorlab.attacks.lf import (
    deepfool_targeted,
    deepfool_untargeted,
    gaussian_kernel,
    rescale,
    search_trigger,
    smooth,
)
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()


def _low_share(v: torch.Tensor, k: int = 4) -> float:
    """Share of the spectral energy (mean removed) at spatial frequencies below ``k`` cycles per image."""
    f = torch.fft.fft2(v - v.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    n = v.shape[-1]
    freq = torch.fft.fftfreq(n) * n
    low = (freq.abs()[:, None] < k) & (freq.abs()[None, :] < k)
    return float(f[..., low].sum() / f.sum())


def test_filter_is_zeng_et_al_gaussian():
    k = gaussian_kernel(6.0)
    assert k.numel() == 30 and abs(float(k.sum()) - 1) < 1e-12 and torch.allclose(k, k.flip(0))
    t = torch.arange(30, dtype=torch.float64) - 14.5
    assert abs(float((k * t**2).sum()).__pow__(0.5) - 6.0) < 0.3  # standard deviation ~ 6 pixels (truncated)
    impulse = torch.zeros(3, 32, 32)
    impulse[:, 16, 16] = 1
    out = smooth(impulse)
    assert out.shape == impulse.shape
    # separable: the impulse response is the kernel's outer product (padding 14 before, 15 after: rows 1..30)
    torch.testing.assert_close(out[0, 1:31, 1:31].double(), torch.outer(k, k), atol=1e-7, rtol=0)
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert _low_share(noise) < 0.1 and _low_share(smooth(noise)) > 0.95  # white noise: ~49/1024 of it
    r = rescale(torch.randn(3, 32, 32), 0.2)
    assert float(r.min()) == 0 and abs(float(r.max()) - 0.2) < 1e-6


def test_deepfool_reaches_the_target_or_the_nearest_boundary():
    model = _linear()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    start = int(model(x).argmax(1))
    target = (start + 3) % 10
    r, iters = deepfool_targeted(model, x, target)
    assert int(model(x + r).argmax(1)) == target and 1 <= iters < 200
    assert deepfool_targeted(model, x, start)[1] == 0  # already there: no step
    r, iters = deepfool_untargeted(model, x, 10)
    assert int(model(x + r).argmax(1)) != start and 1 <= iters < 200


def test_search_gives_a_smooth_nonnegative_universal_trigger():
    model = _linear()
    for p in model.parameters():
        p.requires_grad_(False)
    images = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    v, rates = search_trigger(model, images, torch.Generator().manual_seed(3), target=4, num_classes=10, max_passes=3)
    assert v.shape == (3, 32, 32) and 1 <= len(rates) <= 3
    assert float(v.min()) == 0 and abs(float(v.max()) - 0.2) < 1e-6  # rescaled onto [0, amplitude]
    assert _low_share(v) > 0.99  # low frequencies only
    clean = model(images).argmax(1)
    moved = model((images + v).clamp(0, 1)).argmax(1)
    assert float((moved != clean).float().mean()) > 0  # it fools the model on some images
    again, rates2 = search_trigger(model, images, torch.Generator().manual_seed(3), target=4, num_classes=10,
                                   max_passes=3)
    assert torch.equal(v, again) and rates == rates2  # deterministic given the generator


def _ctx(model: nn.Module, n: int = 60) -> AssetContext:
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8), torch.arange(n) % 10)
    asked = []

    def get(spec):
        asked.append(spec)
        return model

    ctx = AssetContext(train=data, info=INFO, generator=torch.Generator().manual_seed(5), device=torch.device("cpu"),
                       model=get)
    ctx.asked = asked  # type: ignore[attr-defined]
    return ctx


def test_attack_declares_the_asset_and_stamps_the_bound_trigger():
    atk = ATTACKS.build({"name": "lf", "n_images": 10, "max_passes": 2}, info=INFO)
    assert (atk.target, atk.rate, atk.mode) == (0, 0.1, "all-to-one")
    spec = atk.assets()["trigger"]
    assert spec["name"] == "lf-trigger" and spec["target"] == 0 and spec["n_images"] == 10 and spec["sigma"] == 6.0
    assert ATTACKS.build({"name": "lf", "mode": "all-to-all"}, info=INFO).assets()["trigger"]["target"] is None
    with pytest.raises(RuntimeError, match="not bound"):
        atk.apply(torch.zeros(1, 3, 32, 32))
    ctx = _ctx(_linear())
    built = ASSETS.build(spec, ctx=ctx)
    assert ctx.asked == ["none"]  # the cell's clean model, from the pipeline
    assert built["trigger"].shape == (3, 32, 32) and len(built["images"]) == 10
    atk.bind_assets({"trigger": built})
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(atk.apply(x), (x + built["trigger"]).clamp(0, 1))
    split = atk.poison(ctx.train, torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == 6 and (split.data.y[split.poison_idx] == 0).all()
    with pytest.raises(RuntimeError, match="shape"):
        atk.bind_assets({"trigger": {"trigger": torch.zeros(1, 8, 8)}})


@pytest.mark.parametrize("params,match", [
    ({"n_images": 0}, "n_images"), ({"fooling_rate": 1.5}, "fooling_rate"), ({"sigma": 0}, "sigma"),
    ({"amplitude": 2}, "amplitude"), ({"max_iter_df": 1}, "max_iter_df"),
])
def test_bad_settings_are_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "lf", **params}, info=INFO)
    assert "\n" not in str(e.value)


def test_trigger_is_built_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    """Through the pipeline on digits: the clean model is trained, the trigger searched against it
    and cached; a second pipeline (nothing in memory) reads both back and stamps the same images."""
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path))
    from backdoorlab.bench.pipeline import Pipeline
    from backdoorlab.bench.study import Study

    study = Study.from_dict({"datasets": ["digits"], "models": ["small-cnn"], "train": {"epochs": 2},
                             "attacks": [{"name": "lf", "n_images": 10, "max_passes": 1, "max_iter_df": 20,
                                                       "sigma": 2.0}]})
    out = []
    for _ in range(2):
        lines: list[str] = []
        pipe = Pipeline(device="cpu", progress=False, log=lines.append)
        (cell,) = pipe.bind(study.cells())
        attack = pipe.attack(cell)
        x = pipe.data(cell.dataset).test.float()[:8]
        out.append((attack.apply(x), lines))
    (first, log1), (second, log2) = out
    assert any("building asset lf-trigger" in s for s in log1) and any("training small-cnn for none" in s for s in log1)
    assert not any("building asset" in s or "training" in s for s in log2)
    assert torch.equal(first, second)
    assert isinstance(ATTACKS.build("lf", info=study.cells()[0].dataset.info()), LowFrequency)
