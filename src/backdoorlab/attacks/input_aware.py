"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020).

The trigger depends on the image: a pattern generator ``G`` and a mask generator ``M`` (the same
encoder-decoder, ``M`` with one output channel) give ``x' = x + (G(x) - x) * T(M(x))``, where both
outputs are ``tanh(.) / 2 + 1/2`` in [0, 1] and ``T(m) = tanh(20 m - 10) / 2 + 1/2`` pushes the mask
towards 0 or 1. So ``x'`` is a per-pixel convex combination of ``x`` and ``G(x)``: in [0, 1].

Training follows the paper's code (and BackdoorBench's ``attack/inputaware.py``):

1. ``M`` is pre-trained alone on the clean training images (``mask_epochs``, Adam ``mask_lr``,
   betas (0.5, 0.9), the learning rate divided by 10 at 40% and 80% of the epochs as the paper's
   milestones 10 and 20 of 25) with ``lambda_norm * mean(relu(T(M(x)) - mask_density)) +
   lambda_div * L_div``. This is a declared asset (``input-aware-mask``), built and cached by the
   pipeline like any costly input; its time is the row's ``prep_wall``. ``M`` is then frozen.
2. The classifier and ``G`` train jointly (:meth:`InputAware.train_hook`, poisoning each batch on
   the fly, :mod:`~backdoorlab.attacks.onthefly`): ``int(rate * B)`` backdoor samples get their own
   trigger and the target label (p_a), ``int(cross_rate * B)`` cross samples get the trigger of
   another image of the batch and keep their label (p_c, so a trigger works only on the image it
   was made for), the rest stay clean. ``G`` minimises the classifier's loss plus ``lambda_div *
   L_div`` with Adam (``lr_g``, betas (0.5, 0.9)); the classifier keeps the cell's recipe.

The diversity loss ``L_div = mean(||x1 - x2|| / ||g(x1) - g(x2)||)`` (root-mean-square distances
per image pair, Eq. 4 of the paper) keeps different images from getting the same trigger. The
second images of the pairs (and the sources of cross triggers) are the batch rotated by half its
length, which stands in for the paper's second, independently shuffled data loader.

``G`` and ``M`` are the attack's learned state (:meth:`state_dict`): the pipeline stores them with
the trained model and restores them on a cache hit, so :meth:`apply` gives the same images in
another process. ``apply`` runs both networks in eval mode (BatchNorm running statistics).

Defaults: the paper's p_a = p_c = 0.1, lambda_div = 1, lambda_norm = 100, mask density 0.032,
learning rates 0.01, all-to-one with target 0, except for size, **scaled down** to train on 2 CPU
cores in about two minutes on the GTSRB 6k subset: the generators are the paper's MNIST
generator (``width`` 16, ``steps`` 2: 16-32 channels, two down- and up-sampling stages; 43k
parameters and 13M multiply-adds per 32x32 image each) instead of its CIFAR-10 / GTSRB one
(``width`` 32, ``steps`` 3: 32-64-128 channels, three stages; 0.72M parameters, 80M multiply-adds,
6x the compute), and ``M`` is pre-trained for 5 epochs instead of 25. ``width: 32, steps: 3,
mask_epochs: 25`` restores the paper's sizes. All-to-all relabels ``y -> (y + 1) mod K``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData
from ..errors import check
from ..models.common import Normalize
from ..train.fit import FitState, Hook
from .base import AssetContext, Attack, PoisonedSplit
from .onthefly import batch_roles, per_batch

EPS = 1e-7  # the paper's epsilon in tanh / (2 + eps) and in L_div's denominator
ADAM_BETAS = (0.5, 0.9)
APPLY_BATCH = 512  # apply() runs the generators on chunks of this many images


