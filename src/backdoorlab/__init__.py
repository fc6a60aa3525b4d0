"""backdoorlab: backdoor attacks and defenses for image classifiers as they are deployed.

Importing the package has no side effects (no disk, network, CUDA or RNG use). The public API
is re-exported lazily from its subpackages.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BackdoorLabError": "backdoorlab.errors",
    "load_dataset": "backdoorlab.data",
    "TensorData": "backdoorlab.data",
    "build_model": "backdoorlab.models",
    "MODELS": "backdoorlab.models",
    "ATTACKS": "backdoorlab.attacks",
    "DATASETS": "backdoorlab.data",
    "fit": "backdoorlab.train",
    "TrainConfig": "backdoorlab.train",
    "TorchClassifier": "backdoorlab.classifier",
    "Classifier": "backdoorlab.classifier",
    "evaluate": "backdoorlab.bench.pipeline",
    "Study": "backdoorlab.bench.study",
    "run_study": "backdoorlab.bench.pipeline",
    "ResultStore": "backdoorlab.bench.store",
    "scan": "backdoorlab.scanning",
    "ScanReport": "backdoorlab.scanning",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'backdoorlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
