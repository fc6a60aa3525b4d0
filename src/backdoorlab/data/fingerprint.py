"""Content fingerprints of the files a user points backdoorlab at (issue 24: no stale result).

A dataset archive or folder, or an attack's pattern image, enters every run id and cache key
through :func:`fingerprint`: the SHA-256 of its bytes (of every file's path and bytes, for a
folder). Hashing is done once per version of the file: the result is cached under
``$BACKDOORLAB_HOME/fingerprints/`` keyed by the resolved path and checked against the file's
``stat`` signature (size, mtime, ctime, inode; ctime cannot be set back by a user, so a file
replaced with one of the same size and a forged mtime is hashed again). So a changed file means
new cells and new artifacts, and an unchanged one costs a ``stat``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..config import stable_hash
from ..errors import BackdoorLabError
from ..utils import atomic_path, home

_CHUNK = 1 << 20
_VERSION = 1


def _stat_sig(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def fingerprint(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of the content of ``path`` (a file, or a folder's files with their
    relative paths), from the cache when the file's ``stat`` signature is unchanged."""
    path = Path(path)
    try:
        real = path.resolve()
        if real.is_dir():
            files = _files(real)
            sig = stable_hash([(p.relative_to(real).as_posix(), _stat_sig(p)) for p in files], length=32)
        else:
            files = None
            sig = stable_hash(_stat_sig(real), length=32)
    except OSError as exc:
        raise BackdoorLabError(f"cannot read {path}: {exc.strerror or exc}") from None
    entry = home() / "fingerprints" / f"{stable_hash(str(real), _VERSION, length=24)}.json"
    try:
        cached = json.loads(entry.read_text())
        if cached.get("sig") == sig and cached.get("path") == str(real):
            return str(cached["sha"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # absent or damaged: hash again
    try:
        if files is None:
            sha = _sha_file(real)
        else:
            h = hashlib.sha256()
            for p in files:
                h.update(p.relative_to(real).as_posix().encode() + b"\x00" + _sha_file(p).encode() + b"\x00")
            sha = h.hexdigest()
    except OSError as exc:
        raise BackdoorLabError(f"cannot read {path}: {exc.strerror or exc}") from None
    out = f"sha256:{sha}"
    try:
        with atomic_path(entry) as tmp:
            tmp.write_text(json.dumps({"path": str(real), "sig": sig, "sha": out}))
    except (OSError, BackdoorLabError):
        pass  # a read-only cache only costs hashing again next time
    return out
