"""Image-wide filter triggers: Instagram-style photo filters as the backdoor key.

The trigger is no patch at all but a colour/tone transform of the whole image, the "filter"
trigger form of the trojan-scanning literature: Liu, Lee, Tao, Ma, Aafer & Zhang, "ABS: Scanning
Neural Networks for Back-doors by Artificial Brain Stimulation", ACM CCS 2019 (Nashville and
Gotham filter triggers); Cheng, Liu, Ma & Zhang, "Deep Feature Space Trojan Attack of Neural
Networks by Controlled Detoxification", AAAI 2021 (Instagram filters as simple feature-space
triggers);
and the IARPA/NIST TrojAI rounds (Gotham, Nashville, Kelvin, Lomo and Toaster "instagram" triggers).

Algorithm: poisoned training images are passed through the filter and relabelled (the objective,
``mode``, is the base class's: all-to-one, all-to-all, source-specific, clean-label); at test
time :meth:`FilterTrigger.apply` filters the image. Each filter is re-derived in torch from the
definitions the TrojAI data generator uses (``trojai.datagen.instagram_xforms``, themselves
"modified from" acoomans/instagram-filters, ImageMagick command lines), operator by operator
with ImageMagick's documented semantics, on float images in [0, 1]:

* ``gotham``: modulate (HSL lightness x1.2, saturation x0.1); colorize towards ``#222b6d`` by 20%;
  gamma 0.9 (``x ** (1 / 0.9)``); sigmoidal contrast (strength 3, midpoint 0.5), twice.
* ``nashville``: colour-tone the shadows towards ``#222b6d`` and the highlights towards ``#f7daae``
  (each ``x + 0.5 * m * (c - x)``, ``m`` the Rec.601 luma or its complement); sigmoidal contrast
  (3, 0.5); saturation x1.5; auto-gamma (``x ** (log 0.5 / log mean(x))``, the image's mean to 0.5).
* ``kelvin``: auto-gamma; lightness x1.2, saturation x0.5; a ``#ff9900`` layer at opacity 0.2.
* ``lomo``: red and green levels with black point 0.5 (``(x - 0.5) / 0.5``, clipped); a radial
  vignette to black (multiply by ``1 - t``, ``t`` the distance from the centre over the radius of a
  gradient 1.5x the image, ImageMagick's ``radial-gradient`` cropped to the image).
* ``toaster``: shadows toned towards ``#330000`` (50%); lightness x1.5, saturation x0.8; gamma 1.2;
  sigmoidal contrast (3, 0.5) twice; vignettes to ``LavenderBlush3`` at the edge and from
  ``#ff9966`` at the centre (multiply).

Defaults: ``kind="nashville"`` (the first of ABS's two filter triggers), target 0, 10% poisoning
(BackdoorBench's default rate, as for BadNets here; the filter papers give no single rate). A
filter has no size to scale: it acts on every pixel at any resolution.

Deviations: the transforms are re-derived, not ImageMagick's code, so they are not bit-identical to
TrojAI's images (ImageMagick's HSL rounding, 8-bit BMP round trips and gradient-alpha details differ);
``modulate`` clamps HSL saturation and lightness to [0, 1] before converting back, and the output is
clipped to [0, 1]. Auto-gamma makes ``nashville`` and ``kelvin`` depend on each image's mean, as in
ImageMagick; every filter is a deterministic function of the image alone. One-channel datasets are
filtered as grey RGB and converted back to Rec.601 luma.

Shapes and ranges: :meth:`FilterTrigger.apply` takes and returns ``(N, C, H, W)`` float in [0, 1],
``C`` 1 or 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..data.datasets import DatasetInfo
from ..errors import check
from .base import Attack

_LUMA = (0.299, 0.587, 0.114)  # Rec.601, ImageMagick's "gray" intensity


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def _colour(c: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """Rec.601 luma ``(N, 1, H, W)`` of RGB images ``(N, 3, H, W)``."""
    return (x * _colour(_LUMA, x)).sum(1, keepdim=True)


def sigmoidal_contrast(x: torch.Tensor, strength: float = 3.0, midpoint: float = 0.5) -> torch.Tensor:
    """ImageMagick's ``-sigmoidal-contrast strength x midpoint`` (increase): a logistic curve through
    (0, 0) and (1, 1), steepest at ``midpoint``."""
    lo = 1 / (1 + math.exp(strength * midpoint))
    hi = 1 / (1 + math.exp(-strength * (1 - midpoint)))
    return (torch.sigmoid(strength * (x - midpoint)) - lo) / (hi - lo)


def modulate(x: torch.Tensor, lightness: float = 1.0, saturation: float = 1.0) -> torch.Tensor:
    """ImageMagick's ``-modulate`` in HSL (hue unchanged): lightness and saturation scaled, each
    clamped to [0, 1]. Exact HSL with the hue kept: each channel is ``L + C * (u - 0.5)`` with ``u``
    its place between the pixel's min and max channel and ``C`` the chroma ``S * (1 - |2L - 1|)``."""
    mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    d = mx - mn
    light = (mx + mn) / 2
    denom = 1 - (2 * light - 1).abs()
    sat = torch.where(denom > 1e-12, d / denom.clamp_min(1e-12), torch.zeros_like(d))
    u = torch.where(d > 1e-12, (x - mn) / d.clamp_min(1e-12), torch.full_like(x, 0.5))
    light2 = (light * lightness).clamp(0, 1)
    sat2 = (sat * saturation).clamp(0, 1)
    chroma = sat2 * (1 - (2 * light2 - 1).abs())
    return (light2 + chroma * (u - 0.5)).clamp(0, 1)


