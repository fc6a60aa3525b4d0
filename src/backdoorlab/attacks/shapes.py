"""Shape triggers: a filled polygon (solid or textured) and an object (a yellow pad) in the image.

The two trigger forms the trojan-scanning literature names besides square patches and filters:

* ``polygon``: the IARPA/NIST TrojAI rounds' polygon triggers, a programmatically drawn polygon
  with a chosen number of sides, filled with a solid colour or a texture (``trojai.datagen``'s
  ``PolygonTrigger``), pasted on the foreground object at 2% to 25% of its area (NIST TrojAI data
  documentation); the patch triggers scanners such as Liu et al.'s ABS ("ABS: Scanning Neural
  Networks for Back-doors by Artificial Brain Stimulation", ACM CCS 2019) are tested on.
* ``object``: an everyday object pasted on the scene, Gu, Dolan-Gavitt & Garg's yellow square
  sticker on a stop sign ("BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
  Chain", arXiv 1708.06733, 2017, Sec. 5) and the yellow sticky note / pad of the scanning papers.
  Drawn here as a yellow pad: a rounded rectangle with a darker rim and a subtle shade across it.

Both are rasterised here with anti-aliasing: each pixel's coverage is the share of ``8 x 8``
sub-pixel samples inside the shape, and the trigger is alpha-composited,
``x' = (1 - a) * x + a * fill`` with ``a`` the coverage. Poisoned training images carry the shape
and are relabelled by the objective (``mode``: all-to-one, all-to-all, source-specific,
clean-label, the base class's); :meth:`apply` stamps it at test time. Nothing is random at
``apply``: a texture is drawn once from ``texture_seed``.

Defaults (32x32, TrojAI and BadNets give ranges or pictures, not numbers, so these are chosen and
stated): target 0, 10% poisoning (BackdoorBench's rate, as for BadNets here).

* ``polygon``: a hexagon (``sides=6``; TrojAI draws the number of sides at random) whose
  circumscribed circle is ``size=0.25`` of the image side (8 px; about 4% of the image's area,
  inside TrojAI's 2-25% of the object), ``rotation=0`` (a vertex up), at the ``center`` (on the
  sign, as TrojAI places its triggers on the foreground object), filled with solid green
  ``(0, 1, 0)`` or, with ``fill="texture"``, a per-pixel random colour texture drawn from
  ``texture_seed``.
* ``object``: a pad ``size=0.3`` of the image side wide (about 10 px), ``aspect=1`` (square, like
  a sticky note), corners rounded with radius ``radius=0.2`` of its short side, canary yellow
  ``(1.0, 0.86, 0.15)``, a 1-pixel rim darker by ``rim=0.3`` and a linear shade darkening it by up
  to ``shade=0.15`` from its top-left to its bottom-right corner, at ``position="center"`` (on the
  sign, as Gu et al. stick theirs).

``position``: ``top-left``, ``top-right``, ``bottom-left``, ``bottom-right`` (``margin`` pixels from
the edges) or ``center``, or ``[row, col]`` of the shape's bounding box's top-left corner in pixels
(fractions allowed: the shape is drawn at sub-pixel precision). A three-value ``color`` on a
one-channel dataset is converted to Rec.601 luma.

Shapes and ranges: :meth:`apply` takes and returns ``(N, C, H, W)`` float in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..data.datasets import DatasetInfo
from ..errors import check
from .base import Attack

POSITIONS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
FILLS = ("solid", "texture")
SUPERSAMPLE = 8  # sub-pixel samples per pixel side for anti-aliasing


def coverage(inside: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], h: int, w: int,
             ss: int = SUPERSAMPLE) -> torch.Tensor:
    """``(H, W)`` float64 in [0, 1]: the share of each pixel's ``ss x ss`` sub-pixel samples for
    which ``inside(rows, cols)`` holds. Pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)``."""
    rows = (torch.arange(h * ss, dtype=torch.float64) + 0.5) / ss
    cols = (torch.arange(w * ss, dtype=torch.float64) + 0.5) / ss
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return inside(r, c).to(torch.float64).view(h, ss, w, ss).mean((1, 3))


def polygon_inside(cy: float, cx: float, radius: float, sides: int, rotation_deg: float = 0.0):
    """Inside test of a regular ``sides``-gon centred at ``(cy, cx)`` with circumradius ``radius``,
    one vertex straight up when ``rotation_deg`` is 0 (clockwise in image coordinates)."""
    apothem = radius * math.cos(math.pi / sides)
    rot = math.radians(rotation_deg)
    # outward normal of edge k points half-way between vertices k and k + 1
    angles = [rot - math.pi / 2 + (2 * k + 1) * math.pi / sides for k in range(sides)]

    def inside(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dy, dx = r - cy, c - cx
        ok = torch.ones_like(r, dtype=torch.bool)
        for a in angles:
            ok &= dx * math.cos(a) + dy * math.sin(a) <= apothem
        return ok

    return inside


def rounded_rect_sdf(top: float, left: float, height: float, width: float, radius: float):
    """Signed distance (negative inside) to a rectangle with rounded corners of ``radius``."""
    cy, cx = top + height / 2, left + width / 2
    hy, hx = height / 2 - radius, width / 2 - radius

    def sdf(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        qy, qx = (r - cy).abs() - hy, (c - cx).abs() - hx
        outside = torch.sqrt(qy.clamp_min(0) ** 2 + qx.clamp_min(0) ** 2)
        return outside + torch.minimum(torch.maximum(qy, qx), torch.zeros_like(qy)) - radius

    return sdf


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_color(name: str, color: float | Sequence[float], channels: int) -> torch.Tensor:
    """One value or ``channels`` values in [0, 1] (three on a one-channel dataset: their luma) as
    ``(C, 1, 1)``."""
    msg = f"{name}: color must be one value or {channels} values in [0, 1], got {color!r}"
    check(_is_num(color) or (isinstance(color, (list, tuple)) and len(color) > 0 and all(map(_is_num, color))), msg)
    vals = [float(color)] * channels if _is_num(color) else [float(v) for v in color]  # type: ignore[union-attr]
    if channels == 1 and len(vals) == 3:
        vals = [0.299 * vals[0] + 0.587 * vals[1] + 0.114 * vals[2]]
    col = torch.tensor(vals, dtype=torch.float32)
    check(col.numel() == channels and bool(((col >= 0) & (col <= 1)).all()), msg)
    return col.view(channels, 1, 1)


def place(name: str, position: str | Sequence[float], box_h: float, box_w: float, h: int, w: int,
          margin: int) -> tuple[float, float]:
    """Top-left corner of a ``box_h x box_w`` bounding box at ``position`` in an ``h x w`` image."""
    check(isinstance(margin, int) and not isinstance(margin, bool) and margin >= 0,
          f"{name}: margin must be an integer >= 0, got {margin!r}")
    if isinstance(position, str):
        check(position in POSITIONS,
              f"{name}: position must be one of {', '.join(POSITIONS)} or [row, col], got {position!r}")
        if position == "center":
            top, left = (h - box_h) / 2, (w - box_w) / 2
        else:
            top = margin if position.startswith("top") else h - box_h - margin
            left = margin if position.endswith("left") else w - box_w - margin
    else:
        check(isinstance(position, (list, tuple)) and len(position) == 2 and all(map(_is_num, position)),
              f"{name}: position must be one of {', '.join(POSITIONS)} or [row, col] numbers, got {position!r}")
        top, left = float(position[0]), float(position[1])
    eps = 1e-9
    check(-eps <= top <= h - box_h + eps and -eps <= left <= w - box_w + eps,
          f"{name}: a {box_h:g}x{box_w:g} shape at ({top:g}, {left:g}) does not fit a {h}x{w} image")
    return top, left


class _Stamp(Attack):
    """A fixed image ``fill`` alpha-composited through ``alpha`` ((1, H, W) in [0, 1])."""

    fill: torch.Tensor
    alpha: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.to(x)
        return (1 - a) * x + a * self.fill.to(x)


class PolygonTrigger(_Stamp):
    """A filled, anti-aliased regular polygon (TrojAI's polygon trigger; module docstring)."""

    name = "polygon"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 sides: int = 6, size: float = 0.25, rotation: float = 0.0,
                 position: str | Sequence[float] = "center", margin: int = 1, fill: str = "solid",
                 color: float | Sequence[float] = (0.0, 1.0, 0.0), texture_seed: int = 0,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        h = w = info.size
        check(isinstance(sides, int) and not isinstance(sides, bool) and 3 <= sides <= 64,
              f"polygon: sides must be an integer in [3, 64], got {sides!r}")
        check(_is_num(size) and 0 < size <= 1, f"polygon: size must be in (0, 1] (a fraction of the image side), "
                                               f"got {size!r}")
        check(_is_num(rotation), f"polygon: rotation must be a number of degrees, got {rotation!r}")
        check(fill in FILLS, f"polygon: fill must be one of {', '.join(FILLS)}, got {fill!r}")
        check(isinstance(texture_seed, int) and not isinstance(texture_seed, bool) and 0 <= texture_seed < 2**63,
              f"polygon: texture_seed must be an integer in [0, 2**63), got {texture_seed!r}")
        d = size * min(h, w)  # circumscribed diameter in pixels
        top, left = place("polygon", position, d, d, h, w, margin)
        col = parse_color("polygon", color, info.channels)
        self.sides, self.size, self.rotation, self.fill_kind = sides, float(size), float(rotation), fill
        self.alpha = coverage(polygon_inside(top + d / 2, left + d / 2, d / 2, sides, rotation), h, w)\
            .float().unsqueeze(0)
        if fill == "solid":
            self.fill = col.expand(info.channels, h, w).clone()
        else:
            g = torch.Generator().manual_seed(int(texture_seed))
            self.fill = torch.rand(info.channels, h, w, generator=g)


class ObjectTrigger(_Stamp):
    """A yellow pad: an anti-aliased rounded rectangle with a rim and a shade (module docstring)."""

    name = "object"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 size: float = 0.3, aspect: float = 1.0, radius: float = 0.2,
                 position: str | Sequence[float] = "center", margin: int = 1,
                 color: float | Sequence[float] = (1.0, 0.86, 0.15), rim: float = 0.3,
                 shade: float = 0.15, sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        h = w = info.size
        check(_is_num(size) and 0 < size <= 1, f"object: size must be in (0, 1] (the pad's width over the image "
                                               f"side), got {size!r}")
        check(_is_num(aspect) and aspect > 0, f"object: aspect (height over width) must be > 0, got {aspect!r}")
        check(_is_num(radius) and 0 <= radius <= 0.5,
              f"object: radius must be in [0, 0.5] (a fraction of the pad's short side), got {radius!r}")
        check(_is_num(rim) and 0 <= rim <= 1,
              f"object: rim (how much darker the rim is) must be in [0, 1], got {rim!r}")
        check(_is_num(shade) and 0 <= shade <= 1, f"object: shade must be in [0, 1], got {shade!r}")
        pw = size * w
        ph = pw * aspect
        check(ph <= h, f"object: a pad {pw:g} px wide with aspect {aspect:g} is {ph:g} px high, more than the "
                       f"image's {h}")
        top, left = place("object", position, ph, pw, h, w, margin)
        col = parse_color("object", color, info.channels)
        sdf = rounded_rect_sdf(top, left, ph, pw, radius * min(ph, pw))
        self.alpha = coverage(lambda r, c: sdf(r, c) <= 0, h, w).float().unsqueeze(0)
        # the rim: the pad's outer pixel (area within 1 px of its edge), anti-aliased the same way
        ring = coverage(lambda r, c: (sdf(r, c) <= 0) & (sdf(r, c) > -1.0), h, w).float()
        rim_share = torch.where(self.alpha[0] > 0, ring / self.alpha[0].clamp_min(1e-12), torch.zeros_like(ring))
        rows = (torch.arange(h, dtype=torch.float32) + 0.5 - top) / ph
        cols = (torch.arange(w, dtype=torch.float32) + 0.5 - left) / pw
        t = ((rows[:, None] + cols[None, :]) / 2).clamp(0, 1)  # 0 at the top-left, 1 at the bottom-right
        light = (1 - shade * t) * (1 - rim * rim_share)
        self.size, self.aspect = float(size), float(aspect)
        self.fill = (col * light.unsqueeze(0)).clamp(0, 1)
