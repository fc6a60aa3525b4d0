"""Download, verify and extract the official archives of a registered dataset.

``fetch("cifar10")`` puts ``cifar-10-python.tar.gz`` and ``cifar-10-batches-py/`` into
``$BACKDOORLAB_HOME/data``; ``fetch("gtsrb")`` puts the three official GTSRB zips and ``GTSRB/``
there. Those are the names :func:`backdoorlab.data.datasets.locate` looks for, so
``load_dataset(name)`` works afterwards with no further setting.

Every file is streamed to a temporary file beside its destination and hashed on the way; it is
renamed into place only when its checksum matches, so an interrupted or corrupted download
leaves nothing behind. Extraction goes to a temporary folder that is renamed into place whole.
A dataset already extracted, or an archive already present with the right checksum, is not
downloaded again.

Checksums (:data:`CHECKSUMS`) are the published ones, with where they were found:

* ``cifar-10-python.tar.gz`` sha256 -- Keras ``cifar10.load_data``
  (tensorflow/tensorflow ``tensorflow/python/keras/datasets/cifar10.py``); its md5
  ``c58f30108f718f92721af3b95e74349a`` is the one torchvision checks.
* ``GTSRB_Final_Test_Images.zip`` and ``GTSRB_Final_Test_GT.zip`` sha256 -- torchvision's
  prototype datasets (pytorch/vision ``torchvision/prototype/datasets/_builtin/gtsrb.py``);
  their md5s there agree with torchvision's ``datasets/gtsrb.py``.
* ``GTSRB_Final_Training_Images.zip``: no published sha256 was found, so its **md5** is checked
  (google-deepmind/dm_nevis ``dm_nevis/datasets_storage/handlers/german_tsr.py``, and other
  loaders agree). Note that torchvision downloads a different training archive
  (``GTSRB-Training_fixed.zip``, 26,640 images); this is the 39,209-image final training set.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import __version__
from ..errors import BackdoorLabError
from ..utils import atomic_path, home

MIRROR_ENV = "BACKDOORLAB_MIRROR"
TIMEOUT_S = 60.0
CHUNK = 1 << 20

# file name -> (hash algorithm, hex digest); sources in the module docstring. Tests may pass
# their own table through ``fetch(..., checksums=...)`` or monkeypatch this dict.
CHECKSUMS: dict[str, tuple[str, str]] = {
    "cifar-10-python.tar.gz": (
        "sha256", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    # md5, not sha256: no published sha256 of this archive was found (see module docstring).
    "GTSRB_Final_Training_Images.zip": ("md5", "f33fd80ac59bff73c82d25ab499e03a3"),
    "GTSRB_Final_Test_Images.zip": (
        "sha256", "48ba6fab7e877eb64eaf8de99035b0aaecfbc279bee23e35deca4ac1d0a837fa"),
    "GTSRB_Final_Test_GT.zip": (
        "sha256", "f94e5a7614d75845c74c04ddb26b8796b9e483f43541dd95dd5b726504e16d6d"),
}


@dataclass(frozen=True)
class Source:
    """Where a dataset's official archives live and how they become the folder ``target``."""

    base_url: str
    files: tuple[str, ...]
    target: str  # folder name under dest; one of the dataset's DatasetEntry.candidates
    extract: Callable[[list[Path], Path], Path]  # (archives, staging dir) -> folder to publish
    complete: Callable[[Path], bool]  # whether an existing target folder is a full extraction


def _bad_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (bool(p.parts) and ":" in p.parts[0])


