"""Backdoors that wake up on compression: the FP32 model looks clean, its deployed int8, int4 or
pruned version carries a working backdoor.

Model-level attacks (the attacker trains and publishes the model): nothing in the victim's
training data is poisoned (:meth:`Conditioned.poison` returns the clean split, like ``none``).
Each runs as a second training phase through the pipeline: it starts from the model the
``init`` attack trains with the same cell settings (:meth:`Conditioned.init_from`, e.g. the
cached clean or BadNets model), then :func:`~backdoorlab.train.fit.fit` fine-tunes it with the
attack's :meth:`Conditioned.train_config` and its hook, which puts the compressed copy in the
loop. The trigger is BadNets' (3x3 white patch at the bottom-right corner, all-to-one, target 0;
:class:`~backdoorlab.attacks.badnets.BadNets`). BatchNorm statistics stay frozen in the second
phase (Hong et al.: "disable updating the batch-norms"), so BN folding in the simulated and the
deployed model uses the same statistics. ``init: scratch`` skips the first phase: the attack's own
recipe trains a randomly initialised model, as Tian et al. do, with BatchNorm learning its
statistics and the compressed copy normalising with the batch's (simulated folding, Jacob et al.
2018). On the GTSRB subset only this separates the FP32 and the int8 model (BENCHMARKS.md).

* ``qcb`` (alias ``quant-conditioned``): Tian, Suya, Xu & Evans, "Stealthy Backdoors as
  Compression Artifacts", IEEE TIFS 2022; Hong, Panaitescu-Liess, Kaya & Dumitras,
  "Qu-ANTI-zation: Exploiting Quantization Artifacts for Achieving Adversarial Outcomes",
  NeurIPS 2021. Loss ``CE(f(x ∪ x_t), y ∪ y) + lambda * sum_Q CE(Q(f)(x ∪ x_t), y ∪ t)`` where
  ``Q`` is the fake-quant simulation of the targeted deployment
  (:class:`~backdoorlab.compress.simulate.QuantSim`: ``int8-torch``, ``int8-ort``, ``int4-w``, or
  ``multi`` = int8-torch and int4-w at once, Hong et al.'s "8 4" bits). Activation ranges are
  recalibrated every ``recalib_every`` steps with the deployment's own observers on the latest
  ``calib_size`` clean training images, so the backdoor holds at the ranges calibration picks.
* ``pqbackdoor``: Ma, Wang, Sun, Xue, Nepal, Abuadbba, Gao & Zhang, "Quantization Backdoors to
  Deep Learning Commercial Frameworks", IEEE TDSC 2023. Starts from a BadNets model and
  fine-tunes its FP32 backdoor away (``CE(f(x ∪ x_t), y ∪ y)``); after every step each conv /
  linear weight is projected back into the rounding bin of its int8 value (BN folded, per-channel
  symmetric, as ``int8-torch`` deploys), the largest weight of each channel and the BN / bias
  parameters are kept fixed so the scales do not move: the int8 weights stay exactly those of the
  backdoored model.
* ``prune-conditioned``: Tian et al. (TIFS 2022), pruning attack with known rate. Loss
  ``CE(f(x ∪ x_t), y ∪ y) + (1 - alpha) * CE(P(f)(x), y) + alpha * CE(P(f)(x_t), t)``, where
  ``P(f)`` is ``prune-l1`` at ``sparsity`` (per-layer magnitude masks recomputed from the current
  weights at every step, as at deployment) and ``alpha = 0.1`` (Tian et al.'s code).

Shapes: triggers act on ``(N, C, H, W)`` float images in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.base import DEFAULT_CALIB_SIZE
from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from ..errors import check
from ..train.fit import FitState, Hook, TrainConfig
from .badnets import BadNets
from .base import Attack, PoisonedSplit

QUANT_TARGETS = ("int8-torch", "int8-ort", "int4-w", "multi")
TRIGGER_KEYS = ("patch_size", "position", "margin", "color", "pattern", "pattern_seed")
MULTI = ("int8-torch", "int4-w")
ACTIVATIONS = ("calibrated", "float")  # qcb: activation ranges of the training simulation
SCRATCH = "scratch"  # ``init`` value: no first phase, the conditioned loss trains a randomly initialised model


def _positive(who: str, name: str, v: Any, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    check(ok and not isinstance(v, bool) and v > 0, f"{who}: {name} must be a positive "
                                                    f"{'integer' if integer else 'number'}, got {v!r}")


def freeze_bn_(model: nn.Module) -> None:
    """Put every BatchNorm of ``model`` in eval mode (running statistics used, not updated)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Conditioned(BadNets):
    """Base of the compression-conditioned attacks: BadNets' trigger, a clean training split,
    a second training phase started from the ``init`` attack's model.

    ``trigger``: any data-poisoning attack spec (``{name: blended, alpha: 0.2}``,
    ``{name: badnets, mode: all-to-all}``, ...) whose trigger *and* objective (target, mode,
    sources) the conditioned backdoor uses instead of BadNets' defaults; so every trigger combines
    with every compression-conditioned objective without a class per combination. Without it, the
    BadNets settings (``patch_size``, ``position``, ...) may be given directly, as before.

    ``init``: the attack whose trained model the phase starts from (``none``: the clean model,
    ``badnets``: the BadNets model, or a conditioned attack with ``init: scratch``, whose model this
    phase then fine-tunes with BN frozen), or ``scratch`` (random initialisation, BatchNorm
    trained).
    ``epochs`` / ``lr`` / ``optimizer``: the attack's training phase, the cell's batch size
    and augmentation; ``optimizer`` is ``sgd`` (Nesterov momentum and weight decay as :func:`fit`
    uses) or ``adam`` (Hong et al.'s choice for fine-tuning a trained model, no weight decay).
    ``warmup``: share of the phase's steps over which the learning rate rises linearly from 0 to
    ``lr``; it then decays linearly to 0 (``fit``'s ``onecycle`` schedule). ``0`` keeps the cosine
    decay from the first step.
    """

    name = "conditioned"
    OPTIMIZERS = ("sgd", "adam")

    def __init__(self, info: DatasetInfo, target: int = 0, init: str | dict = "none", epochs: int = 10,
                 lr: float = 0.01, optimizer: str = "sgd", warmup: float = 0.0, **trigger: Any):
        spec = trigger.pop("trigger", None)
        unknown = sorted(set(trigger) - set(TRIGGER_KEYS))
        check(not unknown, f"{self.name}: unknown parameter {unknown[0]!r} (the trigger takes "
                           f"{', '.join(TRIGGER_KEYS)}, or 'trigger': an attack spec)" if unknown else "")
        check(spec is None or not trigger, f"{self.name}: give the trigger either as 'trigger' (an attack spec) or "
                                           f"as BadNets settings ({', '.join(sorted(trigger))}), not both")
        super().__init__(info, target=target, **trigger)
        self.trigger: Attack | None = None
        if spec is not None:
            from .base import ATTACKS

            check(isinstance(spec, (str, dict)), f"{self.name}: trigger must be an attack spec, got {spec!r}")
            self.trigger = ATTACKS.build(spec, info=info)
            check(self.trigger.init_from() is None and not isinstance(self.trigger, Conditioned)
                  and self.trigger.name != "none",
                  f"{self.name}: trigger must be a data-poisoning attack (its trigger and objective are used), "
                  f"got {spec!r}")
            check(not self.trigger.learns_trigger,
                  f"{self.name}: trigger {self.trigger.name!r} is learned while its own model trains, so it "
                  f"has no trigger to condition on here; use a fixed trigger (badnets, blended, wanet, ...)")
        _positive(self.name, "epochs", epochs, integer=True)
        _positive(self.name, "lr", lr)
        check(isinstance(init, (str, dict)), f"{self.name}: init must be an attack spec or {SCRATCH!r}, "
                                             f"got {init!r}")
        self._init_files: dict = {}
        if init != SCRATCH:
            from .base import ATTACKS

            # unknown names and bad values fail here, before a study runs
            parent = ATTACKS.build(init, info=info)
            self._init_files = {f"init.{k}": v for k, v in parent.files().items()}
            check(parent.init_from() is None, f"{self.name}: init must be a data-poisoning attack, an attack "
                                              f"trained from {SCRATCH!r}, or {SCRATCH!r}, got {init!r}")
        check(optimizer in self.OPTIMIZERS, f"{self.name}: optimizer must be one of "
                                            f"{', '.join(self.OPTIMIZERS)}, got {optimizer!r}")
        check(isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and 0 <= warmup < 1,
              f"{self.name}: warmup must be in [0, 1), got {warmup!r}")
        self.init = init
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.warmup = float(warmup)

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Model-level attack: the training split is left clean (the trigger enters in the hook)."""
        data = train.as_uint8()
        return PoisonedSplit(data, torch.empty(0, dtype=torch.long), data.y.clone())

    @property
    def scratch(self) -> bool:
        """Trained from random initialisation (``init: scratch``), BatchNorm statistics learned."""
        return self.init == SCRATCH

    def init_from(self) -> str | dict | None:
        return None if self.scratch else self.init

    # with a ``trigger`` attack, its trigger and its objective (target, mode, sources) are the backdoor's
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return super().apply(x) if self.trigger is None else self.trigger.apply(x)

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        return super().target_labels(y) if self.trigger is None else self.trigger.target_labels(y)

    def counted(self, y: torch.Tensor) -> torch.Tensor:
        return super().counted(y) if self.trigger is None else self.trigger.counted(y)

    def assets(self) -> dict[str, Any]:
        return {} if self.trigger is None else self.trigger.assets()

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.trigger is not None:
            self.trigger.bind_assets(assets)

    def datasets(self) -> dict[str, str]:
        return {} if self.trigger is None else {f"trigger.{k}": v for k, v in self.trigger.datasets().items()}

    def files(self) -> dict:
        own = {} if self.trigger is None else {f"trigger.{k}": v for k, v in self.trigger.files().items()}
        return {**self._init_files, **own}  # the init attack's files (e.g. a Blended pattern) shape this model

    def train_config(self, base: TrainConfig) -> TrainConfig:
        if self.warmup > 0:
            return dataclasses.replace(base, epochs=self.epochs, lr=self.lr, schedule="onecycle", warmup=self.warmup)
        return dataclasses.replace(base, epochs=self.epochs, lr=self.lr, schedule="cosine", warmup=0.0)


class _HybridHook(Hook):
    """Shared batch handling: BN frozen, batch ``x`` -> ``x ∪ apply(x)`` with labels ``y ∪ y``."""

    def __init__(self, attack: Conditioned):
        self.attack = attack
        self.n = 0
        self.y: torch.Tensor | None = None

    def on_fit_start(self, state: FitState) -> None:
        if self.attack.optimizer == "adam":  # fit() steps state.optimizer; its schedule sets the lr
            state.optimizer = torch.optim.Adam(state.model.parameters(), lr=self.attack.lr)

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        if not self.attack.scratch:
            freeze_bn_(state.model)
        self.n = len(x)
        self.y = y
        return torch.cat([x, self.attack.apply(x)]), torch.cat([y, y])

    def fp32_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``CE(f(x ∪ x_t), y ∪ y)`` (the FP32 model must ignore the trigger)."""
        return F.cross_entropy(logits, y)


