"""Refool, the reflection backdoor (Liu, Ma, Bailey & Lu, "Reflection Backdoor: A Natural Backdoor
Attack on Deep Neural Networks", ECCV 2020).

The trigger is a *reflection*: an image from another scene blended into the input the way a
window pane reflects it. A poisoned image is ``x = x_t + x_r (x) k`` with ``x_t`` the image itself
(the transmission layer), ``x_r`` the reflection image and ``k`` a kernel given by one of the
paper's three physical reflection models, drawn per image:

* ``same-depth`` (type I, reflection and scene in the same focal plane): ``k`` the identity;
* ``focal-blur`` (type II, reflection out of focus): ``k`` a Gaussian blur;
* ``ghost`` (type III, the double reflection of a thick pane): ``k`` two shifted pulses.

The blends follow the authors' ``blend_images`` (``scripts/insert_reflection.py``, also used by
BackdoorBench's ``attack/refool.py``), in linear light (both layers raised to the power 2.2, the
result back to 1/2.2, clipped to [0, 1]), with transmission weight ``alpha_t``:

* ``ghost``: ``r_g = ga * r + (1 - ga) * shift(r, (dy, dx))`` cropped and resized back to the image
  size, ``x = alpha_t * t + (1 - alpha_t) * r_g``, with ``dy, dx`` uniform integers in [3, 8] pixels
  and ``ga`` uniform in [0.15, 0.5] or [0.5, 0.85] (even odds);
* ``focal-blur``: ``r_b = blur(r, sigma)``, ``sigma`` uniform in [1, 5] pixels (kernel side
  ``2 ceil(2 sigma) + 1``, mirrored border), each channel of ``r_b`` lowered by ``(m - 1) * att``
  where ``m`` is the mean of ``r_b + t`` over its pixels above 1 (``att`` uniform in [1.08, 1.18]),
  clipped to [0, 1], then ``x = alpha_t * t + r_b * g * (1 - alpha_t / 2)`` with ``g`` the authors'
  centred Gaussian vignette (``gen_kernel(size, 3)``, maximum 1);
* ``same-depth``: ``x = alpha_t * t + (1 - alpha_t) * r`` (the ghost model with no shift; the
  authors' code implements only the other two models, the paper all three).

``alpha_t`` is uniform in [0.55, 0.95] per image (the authors' ``1 - U(0.05, 0.45)``) unless the
``alpha_t`` setting fixes it (BackdoorBench fixes 0.4). Sizes are BackdoorBench's, which applies the
blend at the dataset's 32x32 resolution with the authors' pixel ranges; for other image sizes the
shift and blur ranges scale with ``size / 32``.

Reflection images come from *another dataset* (the asset ``refool-pool``, :func:`refool_pool`):
``pool_size = 200`` random training images of ``reflections`` (CIFAR-10 for GTSRB and every other
victim, GTSRB for CIFAR-10 victims), resized to the victim's size (and to grey for grey victims).
The paper (and BackdoorBench, which ships the authors' 200 selected images) draws reflections from
PASCAL VOC and *selects* the 200 most effective ones (``R_adv``) by repeatedly training models on
candidate reflections; that selection is not run here (it costs many trainings): the pool is a
random draw, a deviation. The asset's spec records the dataset's name; its output records the
drawn indices and the dataset's content fingerprint.

Poisoning: each poisoned image gets a reflection drawn from the pool, a reflection model drawn
from ``kinds`` and the model's parameters, all drawn with the poison generator. The default
objective is the paper's **clean-label** one (target-class images keep their label; BackdoorBench's
default is dirty-label all-to-one with ``alpha_t = 0.4``, because its authors found clean-label
Refool's ASR too low and unstable: pass ``mode: all-to-one, alpha_t: 0.4`` for that variant). Every
objective is supported. Measured on the GTSRB 6k subset (small CNN, the tests' recipe, seed 0):
clean-label, target 1, rate 0.06 (342 images): ASR 0.438 with the authors' random ``alpha_t``,
0.741 with ``alpha_t = 0.4`` (CA 0.961 / 0.966); BackdoorBench's variant (all-to-one, target 0,
rate 0.1, ``alpha_t = 0.4``): ASR 0.882, CA 0.948. ``rate = 0.1`` counts over the whole training set (BackdoorBench's
convention); a clean-label rate cannot exceed the target class's share (6.6% for class 1 of the
GTSRB 6k subset).

Test time (:meth:`Refool.apply`, deterministic): a fixed set of ``test_reflections = 10``
reflections, the first images of the pool, each with a reflection model and parameters drawn once
from a generator seeded with ``test_seed``; an image's reflection is chosen by a hash of its pixels,
so the same image always gets the same reflection, whatever batch it comes in.

Shapes: ``apply`` takes and returns ``(N, C, H, W)`` float in [0, 1]; the pool is ``(n, H, W, C)``
uint8.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.datasets import DATASETS, DatasetInfo
from ..data.tensordata import TensorData, from_uint8_nhwc, to_uint8_nhwc
from ..errors import check
from .base import AssetContext, Attack, PoisonedSplit

KINDS = ("same-depth", "focal-blur", "ghost")
GAMMA = 2.2
ALPHA_T = (0.55, 0.95)  # the authors' alpha_t = 1 - U(0.05, 0.45)
SIGMA = (1.0, 5.0)  # focal blur sigma, pixels at 32x32
SHIFT = (3, 8)  # ghost shift, pixels at 32x32 (inclusive)
ATT = (1.08, 1.18)  # focal blur range correction
GHOST_ALPHA = (0.15, 0.5)


def default_reflections(info: DatasetInfo) -> str:
    """Where reflections come from by default: another dataset than the victim's."""
    return "gtsrb" if info.name == "cifar10" else "cifar10"


