"""Poisoning on the fly: the training-control attacks (WaNet, Input-aware) backdoor a share of every
training batch inside :func:`~backdoorlab.train.fit.fit`'s loop (their :meth:`Attack.train_hook`),
not a fixed set of training images. Each epoch draws new batches, so every image is backdoored in
some epochs and clean in others, as in the papers' code (Nguyen & Tran 2020, 2021; BackdoorBench).

Such an attack's :meth:`Attack.poison` returns the clean split with no recorded indices (as the
compression-conditioned attacks do): no training image is poisoned for good, and what the
victim's training set holds is clean.

Per batch of ``B`` images (already shuffled and augmented by ``fit``):

* ``n_bd = int(rate * B)`` backdoor samples (the papers' ``int(bs * pratio)``; when ``rate * B < 1``
  one sample with probability ``rate * B``, as BackdoorBench's ``generalize_to_lower_pratio``),
  taken from the batch's images that the objective may poison (:meth:`Attack.candidates`: not
  already of the target class for all-to-one, of a source class for source-specific, of the
  target class for clean-label), triggered and relabelled with :meth:`Attack.target_labels`;
* ``n_cross`` cross / noise-mode samples from the remaining images, which keep their labels.
"""

from __future__ import annotations

import torch

from .base import Attack


def per_batch(rate: float, batch: int, g: torch.Generator) -> int:
    """How many of ``batch`` images get a role drawn at ``rate``: ``int(rate * batch)``, or, when
    that is below one image, one image with probability ``rate * batch`` (drawn from ``g``)."""
    want = rate * batch
    if want >= 1:
        return int(want)
    return int(bool(torch.rand((), generator=g) < want))


def batch_roles(attack: Attack, y: torch.Tensor, n_bd: int, n_cross: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in a shuffled batch with labels ``y`` of the backdoor samples (the first ``n_bd``
    the objective may poison) and of the cross samples (the first ``n_cross`` of the others).
    Returns two ``int64`` index tensors on ``y``'s device."""
    cand = torch.zeros_like(y, dtype=torch.bool)
    cand[attack.candidates(y.cpu()).to(y.device)] = True
    pos = torch.arange(len(y), device=y.device)
    bd = pos[cand][:n_bd]
    rest = torch.ones_like(cand)
    rest[bd] = False
    return bd, pos[rest][:n_cross]
