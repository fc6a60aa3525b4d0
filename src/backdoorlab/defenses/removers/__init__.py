"""Removers: ``repair(ctx) -> (Classifier, facts)``, a repaired model deployed as the cell deploys.

Registered here (importing this package registers them in :data:`~backdoorlab.defenses.DEFENSES`):

* ``fine-pruning``: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018), :mod:`.fine_pruning`.
* ``neural-polarizer``: Neural Polarizer (Zhu et al., NeurIPS 2023), :mod:`.neural_polarizer`.
* ``cetf-repair``: CETF's BN-Unlearning (Zhou et al., arXiv 2407.05396, 2024), :mod:`.cetf_repair`.
* ``abl``: ABL (Li et al., NeurIPS 2021), :mod:`.abl`; a training-time defense (trains from scratch on the
  received training set, using only the model's architecture).
* ``strategic-retraining``: Strategic retraining (Dhonthi, Hahn, Hashemi, FM 2023), :mod:`.strategic_retraining`;
  ABS finds trojan neurons and reverses their triggers, the model is fine-tuned on the most affected classes'
  stamped images under their correct labels, until ABS finds none.
* ``pivotal-tuning``: Pivotal Tuning (Lukas & Kerschbaum, "Pick your Poison", arXiv 2305.09671, 2023),
  :mod:`.pivotal_tuning`; repair with 1% trusted data.
"""

from __future__ import annotations

from .fine_pruning import FinePruning

__all__ = ["FinePruning"]
from .abl import ABL  # noqa: E402,F401  (Li et al., NeurIPS 2021)
from .anp import ANP  # noqa: E402,F401  (Wu & Wang, NeurIPS 2021)
from .cetf_repair import CETFRepair  # noqa: E402,F401  (Zhou et al., arXiv 2407.05396, 2024)
from .clp import CLP  # noqa: E402,F401  (Zheng et al., ECCV 2022)
from .efrap import EFRAP  # noqa: E402,F401  (Li et al., CVPR 2024)
from .ft import FineTuning  # noqa: E402,F401  (plain fine-tuning; Liu et al., RAID 2018)
from .ft_sam import FTSAM  # noqa: E402,F401  (Zhu et al., ICCV 2023)
from .i_bau import IBAU  # noqa: E402,F401  (Zeng et al., ICLR 2022)
from .nad import NAD  # noqa: E402,F401  (Li et al., ICLR 2021)
from .neural_polarizer import NeuralPolarizer  # noqa: E402,F401  (Zhu et al., NeurIPS 2023)
from .pivotal_tuning import PivotalTuning  # noqa: E402,F401  (Lukas & Kerschbaum, arXiv 2305.09671)
from .rnp import RNP  # noqa: E402,F401  (Li et al., ICML 2023)
from .sau import SAU  # noqa: E402,F401  (Wei et al., NeurIPS 2023)
from .strategic_retraining import StrategicRetraining  # noqa: E402,F401  (Dhonthi et al., FM 2023)
