"""ONE training loop (house rule 3) and ONE evaluation, customised by hooks.

``fit`` keeps the whole training set as one tensor on the device, draws batches with a seeded
generator, augments each batch in one shot (random crop, optional flip and colour jitter), and
trains with SGD + Nesterov under a one-cycle or cosine schedule, in ``channels_last``. On CPU,
the same seed gives bit-identical weights.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OMIT_DEFAULT, check_fields
from ..data.tensordata import TensorData
from ..errors import check
from ..utils import resolve_device, tune_cpu_allocator
from .augment import color_jitter, random_crop, random_hflip


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (defaults suit the small CNN on 32x32 data).

    ``schedule``: ``"onecycle"`` (linear warm-up over ``warmup`` of the steps to ``lr``, then
    linear decay to 0) or ``"cosine"`` (cosine decay from ``lr`` to 0).
    ``crop_pad`` / ``hflip``: ``None`` takes the dataset's default.
    ``brightness`` / ``contrast``: colour-jitter strengths with torchvision ``ColorJitter``
    semantics (factor uniform in ``[max(0, 1 - s), 1 + s]``; 0 is off, the default), applied per
    image after crop and flip. A setting added later: it enters cache keys and run ids only
    when on (``config.OMIT_DEFAULT``).
    """

    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2
    label_smoothing: float = 0.0
    augment: bool = True
    crop_pad: int | None = None
    hflip: bool | None = None
    channels_last: bool = True
    brightness: float = field(default=0.0, metadata=OMIT_DEFAULT)
    contrast: float = field(default=0.0, metadata=OMIT_DEFAULT)

    def validate(self) -> None:
        """One-line errors for a wrong type or an out-of-range value (before any training)."""
        _integer("epochs", self.epochs, 1, " (0 epochs would score an untrained model)")
        _integer("batch_size", self.batch_size, 1)
        _number("lr", self.lr, 0, None, lo_open=True)
        _number("momentum", self.momentum, 0, 1)
        _number("weight_decay", self.weight_decay, 0, None)
        _number("warmup", self.warmup, 0, 1)
        _number("label_smoothing", self.label_smoothing, 0, 1)
        for name in ("brightness", "contrast"):
            _number(name, getattr(self, name), 0, 1, hi_open=False)
        if self.crop_pad is not None:
            _integer("crop_pad", self.crop_pad, 0)
        check(self.schedule in ("onecycle", "cosine"),
              f"train schedule must be 'onecycle' or 'cosine', got {self.schedule!r}")
        check_fields(self, "train")  # the rest: true/false settings, null where allowed
        check(not self.nesterov or self.momentum > 0,
              "train nesterov needs momentum > 0; set nesterov: false for plain SGD")


def _integer(name: str, v: Any, lo: int, why: str = "") -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"train {name} must be an integer >= {lo}{why}, got {v!r}")


def _number(name: str, v: Any, lo: float, hi: float | None, lo_open: bool = False, hi_open: bool = True) -> None:
    """``v`` is a real number (not a bool) in the interval, written as the message shows it."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    where = (f"> {lo:g}" if lo_open else f">= {lo:g}") if hi is None else \
        f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
    check(ok, f"train {name} must be a number {where}, got {v!r}")


@dataclass
class FitState:
    """What hooks see: the model being trained, the optimiser and where the loop is."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class Hook:
    """Customises :func:`fit` without copying it. Override what you need.

    * ``on_fit_start(state)`` – once, after the model is on the device; it may replace
      ``state.optimizer`` (e.g. an attack that trains with its paper's Adam), and :func:`fit`
      steps whichever optimiser ``state`` holds afterwards (the schedule sets its ``lr``).
    * ``batch(state, x, y) -> (x, y)`` – change an augmented float batch (e.g. poison on the fly).
    * ``loss(state, x, y, logits, loss) -> loss`` – add terms to the loss.
    * ``after_step(state)`` – after each optimiser step (e.g. project weights).
    * ``on_epoch_end(state, metrics)`` – add entries to the epoch's metrics dict.
    """

    def on_fit_start(self, state: FitState) -> None: ...

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        return x, y

    def loss(self, state: FitState, x, y, logits, loss):
        return loss

    def after_step(self, state: FitState) -> None: ...

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None: ...


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    wall_time: float
    images_per_s: float


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    t = step / max(1, total)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.warmup > 0 and t < cfg.warmup:
        return cfg.lr * t / cfg.warmup
    return cfg.lr * max(0.0, (1 - t) / (1 - cfg.warmup))


