"""Small shared helpers: device resolution, seeded generators, atomic file writes, cache root, and
the CPU allocator setting training runs under."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import BackdoorLabError


def home() -> Path:
    """The cache root: ``$BACKDOORLAB_HOME`` or ``~/.cache/backdoorlab`` (house rule 6)."""
    env = os.environ.get("BACKDOORLAB_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "backdoorlab"
    if root.exists() and not root.is_dir():
        what = f"BACKDOORLAB_HOME={env}" if env else f"the cache root {root}"
        raise BackdoorLabError(f"{what} is not a directory; point BACKDOORLAB_HOME at a directory")
    return root


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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks below this come from the heap and are reused; above it (whole datasets) they are mmap'd.
_HEAP_LIMIT = 1 << 30
_allocator: str | None = None


def tune_cpu_allocator() -> str:
    """Let glibc's malloc recycle the large blocks a CPU training step allocates and frees.

    By default glibc serves every block above its mmap threshold (128 KiB, raised dynamically to
    at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``. A training step allocates
    activations and gradients of tens of MB (small-cnn's stem output at batch 256 is 33.5 MB), so
    each step page-faults and zeroes them again. This sets the mmap and trim thresholds to 1 GiB
    (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``) so such blocks stay in the heap
    and are reused: the glibc counterpart of the alternative allocator (tcmalloc, jemalloc) that
    PyTorch's performance tuning guide recommends for CPU training. Measured on 2 cores: ``fit()``
    1.20x faster for the default model and 1.26x for PreAct-ResNet18, for 15% and 28% more peak
    resident memory, which the heap keeps (``bench_train_throughput.py --allocator-ab``).

    Process-wide and applied once; ``fit()`` and the CLI call it. ``BACKDOORLAB_MALLOC=system``
    keeps glibc's defaults. Returns the setting in force: ``"tuned"``, or ``"system"`` (opted
    out, or not glibc on Linux).
    """
    global _allocator
    if _allocator is not None:
        return _allocator
    mode = os.environ.get("BACKDOORLAB_MALLOC", "tuned")
    if mode not in ("tuned", "system"):
        raise BackdoorLabError(f"BACKDOORLAB_MALLOC must be 'tuned' or 'system', got {mode!r}")
    if mode == "tuned":
        ok = False
        try:
            libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
            if libc is not None:
                # the mmap threshold decides where blocks come from; the trim threshold keeps glibc
                # from handing the heap's freed top back to the OS (and faulting it in again)
                ok = libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT) == 1
                libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT)
        except (OSError, AttributeError):  # musl and other libcs: no libc.so.6 or no mallopt
            pass
        mode = "tuned" if ok else "system"
    _allocator = mode
    return mode


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name what the user asked for, not the temporary file
        raise BackdoorLabError(f"cannot write {path}: {exc.strerror or exc}") from None
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
