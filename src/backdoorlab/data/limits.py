"""Caps on what a file read from the user's disk may expand to (issue 24: no bomb).

Every reader checks sizes *before* decoding: an archive member's declared size (zip's central
directory; :mod:`zipfile` never yields more than the declared size, and checks the CRC), a
file's size on disk, and an image's pixel count read from its header. Defaults are far above
what real datasets need (a GTSRB image is at most ~250x250, a CIFAR-10 batch 31 MB) and far
below what would exhaust memory; each is configurable by an environment variable:

``BACKDOORLAB_MAX_FILE_MB`` (default 256)
    largest single file or archive member read into memory.
``BACKDOORLAB_MAX_PIXELS`` (default 40,000,000)
    largest image (width x height) decoded; a 20000x20000 PNG is 400 M.
``BACKDOORLAB_MAX_DATA_GB`` (default 16)
    largest total uncompressed size of one dataset archive or folder.
``BACKDOORLAB_MAX_MEMBERS`` (default 2,000,000)
    most files in one dataset archive or folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BackdoorLabError

_VARS = {
    "max_file_bytes": ("BACKDOORLAB_MAX_FILE_MB", 256, 1 << 20),
    "max_pixels": ("BACKDOORLAB_MAX_PIXELS", 40_000_000, 1),
    "max_total_bytes": ("BACKDOORLAB_MAX_DATA_GB", 16, 1 << 30),
    "max_members": ("BACKDOORLAB_MAX_MEMBERS", 2_000_000, 1),
}


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_pixels: int
    max_total_bytes: int
    max_members: int


def limits() -> Limits:
    """The caps in force, read from the environment (one line naming the variable if malformed)."""
    values = {}
    for field, (var, default, unit) in _VARS.items():
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            values[field] = default * unit
            continue
        try:
            v = float(raw)
        except ValueError:
            v = -1.0
        if not v > 0:
            raise BackdoorLabError(f"{var} must be a positive number, got {raw!r}")
        values[field] = int(v * unit)
    return Limits(**values)


def human(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``, for messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
