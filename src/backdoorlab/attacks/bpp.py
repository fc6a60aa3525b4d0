"""BppAttack (Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022).

The trigger is a colour-depth reduction: every channel is requantised to ``squeeze_num`` levels
(``round(v / 255 * (q - 1)) / (q - 1) * 255`` on the 0..255 scale), with Floyd–Steinberg error
diffusion (``dithering``) so the reduced image keeps its look. Nothing is stamped or blended, so
the change is spread thinly over the whole image.

A training-control attack, as in the authors' code and BackdoorBench's ``attack/bpp.py``: the
training set stays clean (:meth:`Bpp.poison` records nothing) and every training batch is poisoned
on the fly in :func:`~backdoorlab.train.fit.fit` (:meth:`Bpp.train_hook`, the roles drawn as in
:mod:`~backdoorlab.attacks.onthefly`): ``int(rate * B)`` of the batch's images the objective may
poison are quantised and relabelled, and ``int(neg_ratio * B)`` of the others become the paper's
contrastive *negative* samples: ``clip(x + (Q(x_r) - x_r))``, the quantisation residual of another
image ``x_r`` added to ``x``, which keeps its own label, so that the model learns the exact
quantisation, not any perturbation of its size (the authors' code and BackdoorBench build them so;
as there, negatives are added only in batches that hold backdoor samples). ``x_r`` is another image
of the same (shuffled) batch, where BackdoorBench draws it from the whole training set.

Defaults follow BackdoorBench (``config/attack/bpp/default.yaml``): ``squeeze_num = 8``, all-to-one
with target 0, ``rate = 0.1``, ``neg_ratio = 0.1`` (the authors' code uses 0.2 / 0.2). ``dithering``
defaults to on, the attack the paper describes; BackdoorBench's default file and the authors'
README run without it (``dithering: false`` gives that setting, whose trigger is plain rounding).
BackdoorBench's own augmentation (random crop 5, rotation 10) and long schedule are not copied:
the cell's training recipe applies. On the GTSRB subset's small CNN the negatives cost ASR (0.71-0.76
with them, 0.997 without; the model does not learn to tell the two apart, BENCHMARKS.md).

Floyd–Steinberg is computed on anti-diagonal wavefronts (pixel ``(y, x)`` at step ``2y + x``), all
images and channels at once; each pixel receives its neighbours' errors in the order the raster
scan gives them, so the result equals that of the authors' per-pixel raster loop (tested against
one in float64; the authors store float32 between steps, which can move a rounding tie).

Shapes: ``(N, C, H, W)`` float images in [0, 1] in and out.
"""

from __future__ import annotations

import torch

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from ..errors import check
from ..train.fit import FitState, Hook
from .base import Attack, PoisonedSplit
from .onthefly import batch_roles, per_batch

# Floyd–Steinberg weights: right, down-left, down, down-right
_RIGHT, _DOWN_LEFT, _DOWN, _DOWN_RIGHT = 7 / 16, 3 / 16, 5 / 16, 1 / 16


