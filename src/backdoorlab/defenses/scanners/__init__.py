"""Model scanners: ``scan(ctx) -> ScanResult``, a model-level verdict and the labels flagged.

Registered here (importing this package registers them in :data:`~backdoorlab.defenses.DEFENSES`):

* ``neural-cleanse``: Neural Cleanse (Wang et al., IEEE S&P 2019), :mod:`.neural_cleanse`.
* ``k-arm``: K-Arm (Shen et al., ICML 2021), bandit-scheduled trigger reverse engineering over
  pre-screened candidate labels, :mod:`.k_arm`.
* ``mm-bd``: MM-BD, the maximum-margin statistic (Wang et al., IEEE S&P 2024), :mod:`.mm_bd`;
  data-free (no clean images).
* ``neuron-inspect``: NeuronInspect, saliency-heatmap features (Huang et al., arXiv:1911.07399),
  :mod:`.neuron_inspect`.
* ``ban``: BAN, adversarial neuron noise on features decoupled by a mask (Xu et al., NeurIPS 2024),
  :mod:`.ban`; trigger-agnostic.
* ``sfd``: SFD / Ex-Ray, symmetric feature differencing of K-Arm's triggers: natural feature or
  injected backdoor (Liu et al., CVPR 2022), :mod:`.sfd`.
* ``calibrated-trigger-inversion``: CTI, per-label triggers that fool the model but not its Pivotal-Tuning
  repair, with 1% trusted data (Lukas & Kerschbaum, "Pick your Poison", arXiv 2305.09671, 2023),
  :mod:`.calibrated_trigger_inversion`.
"""

from __future__ import annotations

from .ban import BAN
from .calibrated_trigger_inversion import CalibratedTriggerInversion
from .k_arm import KArm
from .mm_bd import MMBD
from .neural_cleanse import NeuralCleanse, mad_anomaly
from .neuron_inspect import NeuronInspect
from .sfd import SFD

__all__ = ["BAN", "CalibratedTriggerInversion", "KArm", "MMBD", "NeuralCleanse", "NeuronInspect", "SFD", "mad_anomaly"]
