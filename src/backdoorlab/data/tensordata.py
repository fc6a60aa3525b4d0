"""TensorData: a whole split as two tensors, images and labels.

Images are stored either as ``uint8`` NHWC (compact; what readers and caches hold) or as
``float32`` NCHW in ``[0, 1]`` (the one pixel format at every model boundary, house rule 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorData:
    """``x``: ``(N, H, W, C) uint8`` or ``(N, C, H, W) float32`` in [0, 1]; ``y``: ``(N,) int64``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"images must be 4-D, got shape {tuple(self.x.shape)}")
        if self.x.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 NHWC or float32 NCHW, got {self.x.dtype}")
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError("labels must be 1-D with one label per image")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_uint8(self) -> bool:
        return self.x.dtype == torch.uint8

    @property
    def chw(self) -> tuple[int, int, int]:
        if self.is_uint8:
            n, h, w, c = self.x.shape
            return (c, h, w)
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def float(self) -> torch.Tensor:
        """Images as ``(N, C, H, W) float32`` in [0, 1]."""
        if self.is_uint8:
            return self.x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return self.x

    def as_float(self) -> TensorData:
        return TensorData(self.float(), self.y)

    def as_uint8(self) -> TensorData:
        if self.is_uint8:
            return self
        return TensorData(to_uint8_nhwc(self.x), self.y)

    def subset(self, idx: torch.Tensor) -> TensorData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorData(self.x[idx], self.y[idx])


def to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` float in [0, 1] -> ``(N, H, W, C) uint8`` (rounded, clamped)."""
    return x.clamp(0, 1).mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C) uint8`` -> ``(N, C, H, W)`` float32 in [0, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()
