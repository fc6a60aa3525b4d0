"""Training-data filters: ``filter(ctx) -> FilterResult``, per-sample poison scores over ``ctx.train``.

Registered here (importing this package registers them in :data:`~backdoorlab.defenses.DEFENSES`):

* ``activation-clustering``: Activation Clustering (Chen et al., 2019), :mod:`.activation_clustering`.
* ``spectral-signatures``: Spectral Signatures (Tran, Li, Madry, NeurIPS 2018), :mod:`.spectral_signatures`.
* ``scan-filter``: SCAn (Tang, Wang, Tang, Zhang, USENIX Security 2021), :mod:`.scan_filter`; named so as
  not to clash with the ``scan`` command.
* ``spectre``: SPECTRE (Hayase, Kong, Somani, Oh, ICML 2021), :mod:`.spectre`.
* ``abl-isolation``: ABL's backdoor isolation (Li et al., NeurIPS 2021), :mod:`.abl`; trains a fresh model
  of the architecture on the training set and reads nothing from the artifact.
* ``beatrix``: Beatrix (Ma, Wang, Sun, Xue, Wen, Xiang, NDSS 2023), :mod:`.beatrix`; reads the last
  convolutional feature map (the artifact's own where its forward is PyTorch, else its surrogate's).

All read the deployed artifact's penultimate features (``FEATURES``, black box).
"""

from __future__ import annotations

from .activation_clustering import ActivationClustering
from .beatrix import Beatrix  # noqa: F401  (Ma et al., NDSS 2023)
from .scan_filter import SCAnFilter
from .spectral_signatures import SpectralSignatures
from .spectre import Spectre

__all__ = ["ActivationClustering", "SCAnFilter", "SpectralSignatures", "Spectre"]
from .abl import ABLIsolation  # noqa: E402,F401  (Li et al., NeurIPS 2021)
