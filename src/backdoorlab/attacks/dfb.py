"""DFB (Ma, Wang, Wang & Meng, "DFB: A Data-Free, Low-Budget, and High-Efficacy Clean-Label
Backdoor Attack", arXiv 2308.09487, 2023; code: github.com/Magic-Ma-tech/DFB).

A clean-label attack whose attacker knows only the target class: no image of any other class of
the victim's training set is read. The trigger is a universal perturbation that *hides* the target
class: a surrogate binary classifier learns "target class vs. anything else" from the attacker's
own images, and the perturbation ``delta`` (``|delta|_inf <= epsilon``) is optimised so that the
surrogate no longer recognises target-class images carrying it. The few poisoned images are
target-class images plus ``train_scale * delta``, with their true label: since the perturbation
removes what makes them look like the target, the victim learns ``delta`` itself as a feature of
the target class. At test time ``test_scale * delta`` (amplified) on an image of any other class
sends it to the target.

Steps as implemented (asset ``dfb-trigger``, :func:`dfb_trigger`; attack :class:`DFB`):

1. *Attacker data.* Positives: the target-class images of the attacker's training split (the
   attacker's knowledge of the target class; see "deviations"). Negatives: ``n_negatives = 2000``
   random training images of *another* dataset (``negatives``; ``auto`` is CIFAR-10, or GTSRB when
   the victim is CIFAR-10), playing the role of the paper's generic Tiny-ImageNet images (all
   100,000 of them there; 2,000 keep the surrogate's training under half a victim training on two
   CPU cores), resized and converted to the victim's image size and channels.
2. *Surrogate* (the paper's "decoder"): a ``surrogate`` model (default ``small-cnn``) with two
   outputs trained with :func:`~backdoorlab.train.fit.fit` on positives (label 1) and negatives
   (label 0), random crop (4 px) and flip, ``surrogate_epochs = 10``, SGD lr 0.1.
3. *Perturbation.* ``delta`` (``(C, H, W)``, start 0) minimises ``CE(s(aug(clip(x + delta))), 0)``
   over the positives (``aug``: the same random crop and flip, applied after the perturbation as
   the paper's ``transform_after``) by ``steps = 300`` signed-gradient steps of ``epsilon / 8`` on
   mini-batches of 128, projected onto ``[-epsilon, epsilon]`` (``epsilon = 8/255``, the paper's
   ``l_inf_r``).
4. *Poisoning* (:meth:`DFB.poison`): ``round(rate * N)`` random target-class images get
   ``clip(x + train_scale * delta, 0, 1)`` and keep their label; ``rate = 0.001`` (the paper's
   0.1% on CIFAR-10: 50 of 50,000), ``train_scale = 2`` (the code's ``times = 2``: 16/255).
5. *Trigger* (:meth:`DFB.apply`): ``clip(x + test_scale * delta, 0, 1)``, ``test_scale = 6`` (the
   code's ``times = 6``: 48/255).

Deviations, on purpose:

* the paper trains a StegaStamp encoder (400 epochs) whose residual for one image (the one whose
  surrogate loss drops most) becomes the fixed trigger, clamped to ``+-2 epsilon`` for poisoning
  and ``+-6 epsilon`` at test time; here the universal ``delta`` is optimised directly under the
  same objective and constraint, and scaled by 2 and 6 (the same where ``delta`` sits at
  ``+-epsilon``, where signed-gradient steps put most of its entries);
* the paper's positives come from outside the victim's data (Tiny-ImageNet frogs for CIFAR-10's
  frog class); the project has no second source of images of the victim's classes, so the
  attacker's target-class images are the victim's target-class training images, and nothing else
  of the training set is read (``tests/attacks/test_dfb.py`` asserts it);
* surrogate: the project's small CNN for 10 epochs instead of a ResNet-18 for 200.

Shapes and ranges: images ``(N, C, H, W)`` float in [0, 1]; ``delta`` ``(C, H, W)`` in
``[-epsilon, epsilon]``. ``apply`` is deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData, from_uint8_nhwc, to_uint8_nhwc
from ..errors import check
from .base import AssetContext, Attack, PoisonedSplit

NEGATIVE_SOURCES = ("cifar10", "gtsrb")


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def negatives_for(victim: str, negatives: str = "auto") -> str:
    """The dataset that supplies the attacker's generic images: ``negatives``, or for ``auto``
    CIFAR-10 (GTSRB when the victim is CIFAR-10)."""
    if negatives == "auto":
        return "gtsrb" if victim == "cifar10" else "cifar10"
    return negatives


class DFB(Attack):
    """Data-free clean-label backdoor. ``epsilon``: L-inf bound of the optimised perturbation;
    ``train_scale`` / ``test_scale``: its amplification in poisoned images / at test time;
    ``negatives`` / ``n_negatives``: the attacker's generic images; ``surrogate`` /
    ``surrogate_epochs``: the target-vs-rest surrogate; ``steps``: perturbation search steps."""

    name = "dfb"
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.001, epsilon: float = 8 / 255,
                 train_scale: float = 2.0, test_scale: float = 6.0, negatives: str = "auto",
                 n_negatives: int = 2000, surrogate: str = "small-cnn", surrogate_epochs: int = 10, steps: int = 300):
        super().__init__(info, target, rate, "clean-label")
        check(_num(epsilon) and 0 < epsilon <= 1, f"dfb: epsilon must be in (0, 1], got {epsilon!r}")
        for key, v in (("train_scale", train_scale), ("test_scale", test_scale)):
            check(_num(v) and v > 0, f"dfb: {key} must be a number > 0, got {v!r}")
        check(negatives == "auto" or negatives in NEGATIVE_SOURCES,
              f"dfb: negatives must be 'auto' or one of {', '.join(NEGATIVE_SOURCES)}, got {negatives!r}")
        neg = negatives_for(info.name, negatives)
        check(neg != info.name, f"dfb: negatives must be another dataset than the victim's ({info.name}); "
                                f"the attack reads none of the victim's non-target images")
        for key, v, lo in (("n_negatives", n_negatives, 1), ("surrogate_epochs", surrogate_epochs, 1),
                           ("steps", steps, 1)):
            check(_int(v) and v >= lo, f"dfb: {key} must be an integer >= {lo}, got {v!r}")
        check(isinstance(surrogate, str) and surrogate != "", f"dfb: surrogate must be a model name, got {surrogate!r}")
        self.epsilon, self.train_scale, self.test_scale = float(epsilon), float(train_scale), float(test_scale)
        self.negatives = neg
        self.spec = {"name": "dfb-trigger", "target": self.target, "negatives": neg, "n_negatives": n_negatives,
                     "epsilon": self.epsilon, "surrogate": surrogate, "surrogate_epochs": surrogate_epochs,
                     "steps": steps}
        self.delta: torch.Tensor | None = None

    def assets(self) -> dict[str, Any]:
        return {"trigger": dict(self.spec)}

    def datasets(self) -> dict[str, str]:
        return {"negatives": self.spec["negatives"]}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        d = assets["trigger"]["delta"]
        c, s = self.info.channels, self.info.size
        if tuple(d.shape) != (c, s, s):
            raise RuntimeError(f"dfb: trigger asset has shape {tuple(d.shape)}, expected {(c, s, s)}")
        self.delta = d.float().clone()

    def files(self) -> dict[str, Path]:
        """The negatives' archive: its content fingerprint enters the run id and cache keys."""
        from ..data.datasets import locate

        path = locate(self.negatives)
        return {} if path is None else {"negatives": path}

    def _delta(self) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError("dfb: the trigger asset is not bound; build the attack through the pipeline "
                               "(Pipeline.attack) or call bind_assets first")
        return self.delta

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.test_scale * self._delta().to(x)).clamp(0, 1)

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """``round(rate * N)`` random target-class images get ``train_scale * delta``, labels kept.
        Only those images' pixels are read (the rest of the split is passed through)."""
        delta = self._delta()
        y = train.y
        cand = torch.nonzero(y == self.target).flatten()
        k = int(round(self.rate * len(train)))
        check(k <= len(cand), f"dfb: rate {self.rate} asks for {k} poisoned images but the training set holds "
                              f"only {len(cand)} images of the target class {self.target}")
        idx = torch.sort(cand[torch.randperm(len(cand), generator=g)[:k]]).values
        chosen = train.subset(idx)
        xs = chosen.float() if not chosen.is_uint8 else from_uint8_nhwc(chosen.x)
        poisoned = to_uint8_nhwc((xs + self.train_scale * delta).clamp(0, 1))
        x = train.as_uint8().x.clone()  # a pass-through copy; only x[idx] is replaced
        x[idx] = poisoned
        return PoisonedSplit(TensorData(x, y.clone()), idx, y.clone())


