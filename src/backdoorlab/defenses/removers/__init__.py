"""Removers: ``repair(ctx) -> (Classifier, facts)``, a repaired model deployed as the cell deploys.

Registered here (importing this package registers them in :data:`~backdoorlab.defenses.DEFENSES`):

* ``fine-pruning``: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018), :mod:`.fine_pruning`.
"""

from __future__ import annotations

from .fine_pruning import FinePruning

__all__ = ["FinePruning"]
from .anp import ANP  # noqa: E402,F401  (Wu & Wang, NeurIPS 2021)
from .clp import CLP  # noqa: E402,F401  (Zheng et al., ECCV 2022)
from .efrap import EFRAP  # noqa: E402,F401  (Li et al., CVPR 2024)
from .ft import FineTuning  # noqa: E402,F401  (plain fine-tuning; Liu et al., RAID 2018)
from .ft_sam import FTSAM  # noqa: E402,F401  (Zhu et al., ICCV 2023)
from .i_bau import IBAU  # noqa: E402,F401  (Zeng et al., ICLR 2022)
from .nad import NAD  # noqa: E402,F401  (Li et al., ICLR 2021)
from .rnp import RNP  # noqa: E402,F401  (Li et al., ICML 2023)
from .sau import SAU  # noqa: E402,F401  (Wei et al., NeurIPS 2023)
