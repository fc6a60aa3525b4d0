"""EFRAP (Li, Ma, Xue, Zhang, Zhang & Xiang, "Nearest is Not Dearest: Towards Practical Defense
against Quantization-conditioned Backdoor Attacks", CVPR 2024).

A quantization-conditioned backdoor (Tian et al. 2022; Hong et al. 2021; Ma et al. 2023) lives in
the *rounding*: the attacker places weights so that round-to-nearest, and only it, switches the
backdoor on. EFRAP keeps the deployment's quantization grid (the same per-channel scales and the
same calibrated activation ranges) but chooses each weight's rounding (floor or ceil) itself:

Both parts are one per-layer optimisation of a soft rounding variable ``h = sigmoid(alpha)`` per
weight (the integer weight is ``floor(W/s) + h``), as in the authors' code (MQBench's
``advanced_ptq.LossFunction`` and ``AdaRoundFakeQuantize`` in AntigoneRandy/QuantBackdoor_EFRAP):

1. **Error-guided flipped rounding.** Every weight is pulled towards the *opposite* of its
   round-to-nearest choice by a cross-entropy ``CE(h, 1 - nearest)`` weighted by its truncation
   error ``|W - s * round(W / s)|``: weights near a rounding midpoint (large error, cheap to flip)
   are flipped, weights near a grid point hardly feel it. The paper shows that the backdoor of a
   quantization-conditioned model rides on the neurons with large truncation error, which this
   flips.
2. **Activation preservation.** ``lp_loss(layer(x; W_hat), layer(x; W))`` (squared error summed
   over output channels, averaged over the rest) keeps each layer's output on the defender's
   clean data close to the FP32 layer's. As in BRECQ/MQBench the layer input ``x`` comes from the
   model whose earlier layers are already rounded by EFRAP, the target from the FP32 model.
3. A rounding regulariser ``lam * sum(1 - |2h - 1|^2)`` drives every ``h`` to 0 or 1.

``alpha`` starts at ``logit(W/s - floor(W/s))`` (the soft weight equals the FP32 weight), Adam
``lr=1e-3``, ``iters`` = 10000 steps per layer on random mini-batches of ``batch_size`` = 32 clean
inputs (``r18_4_4.yaml``), ``lam`` = 0.01, error-penalty weight ``penalty`` = 1; the result is
``floor(W/s) + [h >= 0.5]``. The reference also learns the activation step sizes; here the
deployment's calibrated activation ranges and weight scales are kept as they are, so the repaired
artifact has exactly the original's grid.

The result is deployed for real: the ``int8-torch`` artifact is built on the defender's holdout
(``compress``), then the integer weights of each quantized conv / linear are replaced by EFRAP's
(same scales, zero-points and biases) and the artifact is rebuilt from that state dict. A
per-channel ``int4-w`` deployment is repaired on its own grid (4-bit symmetric scales of the
BN-folded weights) and rebuilt as ``int4-w``. An artifact of another precision is a one-line
error.

What it cannot reach: a backdoor carried by the *clipping* of activations. The int8-conditioned
model of the tests (``qcb``, trained from scratch) wakes up because one layer's triggered
activations reach about 3x the top of its calibrated range and are cut back there (int8 weights
with float activations: ASR 0.08; that layer left unclipped: 0.10; see
:func:`backdoorlab.compress.anatomy.quantization_anatomy` and BENCHMARKS.md). Flipping weight
roundings leaves that clip in place, and clean-data reconstruction never sees it (clean
activations stay within the range), so EFRAP leaves that model's int8 ASR at about 0.95.

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


def _linear_op(m: nn.Module):
    """``fwd(x, w)``: layer ``m``'s conv / linear op with weight ``w`` and no bias."""
    if isinstance(m, nn.Conv2d):
        return lambda inp, weight: F.conv2d(inp, weight, None, m.stride, m.padding, m.dilation, m.groups)
    return lambda inp, weight: F.linear(inp, weight)


