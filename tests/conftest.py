"""Session set-up. Every test session gets its own BACKDOORLAB_HOME (never the user's cache),
removed at the end; set BACKDOORLAB_TEST_HOME to keep one across sessions while developing.
The real image archives are read from BACKDOORLAB_DATA or the repo's sibling ../shared/data.
Shared helpers live in _helpers.py (pyproject puts tests/ on the path).

The default run is spread over one pytest-xdist worker per core (``-n auto`` in pyproject), each
with ``cores // workers`` torch threads: on 2 cores two one-thread trainings finish 14% sooner than
two two-thread trainings in a row, and the single-threaded Python parts run side by side. Workers
share the controller's BACKDOORLAB_HOME, so a model is trained once (the artifact cache locks each
artifact across processes). A module's tests stay on one worker (its module fixtures are built
once), except in the modules of ``SPREAD``, whose tests each train their own model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HOME: str | None = None


# modules whose tests are independent and long (one model each): spread test by test
SPREAD = {"test_library_gtsrb.py"}


def pytest_configure(config):
    global _HOME
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if os.environ.get("PYTEST_XDIST_WORKER") and workers:  # an xdist worker: home and data come from the controller
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # also for the CLI subprocesses some tests start
        import torch

        torch.set_num_threads(threads)
        return
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


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:  # with --dist loadgroup: one worker per module, SPREAD modules test by test
        path = Path(str(item.fspath))
        if path.name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(path.relative_to(REPO).as_posix()))
