"""Readers for the three on-disk formats backdoorlab understands.

* the official CIFAR-10 "python batches" directory (``data_batch_1`` ... ``test_batch``);
* image folders ``<split>/<class>/<image>``, as a directory or a ``.zip`` archive
  (class label = index of the folder name in sorted order);
* scikit-learn's bundled ``digits`` (8x8 grey images, values 0..16).

All return uint8 NHWC numpy arrays and int64 labels. Corrupt input raises
:class:`~backdoorlab.errors.BackdoorLabError` with one line naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import BackdoorLabError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Arrays = tuple[np.ndarray, np.ndarray]


def read_cifar_batches(root: str | os.PathLike) -> dict[str, Arrays]:
    """Read the official ``cifar-10-batches-py`` directory -> ``{"train": (x, y), "test": ...}``."""
    root = Path(root)
    out: dict[str, Arrays] = {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in files:
            path = root / name
            if not path.is_file():
                raise BackdoorLabError(f"CIFAR-10 batch file {path} is missing")
            try:
                with open(path, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = batch.get(b"labels", batch.get(b"fine_labels"))
                xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(labels, dtype=np.int64))
            except BackdoorLabError:
                raise
            except Exception as exc:  # pickle/unpack/reshape errors: a corrupt file
                raise BackdoorLabError(f"corrupt CIFAR-10 batch file {path}: {exc}") from None
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out


def _decode(data: bytes, size: int | None, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if size is not None and im.format == "JPEG":
                im.draft("RGB", (size, size))  # DCT-domain downscale: much faster decoding
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BackdoorLabError(f"corrupt image {name}: {exc}") from None


class _Source:
    """A directory or a zip archive, read by relative POSIX names."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        if self.is_zip:
            try:
                with zipfile.ZipFile(path) as zf:
                    self.names = [n for n in zf.namelist() if not n.endswith("/")]
            except (zipfile.BadZipFile, OSError) as exc:
                raise BackdoorLabError(f"corrupt archive {path}: {exc}") from None
        else:
            self.names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]

    def reader(self) -> Callable[[str], bytes]:
        if not self.is_zip:
            return lambda n: (self.path / n).read_bytes()
        zf = zipfile.ZipFile(self.path)  # one handle per thread: ZipFile is not thread-safe
        return zf.read


def read_image_folder(
    path: str | os.PathLike, size: int | None = None, splits: tuple[str, ...] = ("train", "test")
) -> tuple[dict[str, Arrays], list[str]]:
    """Read ``<split>/<class>/<image>`` from a directory or ``.zip``.

    ``size`` resizes every image to ``size x size`` (bilinear); ``None`` requires equal sizes.
    A single top-level folder wrapping the splits is allowed. Returns the arrays per split and
    the sorted class-folder names (label ``i`` = ``classes[i]``).
    """
    path = Path(path)
    if not path.exists():
        raise BackdoorLabError(f"image folder {path} does not exist")
    src = _Source(path)
    entries: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
    for name in src.names:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).suffix.lower() not in IMAGE_EXTS or len(parts) < 3:
            continue
        split, cls = parts[-3], parts[-2]
        if split in entries:
            entries[split].append((cls, name))
    missing = [s for s in splits if not entries[s]]
    if missing:
        raise BackdoorLabError(
            f"{path} has no images under {'/'.join(missing)}/<class>/: expected <split>/<class>/<image>"
        )
    classes = sorted({c for s in splits for c, _ in entries[s]})
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, Arrays] = {}
    for split in splits:
        items = sorted(entries[split], key=lambda t: t[1])
        xs = _decode_all(src, [n for _, n in items], size)
        shapes = {a.shape for a in xs}
        if len(shapes) != 1:
            raise BackdoorLabError(f"{path}: images differ in size {sorted(shapes)[:3]}; pass a size")
        ys = np.array([index[c] for c, _ in items], dtype=np.int64)
        out[split] = (np.stack(xs), ys)
    return out, classes


def _decode_all(src: _Source, names: list[str], size: int | None) -> list[np.ndarray]:
    workers = max(1, min(8, os.cpu_count() or 1))
    chunks = [names[i::workers] for i in range(workers)]

    def work(chunk: list[str]) -> list[np.ndarray]:
        read = src.reader()
        return [_decode(read(n), size, f"{src.path}:{n}") for n in chunk]

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(work, chunks))
    out: list[np.ndarray] = [None] * len(names)  # type: ignore[list-item]
    for w, res in enumerate(results):
        out[w::workers] = res
    return out


def read_digits() -> dict[str, Arrays]:
    """scikit-learn's bundled digits: 1,797 8x8 grey images, split 80/20 with a fixed seed.

    Pixel values 0..16 are scaled to 0..255. The split is fixed (seed 0, stratified) so every
    study sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return {"train": (np.ascontiguousarray(xtr), ytr), "test": (np.ascontiguousarray(xte), yte)}