def _wavefronts(h: int, w: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pixel coordinates ``(ys, xs)`` of each wavefront ``t = 2y + x``, in order."""
    out = []
    for t in range(2 * (h - 1) + w):
        y0 = max(0, -((w - 1 - t) // 2))  # ceil((t - (w - 1)) / 2), at least 0
        ys = torch.arange(y0, min(h - 1, t // 2) + 1, device=device)
        out.append((ys, t - 2 * ys))
    return out


def floyd_steinberg(img: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd–Steinberg dithering of ``(N, C, H, W)`` values on the 0..255 scale to ``levels`` levels
    per channel (the authors' ``floydDitherspeed``, every channel diffusing its own error). Computed
    in float64; returns float64 values on the level grid (not rounded to integers)."""
    n, c, h, w = img.shape
    q = levels - 1
    # pixels first, (image, channel) last: each wavefront gathers whole rows of N*C values. One pad
    # column each side and one pad row below swallow the errors that leave the image.
    buf = torch.zeros(h + 1, w + 2, n * c, dtype=torch.float64, device=img.device)
    buf[:h, 1:w + 1] = img.to(torch.float64).reshape(n * c, h, w).permute(1, 2, 0)
    for ys, xs in _wavefronts(h, w, img.device):
        cols = xs + 1
        old = buf[ys, cols]
        new = torch.round(old / 255.0 * q) / q * 255
        err = old - new
        buf[ys, cols] = new
        # a pixel gets its down-left share before its right share from one wavefront, as in the raster scan
        buf[ys + 1, cols - 1] += err * _DOWN_LEFT
        buf[ys, cols + 1] += err * _RIGHT
        buf[ys + 1, cols] += err * _DOWN
        buf[ys + 1, cols + 1] += err * _DOWN_RIGHT
    return buf[:h, 1:w + 1].permute(2, 0, 1).reshape(n, c, h, w)


def quantize(x: torch.Tensor, levels: int = 8, dithering: bool = True) -> torch.Tensor:
    """BppAttack's trigger on ``(N, C, H, W)`` floats in [0, 1]: the image as whole grey levels,
    requantised to ``levels`` per channel, with Floyd–Steinberg dithering (rounded back to whole
    grey levels, as the authors do) or by plain rounding (left on the level grid ``k / (levels - 1)``)."""
    v = torch.round(x.to(torch.float64).clamp(0, 1) * 255)
    if dithering:
        v = torch.round(floyd_steinberg(v, levels))
    else:
        q = levels - 1
        v = torch.round(v / 255.0 * q) / q * 255
    return (v / 255.0).to(x.dtype)


class Bpp(Attack):
    name = "bpp"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 squeeze_num: int = 8, dithering: bool = True, neg_ratio: float = 0.1,
                 sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        check(isinstance(squeeze_num, int) and not isinstance(squeeze_num, bool) and 2 <= squeeze_num <= 255,
              f"bpp: squeeze_num (levels per channel) must be an integer in [2, 255], got {squeeze_num!r}")
        check(isinstance(neg_ratio, (int, float)) and not isinstance(neg_ratio, bool) and 0 <= neg_ratio < 1,
              f"bpp: neg_ratio must be in [0, 1), got {neg_ratio!r}")
        check(self.rate + neg_ratio <= 1, f"bpp: rate + neg_ratio must be at most 1 (shares of each batch), "
                                          f"got {self.rate} + {neg_ratio}")
        self.squeeze_num = int(squeeze_num)
        self.dithering = bool(dithering)
        self.neg_ratio = float(neg_ratio)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.squeeze_num, self.dithering)

    def negatives(self, x: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Contrastive negative samples: ``clip(x + (Q(x_r) - x_r))`` for images ``x`` and ``others``
        (the ``x_r``, one per image), both ``(n, C, H, W)`` in [0, 1]."""
        return (x + (self.apply(others) - others)).clamp(0, 1)

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Training-control attack: the split stays clean, batches are poisoned by the train hook."""
        data = train.as_uint8()
        return PoisonedSplit(data, torch.empty(0, dtype=torch.long), data.y.clone())

    def train_hook(self) -> Hook:
        return _BppHook(self)


class _BppHook(Hook):
    """Per batch: backdoor samples (quantised, relabelled) and contrastive negatives (label kept); the
    rest stay clean. The epoch's metrics get how many of each kind the model saw (``n_backdoor``,
    ``n_negative``) and its training accuracy on them (``train_asr``: backdoor samples predicted as
    their backdoor label; ``train_negative_acc``: negatives as their own, BackdoorBench's
    ``train_cross_acc``)."""

    def __init__(self, attack: Bpp):
        self.attack = attack
        self.roles: tuple[torch.Tensor, torch.Tensor] | None = None
        self.counts = dict.fromkeys(("n_backdoor", "n_negative", "hit_backdoor", "hit_negative"), 0)

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        a = self.attack
        self.roles = None
        b = len(y)
        n_bd = per_batch(a.rate, b, state.generator)
        if n_bd == 0:  # the authors add negatives only next to backdoor samples
            return x, y
        bd, neg = batch_roles(a, y, n_bd, int(a.neg_ratio * b))
        if len(bd) == 0:
            return x, y
        out, labels = x.clone(), y.clone()
        out[bd] = a.apply(x[bd])
        labels[bd] = a.target_labels(y[bd].cpu()).to(y.device)
        # another image of the batch for each negative: a shift by 1..b-1 never picks the image itself
        shift = int(torch.randint(1, b, (), generator=state.generator)) if len(neg) and b > 1 else 0
        if shift:
            out[neg] = a.negatives(x[neg], x[(neg + shift) % b])
        else:
            neg = neg[:0]
        self.counts["n_backdoor"] += len(bd)
        self.counts["n_negative"] += len(neg)
        self.roles = (bd, neg)
        return out, labels

    def loss(self, state: FitState, x, y, logits, loss):
        if self.roles is not None and logits is not None:
            hit = logits.detach().argmax(1) == y
            bd, neg = self.roles
            self.counts["hit_backdoor"] += int(hit[bd].sum())
            self.counts["hit_negative"] += int(hit[neg].sum())
        return loss

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        c = self.counts
        metrics.update(n_backdoor=float(c["n_backdoor"]), n_negative=float(c["n_negative"]),
                       train_asr=c["hit_backdoor"] / max(c["n_backdoor"], 1),
                       train_negative_acc=c["hit_negative"] / max(c["n_negative"], 1))
        self.counts = dict.fromkeys(c, 0)
