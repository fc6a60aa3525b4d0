"""Shared fixtures. Every test session gets its own BACKDOORLAB_HOME (never the user's cache);
the real image archives are read from BACKDOORLAB_DATA or the repo's sibling ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    if not os.environ.get("BACKDOORLAB_DATA"):
        shared = REPO.parent / "shared" / "data"
        if shared.is_dir():
            os.environ["BACKDOORLAB_DATA"] = str(shared)
    if not os.environ.get("BACKDOORLAB_TEST_HOME_KEEP"):
        import tempfile

        os.environ["BACKDOORLAB_HOME"] = tempfile.mkdtemp(prefix="backdoorlab-test-home-")


