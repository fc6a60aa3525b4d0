"""SSBA (Li et al., ICCV 2021): the StegaStamp encoder/decoder asset, the sample-specific trigger
applied by the encoder, state rebuilt from the asset's tensors, every objective, and the backdoor
learned on the GTSRB subset."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import ATTACKS
from backdoorlab.attacks.base import AssetContext
from backdoorlab.attacks.ssba import Ssba, secret_bits_of, ssba_encoder
from backdoorlab.data import TensorData
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy16", 10, 3, 16, (0.5,) * 3, (0.25,) * 3, False, 1)  # 16x16: a tiny encoder in seconds
# a tiny budget: few bits, a narrow U-Net, a short schedule
TINY = {"secret": "a", "secret_bits": 8, "steps": 200, "batch_size": 16, "lr": 1e-3, "l2_start": 100,
        "l2_ramp": 50, "width": 8}


def toy_images(n=256, seed=0):
    """Smooth random colour images (uint8 NHWC): low-frequency noise upsampled to 16x16."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=16, mode="bilinear", align_corners=False)
    return TensorData((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), torch.arange(n) % 10)


def toy_ctx(seed=0):
    return AssetContext(train=toy_images(), info=INFO, generator=torch.Generator().manual_seed(seed),
                        device=torch.device("cpu"), model=None)


@pytest.fixture(scope="module")
def asset():
    return ssba_encoder(toy_ctx(), **TINY)


def bound(asset, **params):
    atk = ATTACKS.build({"name": "ssba", **TINY, **params}, info=INFO)
    atk.bind_assets({"encoder": asset})
    return atk


def test_secret_bits_are_the_strings_utf8_bits_repeated():
    bits = secret_bits_of("a", 24)
    assert bits.tolist()[:8] == [0, 1, 1, 0, 0, 0, 0, 1]  # 'a' = 0x61
    assert bits.tolist()[8:16] == [0, 0, 1, 0, 0, 0, 0, 0]  # space padding (7 characters, as the references)
    full = secret_bits_of("stega!!", 100)
    assert full.shape == (100,) and torch.equal(full[56:], full[:44])  # the 56 data bits, then repeated
    assert set(full.unique().tolist()) == {0.0, 1.0}


def test_asset_trains_an_encoder_whose_secret_the_decoder_reads(asset):
    assert torch.equal(asset["secret"], secret_bits_of("a", 8))
    assert any(k.startswith("encoder.") for k in asset) and any(k.startswith("decoder.") for k in asset)
    assert all(isinstance(v, torch.Tensor) for v in asset.values())
    # better than chance (0.5) on the attacker's secret and on random strings, after uint8 rounding
    assert float(asset["bit_acc"]) >= 0.75, {k: float(v) for k, v in asset.items() if v.numel() == 1}
    assert float(asset["bit_acc_random"]) >= 0.6
    assert 10 < float(asset["psnr"]) < 100
    again = ssba_encoder(toy_ctx(), **TINY)  # the same generator: the same encoder
    assert all(torch.equal(asset[k], again[k]) for k in asset)


def test_apply_is_shape_preserving_bounded_deterministic_and_sample_specific(asset):
    atk = bound(asset)
    x = toy_images(16, seed=3).float()
    xt = atk.apply(x)
    assert xt.shape == x.shape and xt.dtype == x.dtype
    assert float(xt.min()) >= 0 and float(xt.max()) <= 1
    assert torch.equal(atk.apply(x), xt)
    torch.testing.assert_close(atk.apply(x[5:6]), xt[5:6], atol=1e-5, rtol=0)  # batched = one at a time
    res = xt - x
    assert float(res.abs().mean()) > 1e-3  # a trigger is there
    # sample-specific: the residuals of two images differ (not one additive pattern)
    assert float((res[0] - res[1]).abs().mean()) > 0.1 * float(res[:2].abs().mean())
    # and the decoder reads the secret back from the triggered images, not from clean ones
    acc = (atk.decode(xt) == atk.bits).float().mean()
    assert float(acc) >= 0.75
    assert atk.apply(x[:0]).shape == (0, 3, 16, 16)


def test_state_survives_bind_assets_from_the_returned_tensors(asset):
    x = toy_images(8, seed=4).float()
    first = bound(asset).apply(x)
    copied = {k: v.clone() for k, v in asset.items()}
    assert torch.equal(bound(copied).apply(x), first)
    with pytest.raises(RuntimeError, match="not bound"):
        Ssba(INFO, **TINY).apply(x)
    with pytest.raises(RuntimeError, match="another secret"):
        bound(asset, secret="b")
    with pytest.raises(RuntimeError):  # a wider network than the asset's: the weights do not load
        bound(asset, width=16)
    with pytest.raises(RuntimeError, match="shape"):
        bound(asset).apply(torch.zeros(1, 3, 32, 32))


def test_every_objective(asset):
    data = toy_images(200)
    for mode, extra in [("all-to-one", {}), ("all-to-all", {}), ("source-specific", {"sources": [3]}),
                        ("clean-label", {"rate": 0.05})]:
        atk = bound(asset, mode=mode, **extra)
        split = atk.poison(data, torch.Generator().manual_seed(0))
        idx = split.poison_idx
        assert len(idx) == round(atk.rate * len(data))
        if mode == "clean-label":
            assert torch.equal(split.data.y, data.y) and (data.y[idx] == atk.target).all()
        else:
            assert (split.data.y[idx] == atk.target_labels(data.y[idx])).all()
        assert not torch.equal(split.data.x[idx], data.x[idx])
        rest = ~split.is_poisoned
        assert torch.equal(split.data.x[rest], data.x[rest])


def test_defaults_and_asset_spec():
    atk = Ssba(DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4))
    assert (atk.target, atk.rate, atk.mode) == (0, 0.1, "all-to-one")
    spec = atk.assets()["encoder"]
    assert spec["name"] == "ssba-encoder" and spec["secret"] == "stega!!" and spec["secret_bits"] == 100
    assert atk.bits.shape == (100,)


@pytest.mark.parametrize("params,match", [
    ({"secret": ""}, "secret must be"), ({"secret": 5}, "secret must be"),
    ({"secret": "too long!", "secret_bits": 64}, "takes 72 bits"), ({"secret_bits": 4}, "secret_bits"),
    ({"steps": -1}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": 0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"l2_weight": -1}, "l2_weight"), ({"l2_start": -1}, "l2_start"), ({"l2_ramp": 0}, "l2_ramp"),
    ({"bce_weight": 0}, "bce_weight"), ({"width": 0}, "width"), ({"rate": 2}, "rate"),
])
def test_bad_values_fail_with_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "ssba", **params}, info=INFO)
    assert "\n" not in str(e.value)


def test_image_size_must_suit_the_unet():
    odd = DatasetInfo("toy8", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, False, 1)
    with pytest.raises(BackdoorLabError, match="multiple of 16") as e:
        Ssba(odd)
    assert "\n" not in str(e.value)
