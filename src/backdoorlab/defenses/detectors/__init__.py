"""Input detectors: ``fit(ctx)`` then ``score(clf, x) -> (N,)``, higher = more likely triggered.

Registered here (importing this package registers them in :data:`~backdoorlab.defenses.DEFENSES`):

* ``strip``: STRIP (Gao et al., ACSAC 2019), :mod:`.strip`.
* ``scale-up``: SCALE-UP (Guo et al., ICLR 2023), :mod:`.scale_up`.
* ``teco``: TeCo (Liu et al., CVPR 2023), :mod:`.teco`.
"""

from __future__ import annotations

from .scale_up import ScaleUp
from .strip import STRIP
from .teco import TeCo

__all__ = ["STRIP", "ScaleUp", "TeCo"]
