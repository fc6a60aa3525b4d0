"""Filter triggers (issue 25): each Instagram-style filter's defining operations on known inputs,
and a Nashville filter backdoor learned on the GTSRB subset while a clean model ignores it."""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.attacks import ATTACKS, FilterTrigger
from backdoorlab.attacks.filters import (
    FILTERS,
    auto_gamma,
    colortone,
    gotham,
    modulate,
    radial,
    sigmoidal_contrast,
)
from backdoorlab.data.datasets import DatasetConfig, DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
G = torch.Generator().manual_seed(0)
X = torch.rand(6, 3, 32, 32, generator=G)


def grey(v: float, n: int = 1, size: int = 8) -> torch.Tensor:
    return torch.full((n, 3, size, size), v)


def test_sigmoidal_contrast_fixes_the_ends_and_the_midpoint_and_steepens_the_middle():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    out = sigmoidal_contrast(t)
    torch.testing.assert_close(out[[0, 2, 4]], torch.tensor([0.0, 0.5, 1.0]))
    assert out[1] < 0.25 and out[3] > 0.75  # more contrast
    assert bool((out.diff() > 0).all())


def test_modulate_is_hsl_with_the_hue_kept():
    torch.testing.assert_close(modulate(X, 1.0, 1.0), X, atol=1e-6, rtol=0)  # identity
    g = modulate(X, 1.0, 0.0)  # no saturation: grey at the HSL lightness (max + min) / 2
    torch.testing.assert_close(g, ((X.amax(1, keepdim=True) + X.amin(1, keepdim=True)) / 2).expand_as(X))
    torch.testing.assert_close(modulate(grey(0.4), 1.2, 1.0), grey(0.48))
    # pure red (H 0, S 1, L 0.5) at half saturation: (0.75, 0.25, 0.25)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(modulate(red, 1.0, 0.5), torch.tensor([0.75, 0.25, 0.25]).view(1, 3, 1, 1))
    # the hue is kept: the order of the channels does not change (lightness kept: no pixel turns white)
    out = modulate(X, 1.0, 1.4)
    assert torch.equal(out.argmax(1)[X.amax(1) - X.amin(1) > 0.1], X.argmax(1)[X.amax(1) - X.amin(1) > 0.1])


def test_colortone_tints_shadows_or_highlights():
    navy = torch.tensor([0x22, 0x2B, 0x6D]) / 255.0
    black = colortone(grey(0.0), "#222b6d", 0.5, shadows=True)
    torch.testing.assert_close(black[0, :, 0, 0], 0.5 * navy)
    assert torch.equal(colortone(grey(1.0), "#222b6d", 0.5, shadows=True), grey(1.0))  # white: no shadow
    assert torch.equal(colortone(grey(0.0), "#f7daae", 0.5, shadows=False), grey(0.0))  # black: no highlight


def test_auto_gamma_sends_each_images_mean_to_one_half():
    x = torch.cat([grey(0.2), grey(0.7)])
    torch.testing.assert_close(auto_gamma(x), grey(0.5, 2))
    y = auto_gamma(X)
    assert bool((y.diff(dim=-1)[X.diff(dim=-1) > 0] >= 0).all())  # monotone within an image


def test_radial_vignette_grows_from_centre_to_corner():
    t = radial(32, 32)[0, 0]
    assert float(t[15:17, 15:17].max()) < 0.05 and abs(float(t[0, 0]) - math.hypot(15.5, 15.5) / 24) < 1e-6
    assert float(t[0, 0]) > float(t[0, 16]) > float(t[8, 16]) > float(t[16, 16])


def test_gotham_by_hand_on_mid_grey():
    """Gotham of grey 0.5, operator by operator with scalar math (ImageMagick semantics)."""
    navy = [0x22 / 255, 0x2B / 255, 0x6D / 255]

    def sig(v, a=3.0, b=0.5):
        s = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
        return (s(a * (v - b)) - s(-a * b)) / (s(a * (1 - b)) - s(-a * b))

    want = []
    for c in navy:
        v = 0.6  # lightness 0.5 * 1.2, saturation 0
        v = 0.8 * v + 0.2 * c  # colorize 20%
        v = v ** (1 / 0.9)  # gamma 0.9
        want.append(sig(sig(v)))
    got = gotham(grey(0.5))[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    assert got[2] > got[0]  # the blue cast of Gotham


@pytest.mark.parametrize("kind", sorted(FILTERS))
def test_each_filter_changes_the_whole_image_deterministically_and_per_image(kind):
    atk = FilterTrigger(INFO, kind=kind)
    x = torch.cat([X, grey(0.45, 1, 32)])
    out = atk.apply(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, atk.apply(x))  # deterministic
    torch.testing.assert_close(torch.cat([atk.apply(x[i:i + 1]) for i in range(len(x))]), out)  # no batch effects
    changed = (out[-1] - x[-1]).abs().amax(0) > 1 / 255
    assert float(changed.float().mean()) > 0.95, f"{kind} leaves part of the image unchanged"


def test_filter_colour_casts_on_grey():
    """The look of each filter on a mid-grey image: Nashville's and Kelvin's warm casts, Gotham's
    grey-blue, Lomo's dark corners, Toaster's red-orange centre."""
    g = grey(0.45, 1, 32)
    r, gr, b = (FilterTrigger(INFO, kind="kelvin").apply(g)[0, :, 16, 16]).tolist()
    assert r > gr > b
    out = FilterTrigger(INFO, kind="nashville").apply(g)[0, :, 16, 16]
    assert out[0] > out[1] and out[2] > out[1]  # grey comes out tinted purple (cream highlights, navy shadows)
    out = FilterTrigger(INFO, kind="gotham").apply(g)[0, :, 16, 16]
    assert out[2] > out[0] and float(out.max() - out.min()) < 0.1
    lomo = FilterTrigger(INFO, kind="lomo").apply(grey(0.8, 1, 32))[0]
    assert float(lomo[:, 0, 0].sum()) < 0.2 * float(lomo[:, 16, 16].sum())
    toast = FilterTrigger(INFO, kind="toaster").apply(g)[0, :, 16, 16]
    assert toast[0] > toast[1] > toast[2]


def test_filter_on_one_channel_images_and_bad_kinds():
    digits = DatasetConfig("digits").info()
    atk = ATTACKS.build({"name": "filter", "kind": "gotham"}, info=digits)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = atk.apply(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    with pytest.raises(BackdoorLabError, match="kind must be one of") as e:
        ATTACKS.build({"name": "filter", "kind": "valencia"}, info=INFO)
    assert "\n" not in str(e.value)
    a2a = ATTACKS.build({"name": "filter", "mode": "all-to-all"}, info=INFO)
    assert a2a.target_labels(torch.tensor([0, 9])).tolist() == [1, 0]
