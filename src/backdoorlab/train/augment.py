"""Batched augmentation on whole-batch tensors (airbench style): no per-image Python loop.

Both functions take ``(N, C, H, W)`` float tensors and a CPU ``torch.Generator``; the random
parameters are drawn on the CPU so results do not depend on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` (reflect) and take a random ``H x W`` crop per image."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    mode = "reflect" if pad < min(h, w) else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    nidx = torch.arange(n, device=x.device)[:, None, None, None]
    cidx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[nidx, cidx, rows, cols]


def random_hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=g) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _factors(n: int, strength: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    lo = max(0.0, 1.0 - strength)
    return (lo + (1.0 + strength - lo) * torch.rand(n, generator=g)).to(device).view(n, 1, 1, 1)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, g: torch.Generator) -> torch.Tensor:
    """Per-image brightness then contrast jitter with torchvision ``ColorJitter`` semantics: each
    factor is uniform in ``[max(0, 1 - s), 1 + s]``; brightness scales the image towards black,
    contrast blends it with the mean of its grayscale (ITU-R 601-2 luma for RGB), and both clamp
    to [0, 1]. Unlike torchvision the order is fixed (brightness first), so one generator draw
    order holds on every device. ``x`` is ``(N, C, H, W)`` float in [0, 1]."""
    n = x.shape[0]
    if brightness > 0:
        x = (x * _factors(n, brightness, g, x.device)).clamp_(0.0, 1.0)
    if contrast > 0:
        if x.shape[1] == 3:
            luma = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            gray = (x * luma).sum(1, keepdim=True)
        else:
            gray = x.mean(1, keepdim=True)
        mean = gray.mean((1, 2, 3), keepdim=True)
        x = (mean + _factors(n, contrast, g, x.device) * (x - mean)).clamp_(0.0, 1.0)
    return x
