"""Content-keyed artifact cache: each costly stage's output lives under a key =
hash(stage config + parent key), written atomically, so reruns reuse finished work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
