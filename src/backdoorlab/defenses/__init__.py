"""Defenses run on the deployed :class:`~backdoorlab.classifier.Classifier`.

Subpackages (scanners, detectors, filters, removers) register here; ``none`` is the baseline
that leaves the model as it is.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

DEFENSES: Registry[Any] = Registry("defense")


@DEFENSES.register("none")
def _none() -> None:
    """No defense: the row reports the deployed model's own CA / ASR / RA."""
    return None


__all__ = ["DEFENSES"]
