"""Model registry. Every factory takes ``num_classes, in_channels, mean, std`` and returns an
:class:`~backdoorlab.models.common.ImageClassifier` with normalisation inside."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..config import check_params as check_param_types
from ..errors import check
from ..registry import Registry, split_spec
from .common import ImageClassifier, Normalize

DATASET_PARAMS = ("num_classes", "in_channels", "mean", "std")
"""Factory parameters that :func:`build_model` sets from the dataset; a study cannot set them."""


class ModelRegistry(Registry[nn.Module]):
    """Model factories by name. :meth:`check_params` checks a spec's parameters before anything is
    built: their names, their types (from the factory's annotations) and their values (the
    factory's module-level ``check_params``, registered with it)."""

    def __init__(self) -> None:
        super().__init__("model")
        self._checks: dict[str, Callable[..., None]] = {}

    def add(self, name: str, factory: Callable[..., nn.Module],
            check_values: Callable[..., None] | None = None) -> None:
        self.register(name)(factory)
        if check_values is not None:
            self._checks[name] = check_values

    def check_params(self, name: str, params: Mapping[str, Any]) -> None:
        super().check_params(name, params)
        for key in params:
            check(key not in DATASET_PARAMS,
                  f"model {name!r} parameter {key!r} is set from the dataset; remove it from the model spec")
        check_param_types(self.get(name), params, what=f"model {name!r}")
        if params and name in self._checks:
            self._checks[name](**params)


MODELS = ModelRegistry()
DEFAULT_MODEL = "small-cnn"


def _register() -> None:
    from . import mobilenetv2, preact_resnet, small, vgg

    MODELS.add("small-cnn", small.small_cnn, small.check_params)
    MODELS.add("preact-resnet18", preact_resnet.preact_resnet18)
    MODELS.add("vgg16-bn", vgg.vgg16_bn)
    MODELS.add("mobilenetv2", mobilenetv2.mobilenetv2, mobilenetv2.check_params)


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