def _extract_tar(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(into, filter="data")
            else:  # Python without PEP 706: allow only plain files and folders inside `into`
                members = tf.getmembers()
                for m in members:
                    if _bad_member(m.name) or not (m.isfile() or m.isdir()):
                        raise BackdoorLabError(f"unsafe member {m.name!r} in archive {archive}")
                tf.extractall(into, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackdoorLabError(f"cannot extract {archive}: {exc}") from None


def _extract_zip(archive: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if _bad_member(name):
                    raise BackdoorLabError(f"unsafe member {name!r} in archive {archive}")
            zf.extractall(into)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BackdoorLabError(f"cannot extract {archive}: {exc}") from None


_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _cifar_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _CIFAR_FILES)


def _cifar_extract(archives: list[Path], staging: Path) -> Path:
    (archive,) = archives
    _extract_tar(archive, staging)
    out = staging / "cifar-10-batches-py"
    if not _cifar_complete(out):
        raise BackdoorLabError(
            f"{archive.name} does not hold cifar-10-batches-py/{{data_batch_1..5, test_batch}}"
        )
    return out


def _gtsrb_complete(folder: Path) -> bool:
    from .gtsrb_official import TEST_DIR, TEST_GT, TRAIN_DIR

    return (folder.joinpath(*TRAIN_DIR).is_dir() and folder.joinpath(*TEST_DIR).is_dir()
            and (folder / TEST_GT).is_file())


def _gtsrb_extract(archives: list[Path], staging: Path) -> Path:
    from .gtsrb_official import TEST_GT

    for archive in archives:
        _extract_zip(archive, staging)
    out = staging / "GTSRB"
    gt = staging / TEST_GT  # GTSRB_Final_Test_GT.zip holds the labels at its root
    if gt.is_file() and not (out / TEST_GT).exists() and out.is_dir():
        os.replace(gt, out / TEST_GT)
    if not _gtsrb_complete(out):
        raise BackdoorLabError(
            f"the GTSRB archives {', '.join(a.name for a in archives)} do not hold "
            f"GTSRB/Final_Training/Images, GTSRB/Final_Test/Images and {TEST_GT}"
        )
    return out


SOURCES: dict[str, Source] = {
    "cifar10": Source(
        base_url="https://www.cs.toronto.edu/~kriz/",
        files=("cifar-10-python.tar.gz",),
        target="cifar-10-batches-py",
        extract=_cifar_extract,
        complete=_cifar_complete,
    ),
    "gtsrb": Source(
        base_url="https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/",
        files=("GTSRB_Final_Training_Images.zip", "GTSRB_Final_Test_Images.zip",
               "GTSRB_Final_Test_GT.zip"),
        target="GTSRB",
        extract=_gtsrb_extract,
        complete=_gtsrb_complete,
    ),
}


def _hasher(algo: str):
    try:
        return hashlib.new(algo, usedforsecurity=False)
    except (ValueError, TypeError):
        raise BackdoorLabError(f"unknown checksum algorithm {algo!r}") from None


def _file_digest(path: Path, algo: str) -> str:
    h = _hasher(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, algo: str, expected: str, progress: bool) -> None:
    """Stream ``url`` to ``dest``, hashing on the way; publish only if the digest matches."""
    h = _hasher(algo)
    try:
        with atomic_path(dest) as tmp:
            try:
                agent = {"User-Agent": f"backdoorlab/{__version__}"}
                req = urllib.request.Request(url, headers=agent)
                resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
            except urllib.error.HTTPError as exc:
                raise BackdoorLabError(f"HTTP {exc.code} {exc.reason} downloading {url}") from None
            except urllib.error.URLError as exc:
                raise BackdoorLabError(f"cannot download {url}: {exc.reason}") from None
            except ValueError as exc:  # a malformed URL, e.g. a mirror without a scheme
                raise BackdoorLabError(f"cannot download {url}: {exc}") from None
            with resp, open(tmp, "wb") as out:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=dest.name, file=sys.stderr, leave=False)
                got = 0
                try:
                    while chunk := resp.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
            if total is not None and got != total:
                raise BackdoorLabError(
                    f"download of {dest.name} from {url} was cut short ({got} of {total} bytes); "
                    "the download was discarded"
                )
            digest = h.hexdigest()
            if digest != expected.lower():
                raise BackdoorLabError(
                    f"{algo} mismatch for {dest.name} from {url}: expected {expected}, "
                    f"got {digest}; the download was discarded"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a data folder may be shared
    except BackdoorLabError:
        raise
    except (OSError, http.client.HTTPException) as exc:  # reset, timeout, short read, disk full
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise BackdoorLabError(
            f"download of {url} failed: {reason}; the download was discarded"
        ) from None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr)


def fetch(
    name: str,
    dest: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    progress: bool = False,
    checksums: Mapping[str, tuple[str, str]] | None = None,
    keep_archives: bool = True,
) -> Path | None:
    """Download, verify and extract dataset ``name``'s official archives; return its folder.

    ``dest``: the data folder (default ``$BACKDOORLAB_HOME/data``, the last place
    :func:`~backdoorlab.data.datasets.locate` looks). ``base_url``: a mirror replacing the
    official URL prefix (the archive's file name is appended); defaults to ``$BACKDOORLAB_MIRROR``,
    then the official site. ``progress``: show a progress bar and messages on stderr.
    ``checksums``: ``{file name: (algorithm, hex digest)}`` to use instead of :data:`CHECKSUMS`.
    ``keep_archives``: keep the verified archives beside the extracted folder, so a later fetch
    re-extracts without downloading.

    Returns the extracted folder, or ``None`` for datasets that need no files (``digits`` ships
    with scikit-learn). Raises :class:`BackdoorLabError` (one line) for an unknown name, a
    network or HTTP failure, a checksum mismatch or an unsafe/corrupt archive.
    """
    from .datasets import DATASETS

    DATASETS.get(name)  # unknown name -> one line with a did-you-mean
    entry = DATASETS.build(name)
    if not entry.needs_files:
        _say(progress, f"dataset {name!r} needs no download: it ships with its library")
        return None
    source = SOURCES.get(name)
    if source is None:
        raise BackdoorLabError(
            f"dataset {name!r} has no download recipe; place one of "
            f"{', '.join(entry.candidates)} in a data folder yourself"
        )
    table = CHECKSUMS if checksums is None else checksums
    missing = [f for f in source.files if f not in table]
    if missing:
        raise BackdoorLabError(f"no checksum known for {', '.join(missing)}; refusing to download")

    dest = Path(dest).expanduser() if dest is not None else home() / "data"
    target = dest / source.target
    if target.exists():
        if source.complete(target):
            _say(progress, f"{name}: {target} is already there")
            return target
        raise BackdoorLabError(
            f"{target} exists but is not a complete {name} extraction; remove it and fetch again"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackdoorLabError(f"cannot create data folder {dest}: {exc.strerror or exc}") from None

    prefix = base_url or os.environ.get(MIRROR_ENV) or source.base_url
    if not prefix.endswith("/"):
        prefix += "/"
    archives: list[Path] = []
    for fname in source.files:
        algo, expected = table[fname]
        path = dest / fname
        if path.is_file() and _file_digest(path, algo) == expected.lower():
            _say(progress, f"{name}: {path} already downloaded and verified")
        else:
            _say(progress, f"{name}: downloading {prefix}{fname}")
            _download(prefix + fname, path, algo, expected, progress)
        archives.append(path)

    _say(progress, f"{name}: extracting into {target}")
    staging = Path(tempfile.mkdtemp(prefix=f".{source.target}.", suffix=".tmp", dir=dest))
    try:
        folder = source.extract(archives, staging)
        try:
            os.replace(folder, target)  # atomic publish of the whole folder
        except OSError:
            if not source.complete(target):  # not another process finishing first
                raise BackdoorLabError(f"cannot move the extracted {name} into {target}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        for a in archives:
            a.unlink(missing_ok=True)
    return target
