"""The four kinds of defense, and what each may see.

Every defense runs on a deployed :class:`~backdoorlab.classifier.Classifier` (``fp32``,
``int8-torch``, ``int8-ort``, ...). It declares what it needs:

* ``black_box``: capabilities read from the artifact itself (predictions are always available;
  ``FEATURES`` for activations). These run on the deployed artifact, never on a stand-in.
* ``white_box``: capabilities that need gradients (``GRAD``). Where the artifact lacks them the
  defense runs that part on ``clf.surrogate``, the fake-quant copy that reproduces the artifact's
  numerics; :func:`pick` makes that choice and says which ran.

A defense that cannot run raises :class:`~backdoorlab.errors.BackdoorLabError`; the study records
``status=error`` with the reason. An error is never scored as "not detected".

Kinds (``DESIGN.md``):

* :class:`Scanner` ``scan(ctx) -> ScanResult``: model-level verdict and flagged labels.
* :class:`Detector` ``fit(ctx)`` then ``score(clf, x) -> (N,)``: higher = more likely triggered.
* :class:`Filter` ``filter(ctx) -> FilterResult``: per-sample poison scores over the training set.
* :class:`Remover` ``repair(ctx) -> Classifier``: a repaired model, deployed as the cell deploys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..classifier import Capability, Classifier
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError
from ..registry import Registry, split_spec


@dataclass
class DefenseContext:
    """Everything a defense may use. Images are ``TensorData`` (uint8 NHWC or float NCHW).

    ``clf``: the deployed artifact. ``clean``: the defender's clean holdout (5% of the training
    set by default, disjoint from the poisoned samples). ``train``: the training set as the
    victim received it (possibly poisoned; for filters). ``model``: the FP32 model the artifact
    was deployed from (for removers, which must retrain). ``redeploy(model)``: compresses a
    repaired FP32 model exactly as the cell's artifact was compressed (recalibrating on
    ``clean``). ``generator``: the only source of randomness. ``retrain(keep)``: the victim's
    model trained again from scratch with the cell's recipe on the training samples where the
    ``(N,)`` bool ``keep`` is true (a filter's retraining step); it returns ``None`` where the
    attack poisons during training (a training hook) rather than in the data.
    """

    clf: Classifier
    clean: TensorData
    num_classes: int
    generator: torch.Generator
    device: torch.device = torch.device("cpu")
    train: TensorData | None = None
    model: nn.Module | None = None
    redeploy: Callable[[nn.Module], Classifier] | None = None
    progress: bool = False
    retrain: Callable[[torch.Tensor], nn.Module | None] | None = None

    def deploy(self, model: nn.Module) -> Classifier:
        """A remover's repaired FP32 ``model`` deployed as the cell deploys (``redeploy``), or as
        a plain torch classifier where there is none."""
        from ..classifier import TorchClassifier

        model = model.float().eval()
        if self.redeploy is not None:
            return self.redeploy(model)
        return TorchClassifier(model, device=self.device)


def pick(clf: Classifier, *caps: Capability, who: str) -> tuple[Classifier, str]:
    """The classifier to run a part of a defense that needs ``caps`` on, and its name.

    Returns ``(clf, "artifact")`` if the artifact has them, else ``(clf.surrogate, "surrogate")``
    if the surrogate has them, else raises a one-line error naming what is missing.
    """
    need = set(caps)
    if need <= set(clf.capabilities):
        return clf, "artifact"
    sur = clf.surrogate
    if sur is not None and need <= set(sur.capabilities):
        return sur, "surrogate"
    missing = ", ".join(sorted(c.value for c in need - set(clf.capabilities)))
    raise BackdoorLabError(f"{who} needs {missing}, which the {clf.precision} artifact lacks and no "
                           f"surrogate provides")


@dataclass
class ScanResult:
    """A model scanner's verdict.

    ``flagged``: labels judged infected; ``score``: one continuous suspicion score (higher = more
    suspicious); ``per_label``: a score per label (e.g. Neural Cleanse's anomaly index);
    ``images``: named ``(K, C, H, W)`` float tensors in [0, 1] (e.g. reversed masks and patterns);
    ``metrics``: further numbers for the row.
    """

    flagged: list[int]
    score: float
    per_label: list[float] = field(default_factory=list)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterResult:
    """A training-data filter's output over ``N`` training samples.

    ``scores``: ``(N,)`` float, higher = more likely poisoned; ``removed``: ``(N,)`` bool, the
    samples the method would drop; ``flagged``: classes judged poisoned (empty if the method makes
    no class-level decision); ``detected``: the method's own verdict, ``None`` if it makes none.
    """

    scores: torch.Tensor
    removed: torch.Tensor
    flagged: list[int] = field(default_factory=list)
    detected: bool | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class Defense:
    """Base class. Subclasses set ``name``, ``kind``, ``black_box``, ``white_box`` and validate
    their hyperparameters in ``__init__`` with :func:`~backdoorlab.errors.check`."""

    name: ClassVar[str] = "defense"
    kind: ClassVar[str] = "defense"
    black_box: ClassVar[frozenset[Capability]] = frozenset()
    white_box: ClassVar[frozenset[Capability]] = frozenset()


class Scanner(Defense):
    kind = "scanner"

    def scan(self, ctx: DefenseContext) -> ScanResult:
        raise NotImplementedError


class Detector(Defense):
    """``fit`` sets ``threshold`` from the defender's clean data; inputs scoring above it are
    flagged as triggered."""

    kind = "detector"
    threshold: float = float("nan")

    def fit(self, ctx: DefenseContext) -> None:
        raise NotImplementedError

    def score(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)`` float in [0, 1] -> ``(N,)`` float, higher = more suspicious."""
        raise NotImplementedError


class Filter(Defense):
    """``minority_assumption``: the method finds poison as the minority of its class (Activation
    Clustering's small cluster, Spectral Signatures' outliers); where the ground truth says the
    poison is the majority of the target class, the row carries no verdict and says why."""

    kind = "filter"
    minority_assumption: ClassVar[bool] = False
    # retrain on the kept samples and report CA / ASR after it (the option ``retrain`` every filter
    # takes; the default is the paper's: Spectral Signatures retrains, see the subclass)
    retrain: bool = False

    def filter(self, ctx: DefenseContext) -> FilterResult:
        raise NotImplementedError


class Remover(Defense):
    """``repair(ctx)`` works on ``ctx.model``: in the ``fp32-first`` order (``order``, see
    :mod:`.order`) the FP32 model, in ``deploy-first`` the weights as shipped."""

    kind = "remover"
    order: str = "fp32-first"
    # the dormant-backdoor measurement's settings: "default" (Dormancy()), a Dormancy, or None (off)
    dormancy: Any = "default"

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        """Return the repaired model as deployed, and facts about the repair for the row."""
        raise NotImplementedError


class DefenseRegistry(Registry[Any]):
    """Defense classes by name; ``validate(spec)`` builds the defense, so hyperparameter values
    are checked (cheaply, without running anything) before a study starts.

    Every remover also takes ``order`` (``fp32-first``, the default, or ``deploy-first``; see
    :mod:`.order`) and ``dormancy`` (``false``, or the settings of the dormant-backdoor
    measurement, :class:`~.dormant.Dormancy`): they are set on the built remover, not passed to
    its ``__init__``, and enter the run id like any parameter. Every filter likewise takes
    ``retrain`` (true or false): train the victim's model again on the samples it keeps and report
    CA / ASR after that (the last step of Spectral Signatures' paper, its default there)."""

    # options every remover takes, set on the built remover rather than passed to its __init__
    REMOVER_OPTIONS = ("order", "dormancy")
    FILTER_OPTIONS = ("retrain",)

    def _split_options(self, spec: Any) -> tuple[Any, dict[str, Any]]:
        from .dormant import dormancy_settings
        from .order import ORDERS

        name, params = split_spec(spec)
        if "retrain" in params:
            cls = self.get(name)
            if not (isinstance(cls, type) and issubclass(cls, Filter)):
                raise BackdoorLabError(f"defense {name!r}: retrain applies to training-data filters only")
            if not isinstance(params["retrain"], bool):
                raise BackdoorLabError(f"defense {name!r}: retrain must be true or false, got {params['retrain']!r}")
            return {"name": name, **{k: v for k, v in params.items() if k != "retrain"}}, {"retrain": params["retrain"]}
        opts = {k: params[k] for k in self.REMOVER_OPTIONS if k in params}
        if not opts:
            return spec, {}
        cls = self.get(name)
        if not (isinstance(cls, type) and issubclass(cls, Remover)):
            raise BackdoorLabError(f"defense {name!r}: {', '.join(opts)} applies to removers only")
        out: dict[str, Any] = {}
        if "order" in opts:
            if opts["order"] not in ORDERS:
                raise BackdoorLabError(f"defense {name!r}: order must be one of {', '.join(ORDERS)}, "
                                       f"got {opts['order']!r}")
            out["order"] = opts["order"]
        if "dormancy" in opts:
            out["dormancy"] = dormancy_settings(opts["dormancy"], f"defense {name!r}: dormancy")
        return {"name": name, **{k: v for k, v in params.items() if k not in opts}}, out

    def check_params(self, name: str, params: Any) -> None:
        skip = (*self.REMOVER_OPTIONS, *self.FILTER_OPTIONS)
        super().check_params(name, {k: v for k, v in params.items() if k not in skip})

    def build(self, spec: Any, **extra: Any) -> Any:
        spec, opts = self._split_options(spec)
        obj = super().build(spec, **extra)
        for k, v in opts.items():
            setattr(obj, k, v)
        return obj

    def validate(self, spec: Any) -> None:
        name, params = split_spec(spec)
        self.check_params(name, params)
        self.build(spec)


DEFENSES = DefenseRegistry("defense")
