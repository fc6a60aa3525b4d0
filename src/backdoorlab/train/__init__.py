"""The one training loop and evaluation."""

from .fit import FitResult, FitState, Hook, TrainConfig, accuracy, fit, predict

__all__ = ["FitResult", "FitState", "Hook", "TrainConfig", "accuracy", "fit", "predict"]