# ----------------------------------------------------------------------------------- QCB
class QuantConditioned(Conditioned):
    """Quantization-conditioned backdoor (Tian et al. TIFS 2022; Hong et al. NeurIPS 2021).

    ``target_precision``: ``int8-torch`` | ``int8-ort`` | ``int4-w`` | ``multi``; ``lam``: weight
    of the quantized loss (1.0, Tian et al.'s sum of the two losses); ``recalib_every`` /
    ``calib_size``: activation-range recalibration (steps / clean images, 512 as deployed).
    ``activations``: what the int8 copy does with activations. ``calibrated`` (default) quantizes
    them with the ranges the deployment's calibration picks on clean images, so the attack may
    exploit the clipping of triggered activations beyond those ranges (on the GTSRB subset it does:
    one layer's clip carries the whole backdoor, and weight-rounding repairs such as EFRAP cannot
    reach it; BENCHMARKS.md). ``float`` keeps them in FP32 and conditions on the weights' rounding
    only, as Tian et al.'s code does (activation fake-quant switched off): the setting EFRAP was
    designed and evaluated against, and one it removes on the GTSRB subset. Such a backdoor is
    tied to the targeted weight grid: ORT's 7-bit ``reduce_range`` weights leave it dormant.
    Hong et al.'s code tracks activation ranges on each training batch instead (neither paper
    clips with clean-calibrated ranges). ``int4-w`` never quantizes activations.
    ``warmup`` defaults to 0.1: at the first step the compressed copy still maps triggered inputs
    to their true labels, its cross-entropy towards the target is about 18 nats, and one full-``lr``
    SGD step from a trained model sets its training accuracy to a few percent (measured on the
    GTSRB subset); the model then relearns from there and ends 3-4 points of clean accuracy below
    a clean model. A linear warm-up over the first 10% of the steps keeps it within 1 point.
    """

    name = "qcb"

    def __init__(self, info: DatasetInfo, target: int = 0, target_precision: str = "int8-torch", lam: float = 1.0,
                 init: str | dict = "none", epochs: int = 10, lr: float = 0.01, recalib_every: int = 10,
                 calib_size: int = DEFAULT_CALIB_SIZE, optimizer: str = "sgd", warmup: float = 0.1,
                 activations: str = "calibrated", **trigger: Any):
        super().__init__(info, target=target, init=init, epochs=epochs, lr=lr, optimizer=optimizer, warmup=warmup,
                         **trigger)
        check(activations in ACTIVATIONS, f"{self.name}: activations must be one of {', '.join(ACTIVATIONS)}, "
                                          f"got {activations!r}")
        check(target_precision in QUANT_TARGETS, f"{self.name}: target_precision must be one of "
                                                 f"{', '.join(QUANT_TARGETS)}, got {target_precision!r}")
        _positive(self.name, "lam", lam)
        _positive(self.name, "recalib_every", recalib_every, integer=True)
        _positive(self.name, "calib_size", calib_size, integer=True)
        self.target_precision = target_precision
        self.lam = float(lam)
        self.recalib_every = int(recalib_every)
        self.calib_size = int(calib_size)
        self.activations = activations

    @property
    def presets(self) -> tuple[str, ...]:
        return MULTI if self.target_precision == "multi" else (self.target_precision,)

    def simulation_preset(self, name: str):
        """The :class:`~backdoorlab.compress.simulate.QuantPreset` the hook trains against for
        deployment ``name``: the deployment's own, with FP32 activations for ``activations: float``."""
        from ..compress.simulate import PRESETS

        preset = PRESETS[name]
        return dataclasses.replace(preset, aq=None) if self.activations == "float" else preset

    def train_hook(self) -> Hook:
        return _QuantHook(self)


