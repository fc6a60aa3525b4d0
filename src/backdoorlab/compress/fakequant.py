"""The one fake-quantisation implementation (quantise then dequantise, in float).

Every simulated integer format in backdoorlab goes through :func:`fake_quant`: INT4 weights
(``int4-w``), 8-bit activations (``w4a8``), and the differentiable surrogates of the INT8
artifacts (``int8-torch``, ``int8-ort``, ``int8-dynamic``), which plug in the artifact's own
scales and zero-points.

The affine scheme (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018; PyTorch ``torch.ao.quantization`` observers;
ONNX ``QuantizeLinear``): ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``,
``x_hat = (q - zero_point) * scale``, with round-half-to-even. The gradient is the
straight-through estimator (Bengio et al. 2013): identity inside ``[qmin, qmax]``, zero
outside, as PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` define it.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit type: ``(-2^(b-1), 2^(b-1)-1)`` or ``(0, 2^b - 1)``."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantise-dequantise ``x`` (any shape, float32).

    ``scale``/``zero_point``: 0-d (or 1-element) tensors for per-tensor, or 1-D of length
    ``x.shape[axis]`` for per-channel along ``axis``. Differentiable (straight-through).
    """
    scale = scale.to(x.device, torch.float32)
    zero_point = zero_point.to(x.device, torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero_point.reshape(-1), axis, qmin, qmax)


def symmetric_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale of symmetric signed quantisation, as PyTorch's symmetric observers compute it:
    ``absmax / ((qmax - qmin) / 2)``, floored at float32 eps."""
    qmin, qmax = qrange(bits, True)
    return (absmax.float() / ((qmax - qmin) / 2)).clamp_min(_EPS)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned ``(scale, zero_point)`` covering ``[min(lo, 0), max(hi, 0)]``
    (MinMax calibration; the range always contains 0 so that 0 is exact)."""
    qmin, qmax = qrange(bits, False)
    lo, hi = torch.minimum(lo.float(), torch.zeros(())), torch.maximum(hi.float(), torch.zeros(()))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric weight-only fake-quant of ``w`` ``(O, ...)``: per output channel
    (``group_size=None``) or per group of ``group_size`` consecutive input weights of each
    output channel (over the flattened ``I * kh * kw`` row; the last group may be shorter).

    Returns ``(w_hat, scale)``: ``w_hat`` has ``w``'s shape and at most ``2^bits`` distinct
    values per channel (or group); ``scale`` is ``(O,)`` or ``(O, n_groups)``.
    """
    qmin, qmax = qrange(bits, True)
    o = w.shape[0]
    rows = w.detach().reshape(o, -1).float()
    k = rows.shape[1]
    if group_size is None or group_size >= k:
        scale = symmetric_scale(rows.abs().amax(1), bits)
        w_hat = fake_quant(rows, scale, torch.zeros(o, dtype=torch.int32), qmin, qmax, axis=0)
        return w_hat.reshape(w.shape).to(w.dtype), scale
    n_groups = -(-k // group_size)
    padded = torch.zeros(o, n_groups * group_size, dtype=rows.dtype, device=rows.device)
    padded[:, :k] = rows
    groups = padded.reshape(o * n_groups, group_size)
    scale = symmetric_scale(groups.abs().amax(1), bits)
    w_hat = fake_quant(groups, scale, torch.zeros_like(scale, dtype=torch.int32), qmin, qmax, axis=0)
    return w_hat.reshape(o, -1)[:, :k].reshape(w.shape).to(w.dtype), scale.reshape(o, n_groups)


class FakeQuant(nn.Module):
    """Per-tensor (or per-channel along ``axis``) fake-quant with fixed qparams.

    With ``observe=True`` it records the running min/max of what passes through (MinMax
    calibration) and leaves the input unchanged; :meth:`freeze` then sets asymmetric qparams
    for ``bits``-bit unsigned activations and turns quantisation on.
    """

    def __init__(self, scale: torch.Tensor | float = 1.0, zero_point: torch.Tensor | int = 0,
                 qmin: int = 0, qmax: int = 255, axis: int | None = None, observe: bool = False, bits: int = 8):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
        self.register_buffer("zero_point", torch.as_tensor(zero_point, dtype=torch.int32).detach().clone())
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.qmin, self.qmax, self.axis, self.observe, self.bits = int(qmin), int(qmax), axis, observe, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self.lo = torch.minimum(self.lo, x.detach().min().float())
            self.hi = torch.maximum(self.hi, x.detach().max().float())
            return x
        return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def freeze(self) -> None:
        """End calibration: asymmetric ``bits``-bit qparams from the observed range."""
        if torch.isfinite(self.lo) and torch.isfinite(self.hi):
            scale, zp = affine_qparams(self.lo.cpu(), self.hi.cpu(), self.bits)
            self.scale, self.zero_point = scale.to(self.scale.device), zp.to(self.zero_point.device)
        self.qmin, self.qmax = qrange(self.bits, False)
        self.observe = False

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{kind}, q=[{self.qmin}, {self.qmax}], observe={self.observe}"


class DynamicFakeQuant(nn.Module):
    """Dynamic activation fake-quant: per call, unsigned 8-bit qparams from the batch's own
    min/max (``torch._choose_qparams_per_tensor``, the rule fbgemm's dynamic linear applies,
    with ``reduce_range`` = 7-bit as PyTorch's ``quantize_dynamic`` Linear uses on x86)."""

    def __init__(self, reduce_range: bool = True):
        super().__init__()
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = torch._choose_qparams_per_tensor(x.detach().float().cpu(), self.reduce_range)
        return fake_quant(x, torch.tensor(scale), torch.tensor(zp), 0, 255)
