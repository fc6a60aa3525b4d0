"""Content-keyed artifact cache: each costly stage's output lives under a key =
hash(stage config + parent key), written atomically, so reruns reuse finished work."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks; see ArtifactCache.lock
    fcntl = None  # type: ignore[assignment]

import torch

from ..config import stable_hash
from ..utils import atomic_path, home


class ArtifactCache:
    """Artifacts as ``<root>/<stage>/<key>.pt`` (``torch.save`` of tensors and plain data only;
    loaded with ``weights_only=True``, so a cache file can never run code)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else home() / "artifacts"

    @staticmethod
    def key(stage: str, config: Any, parent: str | None = None) -> str:
        return stable_hash(stage, config, parent or "")

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.pt"

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold an exclusive lock on artifact ``stage/key`` across processes (an ``fcntl.flock`` on
        ``<root>/<stage>/<key>.lock``), so that of several processes wanting the same artifact one
        builds it and the others, re-checking the cache once they hold the lock, load it. The kernel
        releases the lock when its holder dies; the (empty) lock file stays, as deleting it would
        let two processes lock two different files. Where ``fcntl`` does not exist (Windows) this
        locks nothing: concurrent runs there may build an artifact twice (each write is atomic)."""
        if fcntl is None:
            yield
            return
        p = self.root / stage / f"{key}.lock"
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as atomic_path's files
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock

    def get(self, stage: str, key: str) -> dict[str, Any] | None:
        p = self.path(stage, key)
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # a damaged artifact is treated as absent and rebuilt
            p.unlink(missing_ok=True)
            return None

    def put(self, stage: str, key: str, value: dict[str, Any]) -> Path:
        p = self.path(stage, key)
        with atomic_path(p) as tmp:
            torch.save(value, tmp)
        return p
