"""WaNet (Nguyen & Tran, "WaNet – Imperceptible Warping-based Backdoor Attack", ICLR 2021).

The trigger is a fixed, smooth warping of the image: a random ``k x k`` control grid of
displacements in [-1, 1], scaled so that its mean absolute value is 1, upsampled bicubically to
``H x W`` (``align_corners=True``), added to the identity sampling grid with strength ``s``
(``grid = (identity + s * noise / H) * grid_rescale``, clamped to [-1, 1]) and applied with
``grid_sample`` (bilinear, ``align_corners=True``). The field comes from ``grid_seed`` alone: it is
deterministic and not learned (no :meth:`state_dict`).

Training follows the paper's code (and BackdoorBench's ``attack/wanet.py``): the attacker controls
training and poisons each batch on the fly (:mod:`~backdoorlab.attacks.onthefly`): ``int(rate *
B)`` samples are warped and relabelled, ``int(cross_ratio * n_bd)`` further samples are warped
with the field plus fresh uniform noise ``U(-1, 1) / H`` per pixel ("noise mode") and keep their
labels, so that the network learns the exact field rather than any warp. ``poison()`` returns the
clean split and records no indices: no training image is poisoned for good.

Defaults are the paper's and BackdoorBench's for CIFAR-10 / GTSRB (32x32): ``k = 4``, ``s = 0.5``,
``grid_rescale = 1``, ``rate`` (``pratio``, rho_a) ``= 0.1``, ``cross_ratio = 2`` (rho_n = 0.2),
all-to-one with target 0. All-to-all relabels ``y -> (y + 1) mod K`` (the base class's mapping;
the paper's released code wrote ``torch.remainder(targets[:num_bd], num_classes)``, which leaves
every label unchanged). Differences from the code: the backdoor samples of a batch are drawn from
the images the objective may poison (all-to-one: not already of the target class, where the code
may pick one and so waste it), and the paper's post-poisoning augmentation (random crop of 5 px,
rotation of 10 degrees) is not reproduced: ``fit``'s own augmentation, applied before the hook,
stands in for it.

Shapes: ``apply`` takes and returns ``(N, C, H, W)`` float in [0, 1] (bilinear interpolation of
[0, 1] values stays in [0, 1]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from ..errors import check
from ..train.fit import FitState, Hook
from .base import Attack, PoisonedSplit
from .onthefly import batch_roles, per_batch


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def warping_field(size: int, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                  seed: int = 0) -> torch.Tensor:
    """WaNet's backdoor sampling grid ``(1, size, size, 2)`` in [-1, 1] (``grid_sample``'s
    ``(x, y)`` order), from a ``k x k`` random control grid drawn with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()  # mean |displacement| of the control points: 1
    noise = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    a = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    identity = torch.stack((cols, rows), 2)[None]
    return ((identity + s * noise / size) * grid_rescale).clamp(-1, 1)


class WaNet(Attack):
    """``k``: control grid size; ``s``: warping strength; ``grid_rescale``: the paper's grid scale
    (1: none); ``cross_ratio``: noise-mode samples per backdoor sample; ``grid_seed``: the seed of
    the warping field."""

    name = "wanet"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0,
                 grid_seed: int = 0, sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        check(isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= info.size,
              f"wanet: k must be an integer in [2, {info.size}], got {k!r}")
        check(_is_num(s) and s > 0, f"wanet: s must be a positive number, got {s!r}")
        check(_is_num(grid_rescale) and grid_rescale > 0,
              f"wanet: grid_rescale must be a positive number, got {grid_rescale!r}")
        check(_is_num(cross_ratio) and cross_ratio >= 0,
              f"wanet: cross_ratio must be a number >= 0, got {cross_ratio!r}")
        check(rate * (1 + cross_ratio) <= 1, f"wanet: rate * (1 + cross_ratio) must be at most 1 (backdoor and noise "
                                             f"samples share each batch), got {rate} * (1 + {cross_ratio})")
        check(isinstance(grid_seed, int) and not isinstance(grid_seed, bool) and 0 <= grid_seed < 2**63,
              f"wanet: grid_seed must be an integer in [0, 2**63), got {grid_seed!r}")
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        self.cross_ratio = float(cross_ratio)
        self.grid = warping_field(info.size, self.k, self.s, self.grid_rescale, grid_seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(x).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def apply_noise(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Noise mode: the field plus uniform noise in ``[-1, 1] / H`` per pixel and axis, drawn
        from ``g`` for each image (``(N, C, H, W)`` float in [0, 1])."""
        n, h = len(x), self.info.size
        ins = (torch.rand(n, h, h, 2, generator=g) * 2 - 1).to(x)
        grid = (self.grid.to(x) + ins / h).clamp(-1, 1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Training-control attack: the split stays clean, the hook poisons each batch."""
        data = train.as_uint8()
        return PoisonedSplit(data, torch.empty(0, dtype=torch.long), data.y.clone())

    def train_hook(self) -> Hook:
        return _WaNetHook(self)


class _WaNetHook(Hook):
    """Per batch: backdoor samples (warped, relabelled) and noise-mode samples (warped with noise,
    labels kept); the rest stay clean. The epoch's metrics get how many of each kind the model saw
    (``n_backdoor``, ``n_noise``) and its training accuracy on them (``train_asr``: backdoor
    samples predicted as their backdoor label; ``train_noise_acc``: noise samples as their own)."""

    def __init__(self, attack: WaNet):
        self.attack = attack
        self.roles: tuple[torch.Tensor, torch.Tensor] | None = None
        self.counts = dict.fromkeys(("n_backdoor", "n_noise", "hit_backdoor", "hit_noise"), 0)

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        a = self.attack
        n_bd = per_batch(a.rate, len(y), state.generator)
        bd, cross = batch_roles(a, y, n_bd, int(n_bd * a.cross_ratio))
        x, y = x.clone(), y.clone()
        if len(bd):
            x[bd] = a.apply(x[bd])
            y[bd] = a.target_labels(y[bd])
        if len(cross):
            x[cross] = a.apply_noise(x[cross], state.generator)
        self.counts["n_backdoor"] += len(bd)
        self.counts["n_noise"] += len(cross)
        self.roles = (bd, cross)
        return x, y

    def loss(self, state: FitState, x, y, logits, loss):
        if self.roles is not None and logits is not None:
            hit = logits.detach().argmax(1) == y
            self.counts["hit_backdoor"] += int(hit[self.roles[0]].sum())
            self.counts["hit_noise"] += int(hit[self.roles[1]].sum())
        return loss

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        c = self.counts
        metrics.update(n_backdoor=float(c["n_backdoor"]), n_noise=float(c["n_noise"]),
                       train_asr=c["hit_backdoor"] / max(c["n_backdoor"], 1),
                       train_noise_acc=c["hit_noise"] / max(c["n_noise"], 1))
        self.counts = dict.fromkeys(c, 0)
