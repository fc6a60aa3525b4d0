"""EFRAP (Li, Ma, Xue, Zhang, Zhang & Xiang, "Nearest is Not Dearest: Towards Practical Defense
against Quantization-conditioned Backdoor Attacks", CVPR 2024).

A quantization-conditioned backdoor (Tian et al. 2022; Hong et al. 2021; Ma et al. 2023) lives in
the *rounding*: the attacker places weights so that round-to-nearest, and only it, switches the
backdoor on. EFRAP keeps the deployment's quantization grid (the same per-channel scales and the
same calibrated activation ranges) but chooses each weight's rounding (floor or ceil) itself:

1. **Error-guided flipped rounding.** Per output neuron, the truncation error of nearest rounding
   ``||W - s * round(W / s)||`` is measured; in the ``flip_ratio`` share of neurons of each layer
   with the largest error norm the rounding of every weight is flipped (nearest -> the other
   neighbour), which the paper shows deactivates the backdoor neurons.
2. **Activation preservation.** Starting from that rounding, a soft rounding variable per weight
   (AdaRound's rectified sigmoid, Nagel et al., ICML 2020) is optimised layer by layer so that the
   layer's output on the defender's clean data matches the FP32 layer's output
   (``||W x - W_hat x||^2``, summed over output channels as BRECQ's ``lp_loss``), with
   AdaRound's annealed regulariser driving every variable to 0 (floor) or 1 (ceil); the flipped
   rounding enters as the initial state. The reference code's reconstruction settings
   (MQBench/BRECQ, ``r18_4_4.yaml``): ``iters`` = 10000 steps per layer on random mini-batches
   of ``batch_size`` = 32 clean inputs, Adam ``lr=1e-3``, ``lam`` = 0.01, no regulariser during
   the first ``warmup`` = 20% of the steps, then ``beta`` decaying linearly from 20 to 2.

The result is deployed for real: the ``int8-torch`` artifact is built on the defender's holdout
(``compress``), then the integer weights of each quantized conv / linear are replaced by EFRAP's
(same scales, zero-points and biases) and the artifact is rebuilt from that state dict. A
per-channel ``int4-w`` deployment is repaired on its own grid (4-bit symmetric scales of the
BN-folded weights) and rebuilt as ``int4-w``. An artifact of another precision is a one-line
error.

Data: the defender's clean holdout ``ctx.clean`` (5% of the training set). Shapes: layer inputs
are captured as ``(N, C, H, W)`` (conv) or ``(N, D)`` (linear) float tensors from the FP32 model
(BN folded), images ``(N, C, H, W)`` float in [0, 1].
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Remover

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _v_init(h: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_h` at a soft value near ``h`` (0/1 targets are pulled into (0, 1) by
    ``rest`` so the optimiser can still move them)."""
    target = torch.where(h > 0.5, 1 - rest, rest).clamp(1e-3, 1 - 1e-3)
    p = (target - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def _linear_op(m: nn.Module):
    """``fwd(x, w)``: layer ``m``'s conv / linear op with weight ``w`` and no bias."""
    if isinstance(m, nn.Conv2d):
        return lambda inp, weight: F.conv2d(inp, weight, None, m.stride, m.padding, m.dilation, m.groups)
    return lambda inp, weight: F.linear(inp, weight)


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """The input of every module in ``layers`` when ``model`` runs on ``x``."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(mod, a[0].detach())) for m in layers]
    try:
        model(x)
    finally:
        for hk in hooks:
            hk.remove()
    return inputs


@DEFENSES.register("efrap")
class EFRAP(Remover):
    """EFRAP (Li et al., CVPR 2024): error-guided flipped rounding + activation preservation for
    ``int8-torch`` and per-channel ``int4-w`` deployments (the paper evaluates 8- and 4-bit).
    ``flip_ratio``: share of neurons per layer whose rounding is flipped; ``iters``:
    activation-preservation steps per layer (``batch_size`` inputs each); ``lr``; ``lam``:
    rounding regulariser weight; ``warmup``: share of steps without it; ``calib_size``: clean
    images used."""

    name = "efrap"

    def __init__(self, flip_ratio: float = 0.5, iters: int = 10000, lr: float = 1e-3, lam: float = 0.01,
                 calib_size: int = 512, batch_size: int = 32, warmup: float = 0.2):
        check(isinstance(flip_ratio, (int, float)) and 0 <= flip_ratio <= 1,
              f"efrap: flip_ratio must be in [0, 1], got {flip_ratio!r}")
        check(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 0,
              f"efrap: iters must be an integer >= 0, got {iters!r}")
        check(isinstance(lr, (int, float)) and lr > 0, f"efrap: lr must be > 0, got {lr!r}")
        check(isinstance(lam, (int, float)) and lam >= 0, f"efrap: lam must be >= 0, got {lam!r}")
        check(isinstance(calib_size, int) and not isinstance(calib_size, bool) and calib_size > 0,
              f"efrap: calib_size must be a positive integer, got {calib_size!r}")
        check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0,
              f"efrap: batch_size must be a positive integer, got {batch_size!r}")
        check(isinstance(warmup, (int, float)) and 0 <= warmup < 1, f"efrap: warmup must be in [0, 1), got {warmup!r}")
        self.flip_ratio, self.iters, self.lr, self.lam = float(flip_ratio), iters, float(lr), float(lam)
        self.batch_size, self.warmup = batch_size, float(warmup)
        self.calib_size = calib_size

    # ------------------------------------------------------------------ the rounding
    def round_layer(self, w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, fwd, qmin: int = -128,
                    qmax: int = 127, deployed: torch.Tensor | None = None) -> torch.Tensor:
        """Integer weights for one layer. ``w``: folded FP32 weight ``(O, ...)``; ``s``: ``(O,)``
        scales; ``x``: the layer's clean inputs; ``fwd(x, w)``: the layer's linear op;
        ``[qmin, qmax]``: the integer range (int8, or int4's [-8, 7]); ``deployed``: the
        artifact's own integers, the round-to-nearest reference (its BN folding may differ from
        ``w`` in the last float bit, which moves a weight at a rounding tie)."""
        shape = (-1,) + (1,) * (w.ndim - 1)
        sv = s.view(shape)
        base = torch.floor(w / sv)
        rest = w / sv - base  # in [0, 1)
        ref = torch.round(w / sv) if deployed is None else deployed.float()  # half-to-even, as deployed
        nearest = (ref - base).clamp(0, 1)
        err = (w - sv * (base + nearest)).flatten(1).norm(dim=1)  # truncation error per neuron
        k = int(round(self.flip_ratio * w.shape[0]))
        flip = torch.zeros(w.shape[0], dtype=torch.bool)
        if k:
            flip[torch.topk(err, k).indices] = True
        h0 = torch.where(flip.view(shape), 1 - nearest, nearest)
        if self.iters == 0:
            return (base + h0).clamp(qmin, qmax)
        v = _v_init(h0, torch.full_like(rest, 0.2)).requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.lr)
        with torch.no_grad():
            target = fwd(x, w)
        g = torch.Generator().manual_seed(0)
        bs = min(self.batch_size, len(x))
        for it in range(self.iters):
            idx = torch.randint(len(x), (bs,), generator=g)  # a random mini-batch per step, as BRECQ/MQBench
            wq = sv * torch.clamp(base + _h(v), qmin, qmax)
            # BRECQ's lp_loss: squared error summed over output channels, averaged over the rest
            rec = (fwd(x[idx], wq) - target[idx]).pow(2).sum(1).mean()
            t = it / max(1, self.iters)
            if t < self.warmup:  # AdaRound: no rounding regulariser during the warm-up
                reg = torch.zeros(())
            else:  # then beta decays linearly from 20 to 2
                beta = 2 + (20 - 2) * (1 - (t - self.warmup) / (1 - self.warmup))
                reg = (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
            loss = rec + self.lam * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (base + (_h(v) >= 0.5).float()).clamp(qmin, qmax)

    # ------------------------------------------------------------------ int4-w
    def _repair_int4(self, ctx: DefenseContext, model: nn.Module, x: torch.Tensor) -> tuple[Classifier, dict]:
        """``int4-w`` (per channel, 4-bit symmetric, BN folded): the same grid as the deployment
        (:func:`~backdoorlab.compress.fakequant.quantize_weight`'s scales), EFRAP's rounding."""
        from ...compress.fakequant import qrange, symmetric_scale
        from ...compress.layers import CONV, LINEAR, count_layers, fold_batchnorm
        from ...compress.lowbit import Int4WeightConfig, lowbit_classifier, packed_saving

        check(ctx.clf.info.get("weights", "").startswith("int4 symmetric per-channel"),
              f"efrap repairs per-channel int4-w only, this artifact has {ctx.clf.info.get('weights')!r}")
        sim = fold_batchnorm(model).cpu().float()
        layers = [m for m in sim.modules() if isinstance(m, CONV + LINEAR)]
        inputs = _layer_inputs(sim, layers, x)
        qmin, qmax = qrange(4, True)
        flipped, total = 0, 0
        for m in layers:  # inputs were captured from the FP32 folded model, before any layer is rounded
            w = m.weight.detach().clone()
            s = symmetric_scale(w.reshape(w.shape[0], -1).abs().amax(1), 4)
            ints = self.round_layer(w, s, inputs[m], _linear_op(m), qmin, qmax)
            sv = s.view((-1,) + (1,) * (w.ndim - 1))
            flipped += int((ints != torch.clamp(torch.round(w / sv), qmin, qmax)).sum())
            total += ints.numel()
            with torch.no_grad():
                m.weight.copy_(sv * ints)
        saved = sum(packed_saving(m.weight.numel(), 4, m.weight.shape[0]) for m in layers)
        repaired = lowbit_classifier(Int4WeightConfig(), sim, count_layers(model), saved, ctx.clean, ctx.device,
                                     act=False)
        repaired.info = {**repaired.info, "repair": "efrap"}
        share = flipped / max(total, 1)  # the artifact rounds to nearest: changed = not nearest
        return repaired, {"efrap_changed_weights": share, "efrap_not_nearest": share, "efrap_layers": len(layers),
                          "efrap_iters": self.iters, "efrap_flip_ratio": self.flip_ratio}

    # ------------------------------------------------------------------ repair
    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        from ...attacks.conditioned import _folded_scale
        from ...compress import compress
        from ...compress.layers import CONV, LINEAR
        from ...compress.torch_int8 import ao_quiet

        check(ctx.clf.precision in ("int8-torch", "int4-w"),
              f"efrap repairs int8-torch and (per-channel) int4-w deployments only, this artifact is "
              f"{ctx.clf.precision}")
        check(ctx.model is not None, "efrap needs the FP32 model the artifact was deployed from")
        check(len(ctx.clean) > 0, "efrap needs clean holdout data")
        model = copy.deepcopy(ctx.model).float().cpu().eval()
        x = ctx.clean.float()[:self.calib_size].cpu()
        if ctx.clf.precision == "int4-w":
            return self._repair_int4(ctx, model, x)
        backend = ctx.clf.info.get("backend", "x86") if isinstance(ctx.clf.info, dict) else "x86"
        spec = {"name": "int8-torch", "backend": backend}
        clf = compress(spec, model, calib=ctx.clean, device=ctx.device)
        q = clf.module.inner  # the converted FX GraphModule (DualOutput(q))

        # FP32 inputs of every conv / linear on the clean data
        layers = {name: m for name, m in model.named_modules() if isinstance(m, CONV + LINEAR)}
        inputs = _layer_inputs(model, list(layers.values()), x)
        fold = _folded_scale(model)

        qmods = dict(q.named_modules())
        changed, total, flipped = 0, 0, 0
        with ao_quiet():
            for name, m in layers.items():
                qm = qmods.get(f"model.{name}")
                if qm is None or not hasattr(qm, "set_weight_bias"):
                    continue  # a layer the deployment left in FP32
                wq = qm.weight()
                s = wq.q_per_channel_scales().float()
                a = fold[m]
                w = m.weight.detach() * a.view((-1,) + (1,) * (m.weight.ndim - 1))
                old = wq.int_repr().float()
                ints = self.round_layer(w, s, inputs[m], _linear_op(m), deployed=old)
                changed += int((ints != old).sum())
                flipped += int((ints != old).sum())
                total += ints.numel()
                new = torch._make_per_channel_quantized_tensor(ints.to(torch.int8), wq.q_per_channel_scales(),
                                                               wq.q_per_channel_zero_points(), wq.q_per_channel_axis())
                qm.set_weight_bias(new, qm.bias())
        art = {**clf.artifact, "state_dict": q.state_dict()}
        repaired = compress(spec, model, calib=ctx.clean, device=ctx.device, artifact=art)
        repaired.info = {**repaired.info, "repair": "efrap"}
        return repaired, {"efrap_changed_weights": changed / max(total, 1),
                          "efrap_not_nearest": flipped / max(total, 1), "efrap_layers": len(layers),
                          "efrap_iters": self.iters, "efrap_flip_ratio": self.flip_ratio}


