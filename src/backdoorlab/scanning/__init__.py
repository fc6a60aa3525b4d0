"""``backdoorlab scan``: is this model file safe to ship? (issue 28)

* :func:`~.load.load_model`: a model file loaded without running anything it carries;
* :func:`~.run.scan`: the scanners of a budget on the model as the file runs it, one verdict;
* :class:`~.run.ScanReport`: the answer (``to_json``, ``write_html``, ``exit_status``).

The package is ``scanning`` so that ``backdoorlab.scan`` stays the function (a subpackage named
``scan`` would replace it as an attribute of ``backdoorlab`` once imported).
"""

from __future__ import annotations

from .load import LoadedModel, load_model
from .run import BUDGETS, ScanReport, scan

__all__ = ["BUDGETS", "LoadedModel", "ScanReport", "load_model", "scan"]
