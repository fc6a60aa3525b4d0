"""The two orders of a repair and a deployment (issue 26, §2).

A repair needs a trainable model; an int8 or int4 artifact is not one. A remover's spec takes
``order``:

* ``fp32-first`` (the default): repair the FP32 model the artifact was deployed from, then deploy
  the repaired model as the cell deploys (``ctx.redeploy``). What a careful engineer does.
* ``deploy-first``: repair the weights **as shipped**, then deploy again. What a repair applied to a
  shipped artifact amounts to: the remover's model is :func:`shipped_model`, a float model of the
  architecture holding the artifact's own weights (dequantised int8 or int4 values, pruned
  zeros), with BatchNorm folded into the convolutions where the artifact folded it. Removers
  that prune BatchNorm channels (Fine-Pruning, ANP, CLP, RNP) find no BatchNorm in a folded
  model and say so in their error row; the others run.

The row says which order ran (``repair_order``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..classifier import Classifier
from ..errors import BackdoorLabError

ORDERS = ("fp32-first", "deploy-first")
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _strip_input_quantizers(model: nn.Module) -> nn.Module:
    """``w4a8`` wraps each conv/linear as ``Sequential(FakeQuant, layer)``: unwrap them (the
    activation quantizers are recalibrated when the repaired model is deployed again)."""
    from ..compress.fakequant import FakeQuant

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Sequential) and len(child) == 2 and isinstance(child[0], FakeQuant)
                    and isinstance(child[1], _WEIGHTED)):
                setattr(parent, name, child[1])
    return model


def _fx_weights(clf: Classifier, model: nn.Module) -> nn.Module:
    """The BN-folded float copy of ``model`` holding the dequantised weights of the FX int8
    artifact ``clf`` (matched by module name)."""
    from ..compress.layers import fold_batchnorm

    folded = fold_batchnorm(copy.deepcopy(model)).float().cpu()
    q = dict(clf.module.named_modules())
    for name, m in folded.named_modules():
        if not isinstance(m, _WEIGHTED):
            continue
        hits = [qm for qn, qm in q.items() if (qn == name or qn.endswith("." + name)) and callable(
            getattr(qm, "weight", None))]
        if len(hits) != 1:
            raise BackdoorLabError(f"deploy-first repair: layer {name} of the {clf.precision} artifact was not "
                                   f"found as one quantized module ({len(hits)} matches); repair fp32-first")
        w, b = hits[0].weight(), hits[0].bias()
        with torch.no_grad():
            m.weight.copy_(w.dequantize().reshape(m.weight.shape))
            if b is not None and m.bias is not None:
                m.bias.copy_(b.detach().float())
    for p in folded.parameters():
        p.requires_grad_(True)
    return folded


def shipped_model(clf: Classifier, model: nn.Module) -> nn.Module:
    """A trainable float model with the weights of the deployed artifact ``clf`` (deployed from
    the FP32 ``model``), for the ``deploy-first`` order (module docstring)."""
    from ..models.common import ImageClassifier

    if clf.precision == "fp32":
        return copy.deepcopy(model)
    module = getattr(clf, "module", None)
    if isinstance(module, ImageClassifier):  # int4-w, w4a8 (simulated), pruned: float modules
        out = _strip_input_quantizers(copy.deepcopy(module)).float()
        for p in out.parameters():
            p.requires_grad_(True)
        return out
    quantized = module is not None and any(callable(getattr(m, "weight", None)) and not isinstance(m, _WEIGHTED)
                                           for m in module.modules())
    if quantized:  # a torch quantized (FX) module: its layers' weight() are int8 tensors
        return _fx_weights(clf, model)
    raise BackdoorLabError(f"deploy-first repair: the {clf.precision} artifact holds no weights a float model of "
                           f"the architecture can take here (an ONNX Runtime graph); repair fp32-first")


__all__ = ["ORDERS", "shipped_model"]