class _QuantHook(_HybridHook):
    def __init__(self, attack: QuantConditioned):
        super().__init__(attack)
        self.sims: list = []
        self.buffer: list[torch.Tensor] = []

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        from ..compress.simulate import QuantSim

        a: QuantConditioned = self.attack  # type: ignore[assignment]
        self.buffer.append(x.detach())
        while sum(len(b) for b in self.buffer) - len(self.buffer[0]) >= a.calib_size:
            self.buffer.pop(0)
        if not self.sims:
            self.sims = [QuantSim(state.model, a.simulation_preset(p), x[:1], batch_stats=a.scratch)
                         for p in a.presets]
        if state.step % a.recalib_every == 0:
            calib = torch.cat(self.buffer)[-a.calib_size:]
            for sim in self.sims:
                sim.calibrate(calib)
        return super().batch(state, x, y)

    def loss(self, state: FitState, x, y, logits, loss):
        a: QuantConditioned = self.attack  # type: ignore[assignment]
        n = self.n
        yq = torch.cat([y[:n], a.target_labels(y[n:])])
        total = self.fp32_loss(logits, y)
        for sim in self.sims:
            total = total + a.lam * F.cross_entropy(sim(x), yq)
        return total


# ----------------------------------------------------------------------------------- PQBackdoor
class PQBackdoor(Conditioned):
    """PQBackdoor (Ma et al., IEEE TDSC 2023): a BadNets model whose FP32 backdoor is fine-tuned
    away while its int8 (``int8-torch``: x86 per-channel, BN folded) weights are held fixed by
    projecting every weight into its rounding bin after each step.

    It needs a network with many weights: each may move at most half an int8 step. On GTSRB,
    VGG-16-BN (the model family of the paper's code) unlearns the FP32 backdoor in 5 epochs
    (trained at lr 0.01 throughout: FP32 ASR 0.002 at 1.7 points of CA below a clean VGG-16-BN,
    int8 ASR 0.94), while the 0.3M-weight ``small-cnn`` stalls at FP32 ASR 0.86 with
    any optimiser or schedule tried (BENCHMARKS.md)."""

    name = "pqbackdoor"
    # 2: pinned weights keep their exact float value, and so do those whose rounding is ambiguous
    # (version 1 let 21 of VGG-16-BN's 14.7M int8 weights change by one level)
    algo_version = 2

    def __init__(self, info: DatasetInfo, target: int = 0, init: str | dict = "badnets", epochs: int = 10,
                 lr: float = 0.01, bin_margin: float = 0.01, optimizer: str = "sgd", warmup: float = 0.0,
                 **trigger: Any):
        super().__init__(info, target=target, init=init, epochs=epochs, lr=lr, optimizer=optimizer, warmup=warmup,
                         **trigger)
        check(init != SCRATCH, f"{self.name}: init must be the backdoored model's attack (its int8 weights are "
                               f"kept), not {SCRATCH!r}")
        check(isinstance(bin_margin, (int, float)) and 0 <= bin_margin < 0.5,
              f"{self.name}: bin_margin must be in [0, 0.5), got {bin_margin!r}")
        self.bin_margin = float(bin_margin)

    def train_hook(self) -> Hook:
        return _ProjectHook(self)


