"""Calibration data: the first ``n`` clean images of the defender's split, as float batches.

Post-training quantisation observes activation ranges on a small clean set (PyTorch
``torch.ao.quantization`` "calibrate" step; ONNX Runtime ``CalibrationDataReader``). The set is
the defender's holdout, which no attack touched; taking the *first* ``n`` keeps it a pure
function of the (already seeded) split, so the cache key of a quantized artifact is
(model, config, calibration split, ``n``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data.tensordata import TensorData
from ..errors import BackdoorLabError


def calibration_images(calib: TensorData | torch.Tensor | None, n: int, who: str) -> torch.Tensor:
    """``(min(n, len), C, H, W)`` float32 in [0, 1]; one-line error when there is nothing."""
    if calib is None:
        raise BackdoorLabError(f"{who} needs calibration images, but none were given (calib=None)")
    x = calib.float() if isinstance(calib, TensorData) else calib
    if x.ndim != 4 or x.shape[0] == 0:
        raise BackdoorLabError(f"{who} needs calibration images, but the calibration set is empty "
                               f"(the defender's holdout has 0 images: raise 'holdout')")
    x = x[:n].float()
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise BackdoorLabError(f"{who}: calibration images must be in [0, 1], got [{float(x.min()):.3g}, "
                               f"{float(x.max()):.3g}]")
    return x.contiguous()


def batches(x: torch.Tensor, batch_size: int = 64) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def input_shape(calib: TensorData | None) -> tuple[int, int, int] | None:
    return tuple(calib.chw) if calib is not None and len(calib) else None  # type: ignore[return-value]
