"""Fixtures for the compression tests.

* ``gtsrb``: the session's small CNN trained with BadNets on the shared GTSRB subset (trained once
  through the cached pipeline, shared with the attack tests), its defender's holdout (the
  calibration set) and the test split. Skips when the archive is absent (fails in CI).
* ``tiny``: an untrained small CNN on random 16x16 images, for cheap unit and smoke tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from backdoorlab.data import TensorData

_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
if not os.environ.get("BACKDOORLAB_DATA") and _SHARED.is_dir():
    os.environ["BACKDOORLAB_DATA"] = str(_SHARED)


@dataclass
class Tiny:
    model: torch.nn.Module
    calib: TensorData
    x: torch.Tensor  # (64, 3, 16, 16) float in [0, 1]


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    from backdoorlab.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "small-cnn", "widths": (8, 16, 32, 64)}, 10, 3, (0.5,), (0.25,)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 16, 16, 3), generator=g, dtype=torch.uint8)
    calib = TensorData(x[:64], torch.zeros(64, dtype=torch.long))
    return Tiny(model, calib, TensorData(x[64:], torch.zeros(32, dtype=torch.long)).float())


@pytest.fixture(scope="session")
def gtsrb():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")
