"""Layer bookkeeping shared by the handlers: counting conv/linear layers, describing which run in
int8, and folding BatchNorm into the preceding convolution.

BatchNorm folding (Jacob et al., CVPR 2018, section 3.2; PyTorch
``torch.nn.utils.fusion.fuse_conv_bn_eval``): ``W' = W * gamma / sqrt(var + eps)`` per output
channel, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; exact in eval mode.
"""

from __future__ import annotations

import copy

from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR = (nn.Linear,)


def count_layers(model: nn.Module) -> dict[str, int]:
    """``{"conv": n, "linear": n}`` of the float model."""
    mods = list(model.modules())
    return {"conv": sum(isinstance(m, CONV) for m in mods), "linear": sum(isinstance(m, LINEAR) for m in mods)}


def describe_int8(int8: dict[str, int], total: dict[str, int]) -> str:
    """``"conv:7/7, linear:1/1"`` (how many of each kind run in int8, out of how many)."""
    return ", ".join(f"{k}:{int8.get(k, 0)}/{total[k]}" for k in ("conv", "linear"))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) with every ``Conv -> BatchNorm`` pair that sits consecutively
    in an ``nn.Sequential`` folded into the conv (the BN becomes ``Identity``). Pre-activation
    BNs (BN before conv, as in PreAct-ResNet) cannot be folded into a conv and stay as they are."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model