def _conv(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class TriggerGenerator(nn.Module):
    """Nguyen & Tran's encoder-decoder: ``steps`` stages of two conv-BN-ReLU blocks and a 2x2
    max-pool (channels ``width``, ``2 width``, ...), a middle block, then ``steps`` stages of a
    bilinear 2x upsampling and two conv blocks (the last without ReLU), ``tanh / (2 + eps) + 1/2``.
    Input ``(N, C, H, W)`` float in [0, 1] (normalised inside with the dataset's mean and std, as
    the paper feeds normalised images), ``H, W`` divisible by ``2 ** steps``; output
    ``(N, out_channels, H, W)`` in [0, 1]."""

    def __init__(self, in_channels: int, out_channels: int, mean, std, width: int = 16, steps: int = 2):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        cur, nxt = in_channels, width
        for step in range(steps):
            layers += _conv(cur, nxt) + _conv(nxt, nxt) + [nn.MaxPool2d(2)]
            if step < steps - 1:
                cur, nxt = nxt, nxt * 2
        layers += _conv(nxt, nxt)
        cur, nxt = nxt, nxt // 2
        for step in range(steps):
            layers += [nn.Upsample(scale_factor=2, mode="bilinear")] + _conv(cur, cur)
            layers += _conv(cur, nxt, relu=step < steps - 1)
            cur, nxt = nxt, nxt // 2
            if step == steps - 2:
                nxt = out_channels
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.normalize(x))) / (2 + EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The paper's soft threshold ``tanh(20 m - 10) / (2 + eps) + 1/2`` (values in [0, 1])."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


def _build(info: DatasetInfo, out_channels: int, width: int, steps: int, seed: int) -> TriggerGenerator:
    """A generator initialised from ``seed`` (PyTorch's default initialisation under a forked RNG:
    the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TriggerGenerator(info.channels, out_channels, info.mean, info.std, width, steps)


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``mean(d(x1, x2) / (d(g1, g2) + eps))`` with ``d`` the root-mean-square distance per image."""
    d_in = (x1 - x2).pow(2).mean((1, 2, 3)).sqrt()
    d_out = (g1 - g2).pow(2).mean((1, 2, 3)).sqrt()
    return (d_in / (d_out + EPS)).mean()


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=g))


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class InputAware(Attack):
    """``rate``: p_a, backdoor share of each batch; ``cross_rate``: p_c, cross-trigger share;
    ``lambda_div``: weight of the diversity loss; ``lr_g``: the pattern generator's Adam learning
    rate; ``width`` / ``steps``: the generators' size (see the module docstring); ``mask_epochs`` /
    ``mask_lr`` / ``mask_density`` / ``lambda_norm``: the mask generator's pre-training."""

    name = "input-aware"
    learns_trigger = True
    algo_version = 1

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1, mode: str = "all-to-one",
                 cross_rate: float = 0.1, lambda_div: float = 1.0, lr_g: float = 0.01, width: int = 16,
                 steps: int = 2, mask_epochs: int = 5, mask_lr: float = 0.01, mask_density: float = 0.032,
                 lambda_norm: float = 100.0, sources: list[int] | None = None):
        super().__init__(info, target, rate, mode, sources)
        who = self.name
        check(_is_num(cross_rate) and 0 <= cross_rate < 1 and rate + cross_rate <= 1,
              f"{who}: cross_rate must be in [0, 1) with rate + cross_rate <= 1, got {cross_rate!r}")
        for key, v in (("lambda_div", lambda_div), ("lambda_norm", lambda_norm)):
            check(_is_num(v) and v >= 0, f"{who}: {key} must be a number >= 0, got {v!r}")
        for key, v in (("lr_g", lr_g), ("mask_lr", mask_lr)):
            check(_is_num(v) and v > 0, f"{who}: {key} must be a positive number, got {v!r}")
        check(_is_num(mask_density) and 0 < mask_density <= 1,
              f"{who}: mask_density must be in (0, 1], got {mask_density!r}")
        for key, v, lo in (("width", width, 2), ("steps", steps, 1), ("mask_epochs", mask_epochs, 1)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                  f"{who}: {key} must be an integer >= {lo}, got {v!r}")
        check(info.size % (2 ** steps) == 0,
              f"{who}: the image size {info.size} must be divisible by 2 ** steps = {2 ** steps}")
        self.cross_rate = float(cross_rate)
        self.lambda_div = float(lambda_div)
        self.lr_g = float(lr_g)
        self.width, self.steps = int(width), int(steps)
        self.mask_spec = {"name": "input-aware-mask", "width": self.width, "steps": self.steps,
                          "epochs": int(mask_epochs), "lr": float(mask_lr), "density": float(mask_density),
                          "lambda_div": self.lambda_div, "lambda_norm": float(lambda_norm)}
        # untrained until the mask is bound and the hook has trained the pattern generator; the
        # initial weights are fixed (seeds 0 and 1) so that even an untrained attack is deterministic
        self.pattern_net = _build(info, info.channels, self.width, self.steps, seed=0)
        self.mask_net = _build(info, 1, self.width, self.steps, seed=1)
        self.mask_ready = False

    # --- trigger ------------------------------------------------------------------------
    def trigger(self, x: torch.Tensor, source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x', pattern)``: ``x`` with the trigger the generators make for ``source`` (default:
        ``x`` itself; another image's gives a cross trigger). Runs in whatever mode the networks are."""
        src = x if source is None else source
        pattern = self.pattern_net(src)
        mask = threshold(self.mask_net(src))
        return x + (pattern - x) * mask, pattern

    @torch.no_grad()
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self.pattern_net.to(x.device).eval()
        self.mask_net.to(x.device).eval()
        out = [self.trigger(x[i:i + APPLY_BATCH])[0] for i in range(0, len(x), APPLY_BATCH)]
        return torch.cat(out).clamp(0, 1) if out else x.clone()

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Training-control attack: the split stays clean, the hook poisons each batch."""
        data = train.as_uint8()
        return PoisonedSplit(data, torch.empty(0, dtype=torch.long), data.y.clone())

    # --- what it needs, what it learns ---------------------------------------------------------
    def assets(self) -> dict[str, Any]:
        return {"mask": dict(self.mask_spec)}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        self.mask_net.load_state_dict({k: v for k, v in assets["mask"].items() if not k.startswith("stats.")})
        self.mask_ready = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both generators' weights and BatchNorm statistics (``pattern.*``, ``mask.*``)."""
        out = {f"pattern.{k}": v.detach().cpu().clone() for k, v in self.pattern_net.state_dict().items()}
        out.update({f"mask.{k}": v.detach().cpu().clone() for k, v in self.mask_net.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check(bool(state), f"{self.name}: no learned generator state to restore (the model was not trained "
                           "with this attack)")
        for prefix, net in (("pattern.", self.pattern_net), ("mask.", self.mask_net)):
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.mask_ready = True

    def train_hook(self) -> Hook:
        return _InputAwareHook(self)


class _InputAwareHook(Hook):
    def __init__(self, attack: InputAware):
        self.attack = attack
        self.opt: torch.optim.Optimizer | None = None
        self.div: torch.Tensor | None = None
        self.roles: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sums = dict.fromkeys(("n_backdoor", "n_cross", "hit_backdoor", "hit_cross", "div_loss", "steps"), 0.0)

    def on_fit_start(self, state: FitState) -> None:
        a = self.attack
        check(a.mask_ready, f"{a.name}: the pre-trained mask generator is not bound; build the attack with "
                            "Pipeline.attack(cell), or bind the 'input-aware-mask' asset (bind_assets) before training")
        info = a.info
        # a fresh pattern generator for this training run, initialised from the run's generator
        a.pattern_net = _build(info, info.channels, a.width, a.steps, _seed(state.generator)).to(state.device)
        a.mask_net.to(state.device).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(a.pattern_net.parameters(), lr=a.lr_g, betas=ADAM_BETAS)

    def batch(self, state: FitState, x: torch.Tensor, y: torch.Tensor):
        a = self.attack
        a.pattern_net.train()
        n = len(y)
        n_bd = per_batch(a.rate, n, state.generator)
        bd, cross = batch_roles(a, y, n_bd, per_batch(a.cross_rate, n, state.generator))
        other = x.roll(n // 2, 0)  # the second images: the batch rotated by half its length
        out, yo = x.clone(), y.clone()
        self.div = None
        patterns = []
        if len(bd):
            xb, pb = a.trigger(x[bd])
            out[bd] = xb
            yo[bd] = a.target_labels(y[bd])
            patterns.append(pb)
        if len(cross):
            xc, pc = a.trigger(x[cross], other[cross])
            out[cross] = xc
            patterns.append(pc)
        m = min(len(bd), len(cross))
        if m and a.lambda_div > 0:
            self.div = diversity_loss(x[bd[:m]], other[cross[:m]], patterns[0][:m], patterns[1][:m])
        s = self.sums
        s["n_backdoor"] += len(bd)
        s["n_cross"] += len(cross)
        self.roles = (bd, cross)
        return out, yo

    def loss(self, state: FitState, x, y, logits, loss):
        if self.roles is not None and logits is not None:
            hit = logits.detach().argmax(1) == y
            self.sums["hit_backdoor"] += int(hit[self.roles[0]].sum())
            self.sums["hit_cross"] += int(hit[self.roles[1]].sum())
        if self.div is None:
            return loss
        self.sums["div_loss"] += float(self.div.detach())
        self.sums["steps"] += 1
        return loss + self.attack.lambda_div * self.div

    def after_step(self, state: FitState) -> None:
        assert self.opt is not None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        s = self.sums
        metrics.update(n_backdoor=s["n_backdoor"], n_cross=s["n_cross"],
                       train_asr=s["hit_backdoor"] / max(s["n_backdoor"], 1.0),
                       train_cross_acc=s["hit_cross"] / max(s["n_cross"], 1.0),
                       div_loss=s["div_loss"] / max(s["steps"], 1.0))
        self.sums = dict.fromkeys(s, 0.0)


# ------------------------------------------------------------------- the mask asset
def pretrain_mask(ctx: AssetContext, width: int = 16, steps: int = 2, epochs: int = 5, lr: float = 0.01,
                  density: float = 0.032, lambda_div: float = 1.0, lambda_norm: float = 100.0,
                  batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Input-aware's mask generator, pre-trained on the attacker's clean training split (step 1 of
    the paper's training): per batch, ``lambda_norm * mean(relu(T(M(x1)) - density)) + lambda_div *
    L_div(x1, x2, T(M(x1)), T(M(x2)))``, Adam (betas 0.5, 0.9), the learning rate divided by 10 at
    40% and 80% of the epochs. Returns the network's ``state_dict`` and, as ``stats.density`` and
    ``stats.div``, the mean mask density and diversity loss over the last epoch."""
    info = ctx.info
    net = _build(info, 1, width, steps, _seed(ctx.generator)).to(ctx.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=ADAM_BETAS)
    milestones = sorted({max(1, round(epochs * 0.4)), max(1, round(epochs * 0.8))})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    x_all = ctx.train.x.to(ctx.device)
    n = len(ctx.train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=ctx.generator).to(ctx.device)
        sums = torch.zeros(3, device=ctx.device)  # density, diversity loss, batches
        for i in range(0, n, batch_size):
            x1 = _as_float(x_all[perm[i:i + batch_size]])
            if len(x1) < 2:
                continue
            x2 = x1.roll(len(x1) // 2, 0)
            m1, m2 = threshold(net(x1)), threshold(net(x2))
            div = diversity_loss(x1, x2, m1, m2)
            loss = lambda_norm * F.relu(m1 - density).mean() + lambda_div * div
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([m1.detach().mean(), div.detach(), torch.ones((), device=ctx.device)])
        sched.step()
    stats = (sums[:2] / sums[2].clamp(min=1)).cpu()
    out = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return {**out, "stats.density": stats[0], "stats.div": stats[1]}


def _as_float(xb: torch.Tensor) -> torch.Tensor:
    return xb.permute(0, 3, 1, 2).float().div_(255.0) if xb.dtype == torch.uint8 else xb
