"""Session set-up. Every test session gets its own BACKDOORLAB_HOME (never the user's cache),
removed at the end; set BACKDOORLAB_TEST_HOME to keep one across sessions while developing.
The real image archives are read from BACKDOORLAB_DATA or the repo's sibling ../shared/data.
Shared helpers live in _helpers.py (pyproject puts tests/ on the path)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HOME: str | None = None


def pytest_configure(config):
    global _HOME
    if not os.environ.get("BACKDOORLAB_DATA"):
        shared = REPO.parent / "shared" / "data"
        if shared.is_dir():
            os.environ["BACKDOORLAB_DATA"] = str(shared)
    keep = os.environ.get("BACKDOORLAB_TEST_HOME")  # developers: reuse trained models across sessions
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        os.environ["BACKDOORLAB_HOME"] = keep
        return
    _HOME = tempfile.mkdtemp(prefix="backdoorlab-test-home-")
    os.environ["BACKDOORLAB_HOME"] = _HOME


def pytest_unconfigure(config):
    if _HOME:
        shutil.rmtree(_HOME, ignore_errors=True)