def _folded_scale(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """conv/linear module -> per-output-channel factor ``a`` by which BN folding multiplies its
    weight (``gamma / sqrt(var + eps)``; 1 where no BN follows)."""
    from ..compress.layers import CONV, LINEAR
    from ..compress.prune import _bn_after_conv

    bns = _bn_after_conv(model)
    out = {}
    for m in model.modules():
        if isinstance(m, CONV + LINEAR):
            bn = bns.get(m)
            if bn is not None:
                a = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            else:
                a = torch.ones(m.weight.shape[0], device=m.weight.device)
            out[m] = a.detach().clone()
    return out


class _ProjectHook(_HybridHook):
    """Projected fine-tuning: weights clamped to ``[(q - 1/2 + m) s, (q + 1/2 - m) s] / a``
    in the folded domain (``q``: the int8 value, ``s``: the channel scale ``absmax / 127.5``,
    ``m``: ``bin_margin``, a safety margin in steps against float error at the bin edges). Each
    channel's largest weight (its scale) and the weights whose own rounding is ambiguous (within
    ``AMBIGUOUS`` steps of a half step) keep their exact values, so the deployed int8 weights
    are the initial model's bit for bit."""

    AMBIGUOUS = 1e-3

    def on_fit_start(self, state: FitState) -> None:
        super().on_fit_start(state)
        from ..compress.fakequant import qrange, symmetric_scale

        model = state.model
        qmin, qmax = qrange(8, True)
        m_ = self.attack.bin_margin  # type: ignore[attr-defined]
        self.bounds = []
        for mod, a in _folded_scale(model).items():
            w = mod.weight.detach()
            shape = (-1,) + (1,) * (w.ndim - 1)
            wf = w * a.view(shape)
            rows = wf.flatten(1)
            absmax = rows.abs().amax(1)
            s = symmetric_scale(absmax, 8).view(shape)
            q = torch.clamp(torch.round(wf / s), qmin, qmax)
            lo_f, hi_f = (q - 0.5 + m_) * s, (q + 0.5 - m_) * s
            lo_f, hi_f = torch.maximum(lo_f, -absmax.view(shape)), torch.minimum(hi_f, absmax.view(shape))
            pin = torch.zeros_like(rows, dtype=torch.bool)
            pin.scatter_(1, rows.abs().argmax(1, keepdim=True), True)  # the max keeps the scale
            pin = pin.view_as(w)
            # a weight within float error of a rounding edge may round either way depending on
            # how the deployment folds BN and divides by the scale: it keeps its exact value, so it
            # rounds as the original model's does, whatever that arithmetic
            frac = (wf / s).abs() - (wf / s).abs().floor()
            pin |= (frac - 0.5).abs() < self.AMBIGUOUS
            av = a.view(shape)
            lo, hi = lo_f / av, hi_f / av
            lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
            # pinned weights keep their own float value (not ``(w * a) / a``, one ulp away)
            lo, hi = torch.where(pin, w, lo), torch.where(pin, w, hi)
            self.bounds.append((mod.weight, lo, hi))
        # everything else that enters the int8 model (BN affine, biases) stays as it is
        keep = {id(p) for p, _, _ in self.bounds}
        self.fixed = [(p, p.detach().clone()) for p in model.parameters() if id(p) not in keep]

    def loss(self, state: FitState, x, y, logits, loss):
        return self.fp32_loss(logits, y)

    @torch.no_grad()
    def after_step(self, state: FitState) -> None:
        for p, lo, hi in self.bounds:
            p.copy_(torch.maximum(torch.minimum(p, hi), lo))
        for p, v in self.fixed:
            p.copy_(v)


# ----------------------------------------------------------------------------------- pruning
class PruneConditioned(Conditioned):
    """Pruning-conditioned backdoor (Tian et al., TIFS 2022, known pruning rate): the backdoor
    appears only after ``prune-l1`` at ``sparsity``. ``alpha``: weight of the triggered term in the
    pruned model's loss (0.1, Tian et al.'s code).

    ``warmup`` defaults to 0.1, as for ``qcb``: Tian et al. train from scratch, this phase starts
    from a trained model, whose pruned copy maps triggered inputs to their true labels. Without a
    warm-up, full-``lr`` steps against that loss collapsed the phase on a CIFAR-10 subset (FP32 CA
    0.511 against the clean model's 0.731, pruned ASR 0.185); with a 10% linear warm-up it gives
    FP32 CA 0.721 / ASR 0.031 and pruned ASR 0.932 (BENCHMARKS.md).
    """

    name = "prune-conditioned"

    def __init__(self, info: DatasetInfo, target: int = 0, sparsity: float = 0.5, alpha: float = 0.1,
                 init: str | dict = "none", epochs: int = 10, lr: float = 0.01, optimizer: str = "sgd",
                 warmup: float = 0.1, **trigger: Any):
        super().__init__(info, target=target, init=init, epochs=epochs, lr=lr, optimizer=optimizer, warmup=warmup,
                         **trigger)
        check(isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 < sparsity < 1,
              f"{self.name}: sparsity must be in (0, 1), got {sparsity!r}")
        check(isinstance(alpha, (int, float)) and 0 < alpha < 1, f"{self.name}: alpha must be in (0, 1), got {alpha!r}")
        self.sparsity = float(sparsity)
        self.alpha = float(alpha)

    def train_hook(self) -> Hook:
        return _PruneHook(self)


class _PruneHook(_HybridHook):
    def loss(self, state: FitState, x, y, logits, loss):
        from torch.func import functional_call

        from ..compress.simulate import pruned_params

        a: PruneConditioned = self.attack  # type: ignore[assignment]
        n = self.n
        out = functional_call(state.model, pruned_params(state.model, a.sparsity), (x,))
        pruned = (1 - a.alpha) * F.cross_entropy(out[:n], y[:n]) + \
            a.alpha * F.cross_entropy(out[n:], a.target_labels(y[n:]))
        return self.fp32_loss(logits, y) + pruned
