"""Model registry. Every factory takes ``num_classes, in_channels, mean, std`` and returns an
:class:`~backdoorlab.models.common.ImageClassifier` with normalisation inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..registry import Registry, split_spec
from .common import ImageClassifier, Normalize

MODELS: Registry[nn.Module] = Registry("model")
DEFAULT_MODEL = "small-cnn"


def _register() -> None:
    from . import mobilenetv2, preact_resnet, small, vgg

    MODELS.register("small-cnn")(small.small_cnn)
    MODELS.register("preact-resnet18")(preact_resnet.preact_resnet18)
    MODELS.register("vgg16-bn")(vgg.vgg16_bn)
    MODELS.register("mobilenetv2")(mobilenetv2.mobilenetv2)


_register()


def build_model(
    spec: str | dict[str, Any],
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> ImageClassifier:
    """Build a registered model; ``spec`` is a name or ``{"name": ..., **params}``."""
    name, params = split_spec(spec)
    return MODELS.build({"name": name, **params}, num_classes=num_classes,
                        in_channels=in_channels, mean=tuple(mean), std=tuple(std))


__all__ = ["DEFAULT_MODEL", "MODELS", "ImageClassifier", "Normalize", "build_model"]