# ------------------------------------------------------------------------------ the trigger
def _negative_images(ctx: AssetContext, name: str, n: int) -> torch.Tensor:
    """``n`` random training images of dataset ``name`` (located as the study locates its own) as
    ``(n, C, H, W)`` float in [0, 1] at the victim's channels and size."""
    info, g = ctx.info, ctx.generator
    data = ctx.load(name).train
    idx = torch.randperm(len(data), generator=g)[:n]
    x = data.subset(idx).float()
    if x.shape[1] != info.channels:
        x = x.mean(1, keepdim=True) if info.channels == 1 else x.expand(-1, info.channels, -1, -1)
    if x.shape[-1] != info.size:
        x = F.interpolate(x, size=(info.size, info.size), mode="bilinear", align_corners=False,
                          antialias=True).clamp(0, 1)
    return x.contiguous()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    from ..train.augment import random_crop, random_hflip

    return random_hflip(random_crop(x, 4, g), g)


def dfb_trigger(ctx: AssetContext, target: int = 0, negatives: str = "cifar10", n_negatives: int = 2000,
                epsilon: float = 8 / 255, surrogate: str = "small-cnn", surrogate_epochs: int = 10,
                steps: int = 300, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Asset builder ``dfb-trigger``: the surrogate and the universal perturbation (module
    docstring, steps 1-3). Reads only the target-class images of ``ctx.train`` (by index, after
    looking at the labels). Returns ``delta`` ``(C, H, W)`` in [-epsilon, epsilon],
    ``surrogate_acc`` (on its training data), ``hidden`` (share of the positives the surrogate
    no longer calls target-class with ``delta``; before: ``hidden_clean``) and ``n_positives``."""
    from ..models import build_model
    from ..train.fit import TrainConfig, fit, predict

    info = ctx.info
    check(_int(target) and 0 <= target < info.num_classes,
          f"dfb: target must be a class label in [0, {info.num_classes - 1}], got {target!r}")
    pos_idx = torch.nonzero(ctx.train.y == target).flatten()
    check(len(pos_idx) > 0, f"dfb: the training split has no image of the target class {target}")
    pos = ctx.train.subset(pos_idx).float()  # the only pixels of the training split read
    neg = _negative_images(ctx, negatives, n_negatives)
    data = TensorData(torch.cat([pos, neg]),
                      torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)]))
    with torch.random.fork_rng(devices=[]):  # the surrogate's initial weights from ctx.generator only
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        model = build_model(surrogate, 2, info.channels, info.mean, info.std)
    cfg = TrainConfig(epochs=surrogate_epochs, batch_size=batch_size, lr=0.1, crop_pad=4, hflip=True)
    s = fit(model, data, cfg, generator=ctx.generator, device=ctx.device, progress=False).model.eval()
    for p in s.parameters():
        p.requires_grad_(False)
    acc = float((predict(s, data.x, device=ctx.device) == data.y).float().mean())

    dev = ctx.device
    x_pos = pos.to(dev)
    delta = torch.zeros(x_pos.shape[1:], device=dev)
    other = torch.zeros(min(batch_size, len(x_pos)), dtype=torch.long, device=dev)
    step = epsilon / 8
    for _ in range(steps):
        b = torch.randperm(len(x_pos), generator=ctx.generator)[:batch_size].to(dev)
        d = delta.clone().requires_grad_(True)
        xb = _augment((x_pos[b] + d).clamp(0, 1), ctx.generator)
        loss = F.cross_entropy(s(xb), other[:len(b)])
        (grad,) = torch.autograd.grad(loss, d)
        delta = (delta - step * grad.sign()).clamp(-epsilon, epsilon)
    with torch.no_grad():
        hidden = float((predict(s, (x_pos + delta).clamp(0, 1), device=dev) == 0).float().mean())
        hidden_clean = float((predict(s, x_pos, device=dev) == 0).float().mean())
    return {"delta": delta.detach().cpu(), "surrogate_acc": torch.tensor(acc), "hidden": torch.tensor(hidden),
            "hidden_clean": torch.tensor(hidden_clean), "n_positives": torch.tensor(len(pos))}

