"""Helpers shared by tests (importable because pyproject sets pythonpath = tests)."""

from __future__ import annotations

import os

import pytest


def has_data(name: str) -> bool:
    from backdoorlab.data import locate
    from backdoorlab.errors import BackdoorLabError

    try:
        locate(name)
        return True
    except BackdoorLabError:
        return False


def need_data(name: str):
    """Skip unless dataset ``name`` is available (CI has it; see ../shared/data/README.md)."""
    if not has_data(name):
        if os.environ.get("CI"):
            pytest.fail(f"dataset {name} is missing in CI; set BACKDOORLAB_DATA")
        pytest.skip(f"dataset {name} not available; set BACKDOORLAB_DATA")


# The GTSRB subset used by behavioural tests across the suite (issue 2, 3, 4, 5 tests).
GTSRB_SUBSET = {"name": "gtsrb", "train_limit": 6000, "test_limit": 2000}
GTSRB_TRAIN = {"epochs": 10, "batch_size": 128, "lr": 0.1}


def sample_row():
    """A finished row from some earlier study, to check that failures leave a store untouched."""
    from backdoorlab.bench.store import Row

    return Row("existing", "old", "digits", "small-cnn", "none", "fp32", "none", 0, {}, "ok",
               metrics={"ca": 1.0, "asr": 0.0, "ra": 1.0})
