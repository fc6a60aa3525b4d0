"""Differentiable copies of a deployment that **share the FP32 model's parameters**, for attacks
that train "through" the compressed model (quantization- and pruning-conditioned backdoors).

Unlike the surrogates in :mod:`.surrogate` (frozen replicas of one finished artifact), a
simulation is rebuilt from the live model on every forward: a gradient step on the FP32 weights
moves both the FP32 model and its simulated deployment.

* :class:`QuantSim`: the model traced by ``torch.ao`` FX in QAT mode (``prepare_qat_fx``), so the
  fusion (Conv-BN-ReLU, BatchNorm folded into the conv weight), the quantization points and the
  weight quantizer are the ones ``int8-torch`` deploys with (:mod:`.torch_int8`). The QAT
  modules hold the *same* ``nn.Parameter`` objects as the model (``from_float`` assigns them), and
  run in eval mode, i.e. BatchNorm folded with its running statistics exactly as in deployment.
  Weights: symmetric per-channel fake-quant from the current weights (a moving-average observer
  with averaging constant 1, as Tian et al. use). Activations: per-tensor affine fake-quant whose
  qparams are *calibrated* with the deployment's own observers (``HistogramObserver`` 7-bit for
  ``int8-torch``, MinMax 8-bit for ``int8-ort``) on clean images (:meth:`QuantSim.calibrate`).
  Presets (:data:`PRESETS`): ``int8-torch`` (x86/fbgemm: weights int8 [-128, 127], activations
  quint8 [0, 127]), ``int8-ort`` (ORT ``quantize_static`` with ``reduce_range``: weights
  [-64, 64], activations uint8 [0, 255] MinMax), ``int4-w`` (weights int4 [-8, 7] per channel, FP32
  activations).
* :func:`pruned_params`: the weights of ``prune-l1`` (Han et al. 2015) at a sparsity, masks
  recomputed from the current weights per layer, for :func:`torch.func.functional_call`.

Shapes: every simulation maps ``(N, C, H, W)`` float in [0, 1] to logits ``(N, K)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackdoorLabError
from .layers import CONV, LINEAR


@dataclass(frozen=True)
class QuantPreset:
    """``wq``: weight integer range (symmetric per channel); ``aq``: the activation range the
    calibration observer maps the observed range onto (``None``: activations stay FP32); stored
    activations may use all of quint8 [0, 255] (values above the calibrated range are not clipped
    at ``aq[1]``, as in the fbgemm and ORT kernels); ``observer``: how ranges are calibrated."""

    wq: tuple[int, int]
    aq: tuple[int, int] | None
    observer: str = "histogram"


PRESETS = {
    "int8-torch": QuantPreset((-128, 127), (0, 127), "histogram"),
    "int8-ort": QuantPreset((-64, 64), (0, 255), "minmax"),
    "int4-w": QuantPreset((-8, 7), None),
}


def _qconfig(preset: QuantPreset):
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
    )

    # the fake-quant clamps to the dtype's range: ``reduce_range`` only narrows the *calibrated*
    # range (7-bit scale), the int8 kernels still store activations as quint8 in [0, 255]
    return QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                          dtype=torch.quint8, qscheme=torch.per_tensor_affine),
        weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                      quant_min=preset.wq[0], quant_max=preset.wq[1], dtype=torch.qint8,
                                      qscheme=torch.per_channel_symmetric, ch_axis=0))


def _calib_qconfig(preset: QuantPreset):
    from torch.ao.quantization import HistogramObserver, MinMaxObserver, QConfig, default_per_channel_weight_observer

    aq = preset.aq or (0, 255)
    obs = HistogramObserver if preset.observer == "histogram" else MinMaxObserver
    act = obs.with_args(quant_min=aq[0], quant_max=aq[1], dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    return QConfig(activation=act, weight=default_per_channel_weight_observer)


def _act_modules(gm: nn.Module) -> list[nn.Module]:
    """The activation observers / fake-quants of a prepared FX graph, in graph order."""
    out, seen = [], set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith("activation_post_process"):
            m = gm.get_submodule(n.target)
            if id(m) not in seen:  # shared qparams (max-pool, flatten) reuse one module
                seen.add(id(m))
                out.append(m)
    return out


class QuantSim(nn.Module):
    """Fake-quant simulation of a deployment preset (``int8-torch``, ``int8-ort``, ``int4-w``) of
    ``model``, sharing its parameters. Call :meth:`calibrate` before the first forward when the
    preset quantizes activations (and again whenever the weights have moved noticeably).

    ``batch_stats=False``: BatchNorm is folded with its running statistics, as deployed (for
    fine-tuning a trained model with frozen BN). ``True``: while ``model`` is in training mode the
    simulation is too, so BN folds the batch's statistics and updates the shared running ones
    (Jacob et al. 2018's simulated folding; for training from random initialisation, where the FP32
    forward also normalises with batch statistics and running statistics mean nothing yet)."""

    def __init__(self, model: nn.Module, preset: str | QuantPreset, example: torch.Tensor, batch_stats: bool = False):
        super().__init__()
        self.batch_stats = bool(batch_stats)
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        from .torch_int8 import ao_quiet

        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.model_ref = [model]  # not a submodule: the sim must not own (or re-register) the model
        was = model.training
        model.train()  # prepare_qat_fx needs train mode; it shares the parameters (from_float)
        with ao_quiet():
            try:
                gm = prepare_qat_fx(model, QConfigMapping().set_global(_qconfig(self.preset)),
                                    example_inputs=(example[:1],))
            except Exception as exc:
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BackdoorLabError(f"quantization simulation: the model cannot be traced by torch.fx: {line}") \
                    from None
        model.train(was)
        own = {id(p) for p in model.parameters()}
        if not all(id(p) in own for p in gm.parameters()):
            raise BackdoorLabError("quantization simulation: the traced copy does not share the model's parameters")
        self.gm = gm.eval()
        self._acts = _act_modules(gm)
        for fq in self._acts:
            fq.disable_observer()
            if self.preset.aq is None:
                fq.disable_fake_quant()
        self.calibrated = self.preset.aq is None

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, batch_size: int = 128) -> None:
        """Activation qparams as the deployment's calibration would set them on ``x``
        ``(N, C, H, W)`` float in [0, 1]: the FP32 model (a copy, eval) is prepared with the
        deployment's post-training observers, run on ``x``, and the resulting scales and
        zero-points are copied, in graph order, into this simulation's activation fake-quants."""
        if self.preset.aq is None:
            return
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.quantize_fx import prepare_fx

        from .torch_int8 import ao_quiet

        if not all(bool(torch.isfinite(p).all()) for p in self.model_ref[0].parameters()):
            raise BackdoorLabError("quantization simulation: the model's weights are no longer finite (training "
                                   "diverged); lower the learning rate")
        model = copy.deepcopy(self.model_ref[0]).eval()
        with ao_quiet():
            prepared = prepare_fx(model, QConfigMapping().set_global(_calib_qconfig(self.preset)),
                                  example_inputs=(x[:1],))
            for i in range(0, len(x), batch_size):
                prepared(x[i:i + batch_size])
            obs = _act_modules(prepared)
            if len(obs) != len(self._acts):
                raise BackdoorLabError(f"quantization simulation: {len(obs)} calibration observers but "
                                       f"{len(self._acts)} fake-quant points")
            for o, fq in zip(obs, self._acts):
                scale, zp = o.calculate_qparams()
                fq.scale.resize_(scale.shape).copy_(scale)
                fq.zero_point.resize_(zp.shape).copy_(zp)
        self.calibrated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise BackdoorLabError("quantization simulation: calibrate() before the first forward")
        self.gm.train(self.batch_stats and self.model_ref[0].training)
        return self.gm(x)


def prunable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every conv and linear layer (what ``prune-l1`` prunes)."""
    return [(f"{n}.weight" if n else "weight", m.weight) for n, m in model.named_modules()
            if isinstance(m, CONV + LINEAR)]


def l1_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-layer magnitude masks (1 = kept) at ``sparsity``: the ``round(sparsity * numel)``
    smallest ``|w|`` of each conv/linear weight are dropped, as ``prune.l1_unstructured`` does."""
    out = {}
    for name, w in prunable(model):
        k = int(round(float(sparsity) * w.numel()))
        mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)  # contiguous (w may be channels_last)
        if k > 0:
            idx = torch.topk(w.detach().abs().flatten(), k, largest=False).indices
            mask.view(-1)[idx] = False
        out[name] = mask
    return out


def pruned_params(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """``{name: weight * mask}`` for :func:`torch.func.functional_call`: the live weights with
    the ``prune-l1`` masks at ``sparsity`` (recomputed now; gradient flows to kept weights)."""
    masks = l1_masks(model, sparsity)
    return {name: w * masks[name] for name, w in prunable(model)}