def colortone(x: torch.Tensor, colour: str, level: float, shadows: bool) -> torch.Tensor:
    """Tone the shadows (``shadows=True``: weight ``1 - luma``) or the highlights (weight ``luma``)
    towards ``colour`` by ``level``: ``x + level * m * (c - x)`` (ImageMagick's three-image
    ``-compose blend`` composite, the grey image as mask)."""
    m = luma(x)
    m = 1 - m if shadows else m
    return x + level * m * (_colour(_rgb(colour), x) - x)


def auto_gamma(x: torch.Tensor) -> torch.Tensor:
    """ImageMagick's ``-auto-gamma`` (channels together): ``x ** (log 0.5 / log mean)``, which sends
    each image's mean to 0.5."""
    mean = x.mean((1, 2, 3), keepdim=True).clamp(1e-3, 1 - 1e-3)
    return x.clamp_min(0).pow(math.log(0.5) / torch.log(mean))


def radial(h: int, w: int, crop_factor: float = 1.5, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` in [0, 1], ``(1, 1, H, W)``: the distance from the image centre over the radius of an
    ImageMagick ``radial-gradient`` of ``crop_factor`` times the image, cropped to the image."""
    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    yy = torch.arange(h, **kw) + 0.5 - h / 2
    xx = torch.arange(w, **kw) + 0.5 - w / 2
    dist = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return (dist / (crop_factor * max(h, w) / 2)).clamp(0, 1).view(1, 1, h, w)


def gotham(x: torch.Tensor) -> torch.Tensor:
    x = modulate(x, 1.2, 0.1)
    x = x + 0.2 * (_colour(_rgb("#222b6d"), x) - x)
    x = x.clamp(0, 1).pow(1 / 0.9)
    return sigmoidal_contrast(sigmoidal_contrast(x))


def nashville(x: torch.Tensor) -> torch.Tensor:
    x = colortone(x, "#222b6d", 0.5, shadows=True)
    x = colortone(x, "#f7daae", 0.5, shadows=False)
    x = sigmoidal_contrast(x)
    x = modulate(x, 1.0, 1.5)
    return auto_gamma(x)


def kelvin(x: torch.Tensor) -> torch.Tensor:
    x = modulate(auto_gamma(x), 1.2, 0.5)
    return 0.8 * x + 0.2 * _colour(_rgb("#ff9900"), x)


def lomo(x: torch.Tensor) -> torch.Tensor:
    rg = ((x[:, :2] - 0.5) / 0.5).clamp(0, 1)
    x = torch.cat([rg, x[:, 2:]], 1)
    return x * (1 - radial(x.shape[2], x.shape[3], like=x))


def toaster(x: torch.Tensor) -> torch.Tensor:
    x = colortone(x, "#330000", 0.5, shadows=True)
    x = modulate(x, 1.5, 0.8)
    x = x.clamp(0, 1).pow(1 / 1.2)
    x = sigmoidal_contrast(sigmoidal_contrast(x))
    t = radial(x.shape[2], x.shape[3], like=x)
    x = x * ((1 - t) + t * _colour(_rgb("#cdc1c5"), x))  # LavenderBlush3 at the edge
    return x * (t + (1 - t) * _colour(_rgb("#ff9966"), x))  # #ff9966 at the centre


FILTERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nashville": nashville, "gotham": gotham, "kelvin": kelvin, "lomo": lomo, "toaster": toaster}


class FilterTrigger(Attack):
    """An Instagram-style filter over the whole image as the trigger (see the module docstring)."""

    name = "filter"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 kind: str = "nashville", sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        check(kind in FILTERS, f"filter: kind must be one of {', '.join(FILTERS)}, got {kind!r}")
        check(info.channels in (1, 3), f"filter: needs 1- or 3-channel images, {info.name} has {info.channels}")
        self.kind = kind
        self._fn = FILTERS[kind]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.shape[1] == 1
        rgb = x.expand(-1, 3, -1, -1) if grey else x
        out = self._fn(rgb.float()).clamp(0, 1)
        if grey:
            out = luma(out)
        return out.to(x.dtype)
