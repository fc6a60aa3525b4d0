"""Small shared helpers: device resolution, seeded generators, atomic file writes, cache root."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import BackdoorLabError


def home() -> Path:
    """The cache root: ``$BACKDOORLAB_HOME`` or ``~/.cache/backdoorlab`` (house rule 6)."""
    env = os.environ.get("BACKDOORLAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "backdoorlab"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackdoorLabError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackdoorLabError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def derive_seed(seed: int, *tags: str) -> int:
    """A 63-bit seed derived from ``seed`` and string tags, stable across runs and machines."""
    h = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *tags: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``derive_seed(seed, *tags)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *tags))
    return g


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash (even SIGKILL) leaves either the old file or the new one, never a half-written one.
    The file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the
    umask), not ``mkstemp``'s private ``0o600``: exports, reports and a shared artifact cache must
    stay readable by the other users and servers that read them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