class _SurrogateLayer:
    """Layer ``k`` (graph order) of the fake-quant surrogate of an int8 FX artifact: ``root`` (the
    whole surrogate), ``layer`` (its float conv / linear), ``post`` (bias, then the rest of the
    quantized module: ReLU if fused, the output activation fake-quant) and ``fp_post`` (bias and
    ReLU only: what the FP32 model applies)."""

    def __init__(self, root: nn.Module, seq: nn.Sequential):
        self.root, self.layer = root, seq[0]
        b = self.layer.bias.detach() if self.layer.bias is not None else None
        shape = (1, -1) + (1,) * (self.layer.weight.ndim - 2)
        rest = nn.Sequential(*list(seq)[1:])
        relu = nn.Sequential(*[m for m in rest if isinstance(m, nn.ReLU)])

        def add_bias(z: torch.Tensor) -> torch.Tensor:
            return z if b is None else z + b.view(shape)

        self.post = lambda z: rest(add_bias(z))
        self.fp_post = lambda z: relu(add_bias(z))


def _surrogate_layer(q: nn.Module, k: int, weight_shape: torch.Size) -> _SurrogateLayer:
    from ...compress.surrogate import fx_surrogate

    root = fx_surrogate(q).eval()
    seqs = [c for c in root.children() if isinstance(c, nn.Sequential) and isinstance(c[0], (nn.Conv2d, nn.Linear))]
    check(k < len(seqs) and seqs[k][0].weight.shape == weight_shape,
          "efrap: the int8 artifact's surrogate does not line up with its quantized layers")
    return _SurrogateLayer(root, seqs[k])


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
    ``iters``: optimisation steps per layer (``batch_size`` inputs each); ``lr``: Adam's; ``lam``:
    rounding regulariser weight; ``penalty``: weight of the error-guided flipping term;
    ``calib_size``: clean images used."""

    name = "efrap"

    def __init__(self, iters: int = 10000, lr: float = 1e-3, lam: float = 0.01, penalty: float = 1.0,
                 calib_size: int = 512, batch_size: int = 32):
        check(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 0,
              f"efrap: iters must be an integer >= 0, got {iters!r}")
        check(isinstance(lr, (int, float)) and lr > 0, f"efrap: lr must be > 0, got {lr!r}")
        check(isinstance(lam, (int, float)) and lam >= 0, f"efrap: lam must be >= 0, got {lam!r}")
        check(isinstance(penalty, (int, float)) and penalty >= 0, f"efrap: penalty must be >= 0, got {penalty!r}")
        check(isinstance(calib_size, int) and not isinstance(calib_size, bool) and calib_size > 0,
              f"efrap: calib_size must be a positive integer, got {calib_size!r}")
        check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0,
              f"efrap: batch_size must be a positive integer, got {batch_size!r}")
        self.iters, self.lr, self.lam, self.penalty = iters, float(lr), float(lam), float(penalty)
        self.batch_size, self.calib_size = batch_size, calib_size

    # ------------------------------------------------------------------ the rounding
    def round_layer(self, w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, fwd, qmin: int = -128,
                    qmax: int = 127, deployed: torch.Tensor | None = None,
                    target: torch.Tensor | None = None, post=None) -> torch.Tensor:
        """Integer weights for one layer. ``w``: folded FP32 weight ``(O, ...)``; ``s``: ``(O,)``
        scales; ``x``: the layer's clean inputs (from the partly repaired model); ``fwd(x, w)``:
        the layer's linear op; ``[qmin, qmax]``: the integer range (int8, or int4's [-8, 7]);
        ``deployed``: the artifact's own integers, the round-to-nearest reference (its BN folding
        may differ from ``w`` in the last float bit, which moves a weight at a rounding tie);
        ``target``: the FP32 layer's output on the same images (default ``fwd(x, w)``);
        ``post``: what the deployment applies to ``fwd(x, w_hat)`` before the next layer (bias,
        ReLU and the output's activation fake-quant for ``int8-torch``; default: nothing)."""
        shape = (-1,) + (1,) * (w.ndim - 1)
        sv = s.view(shape)
        base = torch.floor(w / sv)
        rest = w / sv - base  # in [0, 1)
        ref = torch.round(w / sv) if deployed is None else deployed.float()  # half-to-even, as deployed
        nearest = (ref - base).clamp(0, 1)
        if self.iters == 0:
            return (base + nearest).clamp(qmin, qmax)
        error = (w - sv * (base + nearest)).abs()  # truncation error of nearest rounding, weight units
        flip = 1 - nearest
        p0 = rest.clamp(1e-4, 1 - 1e-4)
        alpha = torch.log(p0 / (1 - p0)).requires_grad_(True)  # sigmoid(alpha) = the FP32 rest
        opt = torch.optim.Adam([alpha], lr=self.lr)
        if target is None:
            with torch.no_grad():
                target = fwd(x, w)
        g = torch.Generator().manual_seed(0)
        bs = min(self.batch_size, len(x))
        for _ in range(self.iters):
            idx = torch.randint(len(x), (bs,), generator=g)  # a random mini-batch per step, as MQBench
            h = torch.sigmoid(alpha)
            wq = sv * torch.clamp(base + h, qmin, qmax)
            out = fwd(x[idx], wq)
            rec = ((out if post is None else post(out)) - target[idx]).pow(2).sum(1).mean()  # lp_loss
            ce = -(flip * torch.log(h + 1e-8) + (1 - flip) * torch.log(1 - h + 1e-8))
            loss = rec + self.penalty * (error * ce).sum() + self.lam * (1 - (2 * h - 1).pow(2)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (base + (alpha >= 0).float()).clamp(qmin, qmax)

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
        fp_inputs = _layer_inputs(sim, layers, x)  # the FP32 (folded) model, before any rounding
        qmin, qmax = qrange(4, True)
        flipped, total = 0, 0
        for m in layers:  # in order; ``sim`` holds the rounded weights of the layers done so far
            w = m.weight.detach().clone()
            s = symmetric_scale(w.reshape(w.shape[0], -1).abs().amax(1), 4)
            op = _linear_op(m)
            with torch.no_grad():
                target = op(fp_inputs[m], w)
            ints = self.round_layer(w, s, _layer_inputs(sim, [m], x)[m], op, qmin, qmax, target=target)
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
                          "efrap_iters": self.iters}

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
        from ...compress.torch_int8 import TorchInt8Config

        info = ctx.clf.info if isinstance(ctx.clf.info, dict) else {}
        spec = {"name": "int8-torch", "backend": info.get("backend", TorchInt8Config.backend)}
        clf = compress(spec, model, calib=ctx.clean, device=ctx.device)
        q = clf.module.inner  # the converted FX GraphModule (DualOutput(q))

        # FP32 inputs of every conv / linear on the clean data (the reconstruction targets); each
        # layer's own input comes from the partly repaired *int8* model, activations quantized as
        # deployed (its fake-quant surrogate, rebuilt after every layer), as in MQBench
        layers = {name: m for name, m in model.named_modules() if isinstance(m, CONV + LINEAR)}
        fp_inputs = _layer_inputs(model, list(layers.values()), x)
        fold = _folded_scale(model)
        qmods = dict(q.named_modules())
        order = [n.target for n in q.graph.nodes
                 if n.op == "call_module" and hasattr(qmods[n.target], "set_weight_bias")]
        changed, total = 0, 0
        with ao_quiet():
            for name, m in layers.items():
                qm = qmods.get(f"model.{name}")
                if qm is None or not hasattr(qm, "set_weight_bias"):
                    continue  # a layer the deployment left in FP32
                wq = qm.weight()
                s = wq.q_per_channel_scales().float()
                a = fold[m]
                shape = (-1,) + (1,) * (m.weight.ndim - 1)
                w = m.weight.detach() * a.view(shape)
                old = wq.int_repr().float()
                op = _linear_op(m)
                with torch.no_grad():
                    target = op(fp_inputs[m], w)
                seq = _surrogate_layer(q, order.index(f"model.{name}"), w.shape)
                xin = _layer_inputs(seq.root, [seq.layer], x)[seq.layer]
                with torch.no_grad():
                    target = seq.fp_post(target)
                ints = self.round_layer(w, s, xin, op, deployed=old, target=target, post=seq.post)
                changed += int((ints != old).sum())  # the artifact rounds to nearest: changed = not nearest
                total += ints.numel()
                new = torch._make_per_channel_quantized_tensor(ints.to(torch.int8), wq.q_per_channel_scales(),
                                                               wq.q_per_channel_zero_points(), wq.q_per_channel_axis())
                qm.set_weight_bias(new, qm.bias())
        art = {**clf.artifact, "state_dict": q.state_dict()}
        repaired = compress(spec, model, calib=ctx.clean, device=ctx.device, artifact=art)
        repaired.info = {**repaired.info, "repair": "efrap"}
        return repaired, {"efrap_changed_weights": changed / max(total, 1),
                          "efrap_not_nearest": changed / max(total, 1), "efrap_layers": len(layers),
                          "efrap_iters": self.iters}


