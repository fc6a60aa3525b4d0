"""CLP: Channel Lipschitzness-based Pruning (Zheng, Tang, Li & Liu, "Data-free Backdoor Removal
based on Channel Lipschitzness", ECCV 2022, arXiv:2208.03111; code:
rkteddy/channel-Lipschitzness-based-pruning).

A backdoor needs a few channels that react very strongly to a small trigger: channels with a
large Lipschitz constant from their input to their output. CLP measures, *without any data*, an
upper bound of each channel's Lipschitz constant (the UCLC): for the ``k``-th output channel of a
``Conv2d -> BatchNorm2d`` pair, the spectral norm of the channel's kernel reshaped to
``(C_in / groups, kh * kw)`` times the BN's scale ``|γ_k| / σ_k``,

    UCLC_k = |γ_k / σ_k| · ||W_k||_2,

and, within each layer, prunes the channels whose UCLC exceeds ``mean + u · std`` of that layer's
UCLCs (``u=3``, the paper's default and BackdoorBench's ``config/defense/clp``). No fine-tuning
follows.

Here:

* **No data at all.** The method reads only the FP32 model's weights (``ctx.model``); it never
  touches ``ctx.clean``, ``ctx.train``, the artifact or the generator. (Deploying the repaired model
  as the cell deploys, ``ctx.redeploy``, may calibrate int8 on the holdout: that is the
  deployment, not the defense.)
* **Which channels.** The conv that feeds a BN is read from the model's ``torch.fx`` graph. The
  reference code pairs each BN with the last ``Conv2d`` *registered* before it, which for
  PreAct-ResNet pairs a block's ``bn1`` (whose input is a residual sum) with the previous block's
  ``conv2`` or shortcut. Here BNs that do not directly follow a conv (PreAct-ResNet18's ``bn1`` of
  every block but the first, and its final BN) are left out: their channels have no kernel of
  their own. Every conv-BN channel of small-cnn, VGG-16-BN and MobileNetV2 (depthwise included:
  the kernel is ``1 x 9``) is scored.
* **σ_k = sqrt(running_var + eps)**, the BN's actual scale (the reference omits ``eps``).
* **A pruned channel is exactly zero.** The reference zeroes the BN's weight and bias; here its
  running statistics and, where the conv feeds only this BN, the conv filter are reset too, so the
  channel stays 0 after int8 deployment and ONNX export (:mod:`.neuron_pruning`).
* ``std`` is the unbiased sample standard deviation, as ``torch.Tensor.std`` in the reference.

Works on every registered architecture. Shapes: conv kernels ``(C_out, C_in / groups, kh, kw)``;
UCLCs ``(C_out,)`` per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...classifier import Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Remover
from .neuron_pruning import BNUnit, bn_units, check_number, fp32_copy, prune_units_


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC ``(C_out,)``: spectral norm of each output channel's kernel times ``|γ| / σ``."""
    w = conv.weight.detach().float()
    k = w.reshape(w.shape[0], w.shape[1], -1)  # (C_out, C_in / groups, kh * kw)
    scale = (bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)).abs()
    return torch.linalg.matrix_norm(k.cpu(), ord=2) * scale.cpu()


@DEFENSES.register("clp")
class CLP(Remover):
    """Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): data-free.

    ``u``: prune, within each conv-BN layer, the channels whose UCLC exceeds the layer's
    ``mean + u * std`` (paper: 3; smaller prunes more).
    """

    name = "clp"

    def __init__(self, u: float = 3.0):
        check_number("clp", "u", u, 0)
        self.u = float(u)

    def prune(self, ctx: DefenseContext) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
        """The pruned FP32 copy of ``ctx.model``, the pruned channels by BN name and facts."""
        model = fp32_copy(ctx, "clp").eval()
        named = dict(model.named_modules())
        units: list[BNUnit] = [u for u in bn_units(model, "clp") if u.conv is not None]
        check(bool(units), f"clp: found no Conv2d -> BatchNorm2d pair in {type(model).__name__} (the model "
                           f"must be traceable by torch.fx)")
        pruned: dict[str, torch.Tensor] = {}
        for unit in units:
            lips = channel_lipschitz(named[unit.conv], named[unit.bn])
            if len(lips) < 2:
                continue  # no spread to compare with
            idx = (lips > lips.mean() + self.u * lips.std()).nonzero().flatten()
            if len(idx):
                pruned[unit.bn] = idx
        prune_units_(model, units, pruned)
        n = sum(len(v) for v in pruned.values())
        facts = {"channels_pruned": n, "channels_total": sum(u.channels for u in units),
                 "layers_pruned": len(pruned), "layers_total": len(units), "clp_u": self.u}
        return model.eval(), pruned, facts

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        model, _, facts = self.prune(ctx)
        return ctx.deploy(model), facts


__all__ = ["CLP", "channel_lipschitz"]
