"""The attack interface: ``poison(train, g) -> PoisonedSplit``, ``apply(x)``, ``train_hook()``.

Every attack is built for a dataset (``info``: image size, channels, classes), so it can check
its settings (target label in range, rate in (0, 1]) before anything runs.

Two axes, kept apart (issue 25):

* the **trigger** is what a subclass implements: :meth:`Attack.apply` (a patch, a blend, a
  warp, a filter, a learned generator ...);
* the **objective** is a setting every attack takes, ``mode``: ``all-to-one`` (every poisoned
  image relabelled ``target``), ``all-to-all`` (``y -> (y + 1) mod K``, Gu et al. 2017, as
  BackdoorBench defines it), ``source-specific`` (only images of the ``sources`` classes are
  poisoned and counted; Liu et al. / Tang et al.'s partial backdoor) and ``clean-label``
  (poisoned images are taken from the ``target`` class and keep their label; Turner et al.,
  Barni et al.). The compression-conditioned attacks take any data-poisoning attack as their
  ``trigger`` (:mod:`~backdoorlab.attacks.conditioned`), so a trigger combines with those
  objectives as well.

What an attack needs beyond the training set is declared, not fetched:

* :meth:`Attack.assets` names costly inputs (a trained model, an encoder, an image pool) as
  specs of the :data:`ASSETS` registry; the pipeline builds each as a cached stage keyed by its
  spec and the content of the data it is built from, and hands them over with
  :meth:`Attack.bind_assets` before :meth:`Attack.poison`;
* a trigger learned while the model trains (Input-aware's generator) is the attack's
  :meth:`Attack.state_dict`, stored with the trained model and restored by
  :meth:`Attack.load_state_dict` on a cache hit or in another process.

Every attack's parameters are its constructor's keyword arguments; the registry turns them into
a frozen, type-checked config dataclass (:func:`backdoorlab.registry.config_class`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import DatasetInfo
from ..data.tensordata import TensorData, from_uint8_nhwc, to_uint8_nhwc
from ..errors import check
from ..registry import Registry
from ..train.fit import Hook, TrainConfig

MODES = ("all-to-one", "all-to-all", "source-specific", "clean-label")


@dataclass
class PoisonedSplit:
    """A training set after poisoning, with the record of what was changed.

    ``data``: the poisoned training set (uint8 NHWC); ``poison_idx``: sorted indices into it
    of the poisoned samples; ``original_labels``: the labels before poisoning.
    """

    data: TensorData
    poison_idx: torch.Tensor
    original_labels: torch.Tensor

    @property
    def is_poisoned(self) -> torch.Tensor:
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_idx] = True
        return mask


class Attack:
    """Base class of data-poisoning attacks.

    Subclasses implement :meth:`apply` (the trigger, on ``(N, C, H, W)`` float in [0, 1]) and
    may override :meth:`poison` and :meth:`train_hook`.
    """

    name = "attack"
    # bumped when the attack's algorithm or one of its defaults changes, so that what it poisoned,
    # built or trained before is not reused from the artifact cache (the keys hold the spec as the
    # user wrote it, not the defaults). None: the key is the spec alone (badnets, blended and the
    # conditioned attacks keep the keys they had); every attack added since issue 25 sets it.
    algo_version: int | None = None
    # the trigger is learned while the victim trains (Input-aware's generator): it exists only with
    # a trained model, so it cannot serve as the fixed trigger of a compression-conditioned attack
    learns_trigger = False

    def __init__(self, info: DatasetInfo, target: int = 0, rate: float = 0.1,
                 mode: str = "all-to-one", sources: list[int] | None = None):
        check(mode in MODES, f"{self.name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        check(isinstance(target, int) and 0 <= target < info.num_classes,
              f"{self.name}: target label must be an integer in [0, {info.num_classes - 1}] for "
              f"{info.name}, got {target!r}")
        check(isinstance(rate, (int, float)) and 0 < rate <= 1,
              f"{self.name}: poisoning rate must be in (0, 1], got {rate!r}")
        if mode == "source-specific":
            check(isinstance(sources, list) and len(sources) > 0
                  and all(isinstance(c, int) and 0 <= c < info.num_classes and c != target for c in sources),
                  f"{self.name}: mode source-specific needs 'sources', a list of class labels in "
                  f"[0, {info.num_classes - 1}] other than the target {target}, got {sources!r}")
        else:
            check(sources is None, f"{self.name}: 'sources' is for mode source-specific only (mode is {mode})")
        self.info = info
        self.target = int(target)
        self.rate = float(rate)
        self.mode = mode
        self.sources = tuple(sorted(set(sources))) if sources else ()

    # --- labels -------------------------------------------------------------------------
    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for each triggered image (``all-to-all``: ``(y + 1) mod K``;
        otherwise ``target``)."""
        if self.mode == "all-to-all":
            return (y + 1) % self.info.num_classes
        return torch.full_like(y, self.target)

    def in_scope(self, y: torch.Tensor) -> torch.Tensor:
        """Which images the backdoor is meant to act on: the ``sources`` classes for a
        source-specific objective, every image otherwise."""
        if self.mode == "source-specific":
            return torch.isin(y, torch.tensor(self.sources, dtype=y.dtype))
        return torch.ones_like(y, dtype=torch.bool)

    def counted(self, y: torch.Tensor) -> torch.Tensor:
        """Which test images count for ASR/RA: those in scope whose label the trigger must change."""
        return (self.target_labels(y) != y) & self.in_scope(y)

    # --- trigger ------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the test-time trigger on ``(N, C, H, W)`` float images in [0, 1]."""
        raise NotImplementedError

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Indices that may be poisoned: images the trigger must move (all-to-one: not already of
        the target class; source-specific: of a source class), or, for a clean-label objective,
        images of the target class (they keep their label)."""
        if self.mode == "clean-label":
            return torch.nonzero(y == self.target).flatten()
        return torch.nonzero(self.counted(y)).flatten()

    def poison(self, train: TensorData, g: torch.Generator) -> PoisonedSplit:
        """Poison ``round(rate * N)`` random training samples (``N`` the whole training set, as
        BackdoorBench counts every objective's rate): trigger + target label (a clean-label
        objective's images are of the target class already and keep it)."""
        data = train.as_uint8()
        cand = self.candidates(data.y)
        k = int(round(self.rate * len(data)))
        check(k <= len(cand), f"{self.name}: rate {self.rate} asks for {k} poisoned images but only "
                              f"{len(cand)} training images can be poisoned")
        idx = torch.sort(cand[torch.randperm(len(cand), generator=g)[:k]]).values
        x = data.x.clone()
        y = data.y.clone()
        if k:
            x[idx] = to_uint8_nhwc(self.apply(from_uint8_nhwc(x[idx])))
            y[idx] = self.target_labels(data.y[idx])
        return PoisonedSplit(TensorData(x, y), idx, data.y.clone())

    # --- what it needs, what it learns ---------------------------------------------------------
    def assets(self) -> dict[str, Any]:
        """Costly inputs this attack needs, ``{name: asset spec}`` (see :data:`ASSETS`); built and
        cached by the pipeline, handed over by :meth:`bind_assets` before :meth:`poison`."""
        return {}

    def bind_assets(self, assets: dict[str, dict[str, torch.Tensor]]) -> None:
        """Receive the built assets (tensors by name, per asset), as :meth:`assets` declared them."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trigger state learned during training (stored with the trained model); none here."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (after a cache hit, or in another process)."""
        check(not state, f"{self.name}: this attack learns no trigger state, got {sorted(state)}")

    def files(self) -> dict[str, Path]:
        """Files this attack reads, by parameter name (e.g. Blended's ``pattern`` image). Their
        content fingerprints enter the cell's run id and cache keys, so a changed file is new work."""
        return {}

    def datasets(self) -> dict[str, str]:
        """Other datasets this attack's assets read, by parameter name (e.g. Refool's
        ``reflections``). They are located like the cell's dataset (the study's ``--data`` first),
        and their content fingerprints enter the cell's run id and cache keys."""
        return {}

    def train_hook(self) -> Hook | None:
        """A :class:`~backdoorlab.train.fit.Hook` for attacks that change training; ``None`` here."""
        return None

    def init_from(self) -> str | dict | None:
        """Two-phase attacks: the attack spec whose model (trained with the same cell settings)
        this attack's training starts from, or ``None`` (train from scratch, the default)."""
        return None

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The training config of this attack's own phase, given the cell's (unchanged here)."""
        return base


ATTACKS: Registry[Attack] = Registry("attack")


@dataclass
class AssetContext:
    """What an asset builder gets: the training split the attacker poisons (before poisoning,
    uint8 NHWC), the dataset's facts, a seeded generator, the device, and ``model(attack_spec)``,
    which returns the model the pipeline trains for that attack with the cell's settings (for
    example ``model("none")``: a clean model of the same architecture, from the artifact cache),
    and ``dataset(name)``, which loads another dataset the attack declared in
    :meth:`Attack.datasets`, located as the study locates its own (``--data`` first)."""

    train: TensorData
    info: DatasetInfo
    generator: torch.Generator
    device: torch.device
    model: Any  # Callable[[str | dict], nn.Module]
    dataset: Any = None  # Callable[[str], DataBundle]

    def load(self, name: str):
        """Dataset ``name`` (an attack's :meth:`Attack.datasets`), as the pipeline locates it."""
        if self.dataset is not None:
            return self.dataset(name)
        from ..data.datasets import load_dataset

        return load_dataset(name)


ASSETS: Registry[Any] = Registry("asset")
"""Asset builders by name: ``builder(ctx: AssetContext, **params) -> dict[str, Tensor]``. An
attack declares ``{"my-pool": {"name": "refool-pool", "size": 200}}`` in :meth:`Attack.assets`; the
pipeline caches each result under stage ``asset`` keyed by the spec, the cell's dataset, its
files' fingerprints and seed (and the trained model's key where ``ctx.model`` is used)."""