def _batch_to_float(xb: torch.Tensor) -> torch.Tensor:
    if xb.dtype == torch.uint8:
        return xb.permute(0, 3, 1, 2).float().div_(255.0)
    return xb


def fit(
    model: nn.Module,
    data: TensorData,
    cfg: TrainConfig | None = None,
    *,
    generator: torch.Generator,
    hooks: Sequence[Hook] = (),
    device: str | torch.device = "auto",
    crop_pad: int = 4,
    hflip: bool = False,
    eval_data: TensorData | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train a copy of ``model`` on ``data`` and return it (the input model is not changed).

    ``data``: uint8 NHWC or float NCHW images with int labels. ``crop_pad`` / ``hflip`` are the
    dataset's augmentation defaults, overridden by ``cfg``. ``eval_data``, when given, is
    scored after each epoch (``test_acc``). ``progress`` defaults to "stderr is a terminal".
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    check(len(data) > 0, "cannot train on an empty dataset")
    dev = resolve_device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    model = copy.deepcopy(model).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pad = cfg.crop_pad if cfg.crop_pad is not None else crop_pad
    flip = cfg.hflip if cfg.hflip is not None else hflip

    x_all, y_all = data.x.to(dev), data.y.to(dev)
    n = len(data)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
    )
    state = FitState(model, opt, dev, generator, total_steps=total)
    for h in hooks:
        h.on_fit_start(state)
    opt = state.optimizer

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="step", leave=False, file=sys.stderr)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        state.epoch = epoch
        model.train()
        perm = torch.randperm(n, generator=generator).to(dev)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = 0  # samples the loss saw (a hook may enlarge the batch, e.g. x ∪ trigger(x))
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = _batch_to_float(x_all[idx])
            yb = y_all[idx]
            if cfg.augment:
                xb = random_crop(xb, pad, generator)
                if flip:
                    xb = random_hflip(xb, generator)
                if cfg.brightness or cfg.contrast:
                    xb = color_jitter(xb, cfg.brightness, cfg.contrast, generator)
            for h in hooks:
                xb, yb = h.batch(state, xb, yb)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, state.step, total)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            for h in hooks:
                loss = h.loss(state, xb, yb, logits, loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state.step += 1
            for h in hooks:
                h.after_step(state)
            loss_sum += loss.detach() * yb.shape[0]
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += yb.shape[0]
            if bar is not None:
                bar.update(1)
        metrics = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(seen, 1),
                   "train_acc": float(correct) / max(seen, 1), "lr": _lr_at(cfg, state.step, total)}
        check(math.isfinite(metrics["train_loss"]), f"training diverged in epoch {epoch + 1} (train loss "
                                                    f"{metrics['train_loss']}); lower the learning rate (lr {cfg.lr})")
        if eval_data is not None:
            metrics["test_acc"] = accuracy(model, eval_data, device=dev)
        for h in hooks:
            h.on_epoch_end(state, metrics)
        history.append(metrics)
        if bar is not None:
            bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k != "epoch"})
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    return FitResult(model, history, wall, n * cfg.epochs / max(wall, 1e-9))


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device: str | torch.device = "auto"
) -> torch.Tensor:
    """Predicted labels ``(N,)`` for images ``x`` (uint8 NHWC or float NCHW), model in eval mode."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = _batch_to_float(x[i:i + batch_size].to(dev))
        out.append(model(xb).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: TensorData, *, device: str | torch.device = "auto") -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    return float((predict(model, data.x, device=device) == data.y).float().mean())