# ------------------------------------------------------------------------------- blending
def _reflect_index(n: int, pad: int) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on both sides, mirrored without repeating
    the edge (OpenCV's BORDER_REFLECT_101), for any ``pad``."""
    i = torch.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


def gaussian_blur(r: torch.Tensor, sigma: float) -> torch.Tensor:
    """OpenCV's ``GaussianBlur(r, (k, k), sigma)`` with ``k = 2 ceil(2 sigma) + 1`` on ``(C, H, W)``."""
    k = int(2 * math.ceil(2 * sigma) + 1)
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-t ** 2 / (2 * sigma ** 2))
    w = (w / w.sum()).to(r)
    p = k // 2
    c, h, wd = r.shape
    x = r[:, _reflect_index(h, p)][:, :, _reflect_index(wd, p)].unsqueeze(0)
    x = F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    x = F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return x[0]


@functools.lru_cache(maxsize=8)
def vignette(size: int, nsig: float = 3.0) -> torch.Tensor:
    """The authors' ``gen_kernel(size, nsig)``: a ``(size, size)`` Gaussian bump, maximum 1."""
    interval = (2 * nsig + 1.0) / size
    x = torch.linspace(-nsig - interval / 2, nsig + interval / 2, size + 1, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    k1 = cdf[1:] - cdf[:-1]
    k = torch.sqrt(torch.outer(k1, k1))
    k = k / k.sum()
    return (k / k.max()).float()


def blend(t: torch.Tensor, r: torch.Tensor, kind: str, alpha_t: float, sigma: float, att: float,
          shift: tuple[int, int], ghost_alpha: float) -> torch.Tensor:
    """One image ``t`` ``(C, H, W)`` in [0, 1] seen through a pane reflecting ``r`` (same shape) with
    reflection model ``kind`` (see the module docstring); returns ``(C, H, W)`` in [0, 1]."""
    c, h, w = t.shape
    tl, rl = t.clamp(0, 1) ** GAMMA, r.clamp(0, 1) ** GAMMA
    if kind == "focal-blur":
        rb = gaussian_blur(rl, sigma)
        total = rb + tl
        over = total > 1
        mean = ((total * over).flatten(1).sum(1) / (over.flatten(1).sum(1) + 1e-6)).clamp(min=1.0)
        rb = (rb - ((mean - 1) * att).view(c, 1, 1)).clamp(0, 1)
        mask = vignette(max(h, w))[:h, :w].to(t) * (1 - alpha_t / 2)  # cached: never modified in place
        out = rb * mask + tl * alpha_t
    else:
        if kind == "ghost":
            dy, dx = shift
            r1 = F.pad(rl, (0, dx, 0, dy))  # the reflection and its shifted ghost
            r2 = F.pad(rl, (dx, 0, dy, 0))
            g = (r1 * ghost_alpha + r2 * (1 - ghost_alpha))[:, dy:h, dx:w]
            rl = F.interpolate(g.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0]
        out = rl * (1 - alpha_t) + tl * alpha_t
    return out.clamp(min=0).pow(1 / GAMMA).clamp(0, 1)


def draw_params(n: int, kinds: tuple[str, ...], pool: int, size: int, alpha_t: float | None,
                g: torch.Generator) -> list[dict[str, Any]]:
    """``n`` reflection draws (pool index, model and its parameters), all from ``g`` in a fixed order."""
    scale = size / 32
    lo, hi = max(1, round(SHIFT[0] * scale)), max(1, round(SHIFT[1] * scale))
    hi = min(hi, size - 1) if size > 1 else 0
    lo = min(lo, hi)
    kind = torch.randint(len(kinds), (n,), generator=g)
    ref = torch.randint(pool, (n,), generator=g)
    a = torch.rand(n, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    at = torch.rand(n, generator=g, dtype=torch.float64)
    sh = torch.randint(lo, hi + 1, (n, 2), generator=g)
    gs = torch.rand(n, generator=g)
    ga = torch.rand(n, generator=g, dtype=torch.float64)
    out = []
    for i in range(n):
        ghost = GHOST_ALPHA[0] + float(ga[i]) * (GHOST_ALPHA[1] - GHOST_ALPHA[0])
        out.append({
            "kind": kinds[int(kind[i])], "ref": int(ref[i]),
            "alpha_t": float(alpha_t) if alpha_t is not None else ALPHA_T[0] + float(a[i]) * (ALPHA_T[1] - ALPHA_T[0]),
            "sigma": (SIGMA[0] + float(s[i]) * (SIGMA[1] - SIGMA[0])) * scale,
            "att": ATT[0] + float(at[i]) * (ATT[1] - ATT[0]),
            "shift": (int(sh[i, 0]), int(sh[i, 1])),
            "ghost_alpha": ghost if bool(gs[i] < 0.5) else 1 - ghost,
        })
    return out


# ------------------------------------------------------------------------------- the asset
def _to_victim(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 NHWC images of another dataset as the victim's ``channels`` and ``size`` (uint8 NHWC)."""
    f = from_uint8_nhwc(x)
    if f.shape[-1] != size:
        f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if f.shape[1] != channels:
        if channels == 1:
            wts = torch.tensor([0.299, 0.587, 0.114]) if f.shape[1] == 3 else torch.full((f.shape[1],), 1 / f.shape[1])
            f = (f * wts.view(1, -1, 1, 1)).sum(1, keepdim=True)
        else:
            f = f.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return to_uint8_nhwc(f)


def refool_pool(ctx: AssetContext, dataset: str = "cifar10", size: int = 200) -> dict[str, torch.Tensor]:
    """Asset builder ``refool-pool``: ``size`` random training images of ``dataset`` (drawn with the
    asset's generator), as the victim's channels and image size. Returns ``images`` (uint8 NHWC),
    ``source_index`` (their indices in ``dataset``'s training split) and ``source_fingerprint`` (the
    content fingerprint of the files read, as ASCII codes; empty for a built-in dataset).

    ``dataset`` is located as the study locates its own (``--data``, ``BACKDOORLAB_DATA``, then
    ``$BACKDOORLAB_HOME/data``; :meth:`AssetContext.load`), and its content fingerprint is part of
    the cell's run id (:meth:`Refool.datasets`)."""
    check(isinstance(dataset, str) and dataset in DATASETS,
          f"refool: reflections must be a dataset name ({', '.join(DATASETS.names())}), got {dataset!r}")
    check(isinstance(size, int) and not isinstance(size, bool) and size >= 1,
          f"refool: pool_size must be an integer >= 1, got {size!r}")
    bundle = ctx.load(dataset)
    n = len(bundle.train)
    check(size <= n, f"refool: pool_size {size} exceeds the {n} training images of {dataset}")
    idx = torch.randperm(n, generator=ctx.generator)[:size]
    images = _to_victim(bundle.train.as_uint8().x[idx], ctx.info.channels, ctx.info.size)
    fp = (bundle.fingerprint or "").encode("ascii", "replace")
    return {"images": images, "source_index": idx, "source_fingerprint": torch.tensor(list(fp), dtype=torch.uint8)}


# ------------------------------------------------------------------------------- the attack
class Refool(Attack):
    """Reflection triggers from another dataset's images (see the module docstring)."""

    name = "refool"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "clean-label",
                 reflections: str | None = None, pool_size: int = 200,
                 kinds: list[str] = ["same-depth", "focal-blur", "ghost"],  # noqa: B006 - the registry copies it
                 alpha_t: float | None = None, test_reflections: int = 10, test_seed: int = 0,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        reflections = default_reflections(info) if reflections is None else reflections
        check(isinstance(reflections, str) and reflections in DATASETS,
              f"refool: reflections must be a dataset name ({', '.join(DATASETS.names())}), got {reflections!r}")
        check(isinstance(pool_size, int) and not isinstance(pool_size, bool) and pool_size >= 1,
              f"refool: pool_size must be an integer >= 1, got {pool_size!r}")
        check(isinstance(kinds, (list, tuple)) and len(kinds) > 0 and all(k in KINDS for k in kinds)
              and len(set(kinds)) == len(kinds),
              f"refool: kinds must be a non-empty list of distinct reflection models from {', '.join(KINDS)}, "
              f"got {kinds!r}")
        check(alpha_t is None or (isinstance(alpha_t, (int, float)) and not isinstance(alpha_t, bool)
                                  and 0 < alpha_t < 1),
              f"refool: alpha_t must be null (random per image) or a number in (0, 1), got {alpha_t!r}")
        check(isinstance(test_reflections, int) and not isinstance(test_reflections, bool)
              and 1 <= test_reflections <= pool_size,
              f"refool: test_reflections must be an integer in [1, pool_size = {pool_size}], got {test_reflections!r}")
        check(isinstance(test_seed, int) and not isinstance(test_seed, bool) and 0 <= test_seed < 2**63,
              f"refool: test_seed must be an integer in [0, 2**63), got {test_seed!r}")
        self.reflections = reflections
        self.pool_size = pool_size
        self.kinds = tuple(kinds)
        self.alpha_t = None if alpha_t is None else float(alpha_t)
        self.n_test = test_reflections
        # the fixed test-time reflections: pool images 0 .. n_test - 1, one drawn model each
        self.test_params = draw_params(test_reflections, self.kinds, 1, info.size, self.alpha_t,
                                       torch.Generator().manual_seed(int(test_seed)))
        for i, p in enumerate(self.test_params):
            p["ref"] = i
        self.pool: torch.Tensor | None = None

    def assets(self) -> dict[str, Any]:
        return {"pool": {"name": "refool-pool", "dataset": self.reflections, "size": self.pool_size}}

    def datasets(self) -> dict[str, str]:
        return {"reflections": self.reflections}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        images = assets["pool"]["images"]
        c, s = self.info.channels, self.info.size
        if tuple(images.shape) != (self.pool_size, s, s, c):
            raise RuntimeError(f"refool: pool asset has shape {tuple(images.shape)}, expected "
                               f"{(self.pool_size, s, s, c)}")
        self.pool = from_uint8_nhwc(images)

    def _need_pool(self) -> torch.Tensor:
        if self.pool is None:
            raise RuntimeError("refool: the 'refool-pool' asset is not bound; build the attack through the "
                               "pipeline (Pipeline.attack) or call bind_assets first")
        return self.pool

    @staticmethod
    def _blend_all(x: torch.Tensor, pool: torch.Tensor, params: list[dict[str, Any]]) -> torch.Tensor:
        out = torch.empty_like(x)
        for i, p in enumerate(params):
            out[i] = blend(x[i], pool[p["ref"]].to(x), p["kind"], p["alpha_t"], p["sigma"], p["att"], p["shift"],
                           p["ghost_alpha"])
        return out

    def test_choice(self, x: torch.Tensor) -> torch.Tensor:
        """Which test reflection each image gets: a hash of its pixels (as 0..255 grey levels)."""
        q = x.clamp(0, 1).mul(255).round().to(torch.int64).flatten(1)
        w = torch.arange(q.shape[1], dtype=torch.int64) % 251 + 1
        return (q * w).sum(1) % self.n_test

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pool = self._need_pool()
        choice = self.test_choice(x).tolist()
        return self._blend_all(x, pool, [self.test_params[j] for j in choice])

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Like :meth:`Attack.poison` (the same draw of ``round(rate * N)`` images), but each poisoned
        image gets its own reflection, reflection model and parameters, drawn with ``g``."""
        pool = self._need_pool()
        data = train.as_uint8()
        cand = self.candidates(data.y)
        k = int(round(self.rate * len(data)))
        check(k <= len(cand), f"{self.name}: rate {self.rate} asks for {k} poisoned images but only "
                              f"{len(cand)} training images can be poisoned")
        idx = torch.sort(cand[torch.randperm(len(cand), generator=g)[:k]]).values
        x = data.x.clone()
        y = data.y.clone()
        if k:
            params = draw_params(k, self.kinds, self.pool_size, self.info.size, self.alpha_t, g)
            x[idx] = to_uint8_nhwc(self._blend_all(from_uint8_nhwc(x[idx]), pool, params))
            y[idx] = self.target_labels(data.y[idx])
        return PoisonedSplit(TensorData(x, y), idx, data.y.clone())
