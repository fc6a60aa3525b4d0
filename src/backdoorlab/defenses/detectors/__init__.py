"""Input detectors: ``fit(ctx)`` then ``score(clf, x) -> (N,)``, higher = more likely triggered.

Registered here (importing this package registers them in :data:`~backdoorlab.defenses.DEFENSES`):

* ``strip``: STRIP (Gao et al., ACSAC 2019), :mod:`.strip`.
* ``scale-up``: SCALE-UP (Guo et al., ICLR 2023), :mod:`.scale_up`.
* ``teco``: TeCo (Liu et al., CVPR 2023), :mod:`.teco`.
* ``cetf``: CETF (Zhou et al., arXiv 2407.05396, 2024), :mod:`.cetf`.
* ``vif``, ``aif``: VIF and AIF with Filtering-then-Contrasting (Do et al., ECCV 2022), :mod:`.input_filtering`.
* ``sentinet``: SentiNet (Chou, Tramèr, Pellegrino, IEEE S&P Workshops (DLS) 2020), :mod:`.sentinet`.
"""

from __future__ import annotations

from .cetf import CETF  # noqa: E402,F401  (Zhou et al., 2024)
from .input_filtering import AIF, VIF  # noqa: F401  (Do et al., ECCV 2022)
from .scale_up import ScaleUp
from .sentinet import SentiNet  # noqa: F401  (Chou et al., DLS 2020)
from .strip import STRIP
from .teco import TeCo

__all__ = ["STRIP", "ScaleUp", "TeCo"]
