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
import re
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import BackdoorLabError
from .limits import human, limits

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Arrays = tuple[np.ndarray, np.ndarray]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (a bytes object stored as latin-1 text),
    and for nothing else: other codecs are refused rather than looked up."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refused _codecs.encode with anything but latin-1 text")
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR-10 batches and nothing else.

    A batch is a dict of bytes keys to bytes, lists of ints / bytes, and one uint8 numpy array,
    which pickle rebuilds through ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype``. Every other global a pickle may name (``os.system``, ``builtins.eval``,
    ``subprocess.Popen``, any class with a ``__reduce__`` payload) is refused, so no code a
    file carries can run: pickle can only call what :meth:`find_class` hands it.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's hook
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds "
                                         "only plain data and numpy arrays")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module == "numpy":
            return getattr(np, name)
        import importlib

        core = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
        return importlib.import_module(core)._reconstruct  # numpy 2 moved numpy.core to numpy._core


def read_file_capped(path: Path, what: str) -> bytes:
    """The bytes of ``path``, refused with one line if it is larger than the file cap."""
    lim = limits()
    try:
        size = path.stat().st_size
        if size > lim.max_file_bytes:
            raise BackdoorLabError(f"{what} {path} is {human(size)}, over the {human(lim.max_file_bytes)} "
                                   "limit (set BACKDOORLAB_MAX_FILE_MB to raise it)")
        return path.read_bytes()
    except OSError as exc:
        raise BackdoorLabError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _cifar_batch(path: Path) -> Arrays:
    raw = read_file_capped(path, "CIFAR-10 batch file")
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise BackdoorLabError(f"corrupt CIFAR-10 batch file {path}: {exc}") from None
    except Exception as exc:  # truncated or garbled bytes: any decoding failure is a corrupt file
        raise BackdoorLabError(f"corrupt CIFAR-10 batch file {path}: not a CIFAR-10 pickle "
                               f"({type(exc).__name__})") from None
    if not isinstance(batch, dict):
        raise BackdoorLabError(f"corrupt CIFAR-10 batch file {path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data")
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise BackdoorLabError(f"corrupt CIFAR-10 batch file {path}: 'data' must be a uint8 array of "
                               "N x 3072 pixels")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(type(v) is int and 0 <= v < 10 for v in labels)):
        raise BackdoorLabError(f"corrupt CIFAR-10 batch file {path}: 'labels' must be {len(data)} integers in [0, 9]")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, np.asarray(labels, dtype=np.int64)


def read_cifar_batches(root: str | os.PathLike) -> dict[str, Arrays]:
    """Read the official ``cifar-10-batches-py`` directory -> ``{"train": (x, y), "test": ...}``.

    The batches are Python pickles; they are read by a restricted unpickler that builds plain
    data and numpy arrays only (:class:`_BatchUnpickler`), so a crafted batch file cannot run
    code, and each is checked for the format's shape (``data``: uint8 N x 3072, ``labels``: N
    integers in [0, 9]) before use.
    """
    root = Path(root)
    out: dict[str, Arrays] = {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in files:
            path = root / name
            if not path.is_file():
                raise BackdoorLabError(f"CIFAR-10 batch file {path} is missing")
            x, y = _cifar_batch(path)
            xs.append(x)
            ys.append(y)
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out


_OBJ_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes, name: str, size: int | None = None, mode: str = "RGB") -> np.ndarray:
    """Decode one image file's bytes to a uint8 ``(H, W, C)`` array in ``mode`` (``RGB`` / ``L``).

    The pixel count is read from the header and capped (``BACKDOORLAB_MAX_PIXELS``) before any
    pixel is decoded; ``size`` resizes to ``size x size`` (bilinear). Failures raise one line
    naming ``name`` (the file, or ``archive:member``).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    lim = limits()
    # backdoorlab enforces its own (lower) cap below; PIL's warning would only repeat it
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > lim.max_pixels:
                raise BackdoorLabError(f"image {name} is {w}x{h} = {w * h:,} pixels, over the {lim.max_pixels:,}-pixel "
                                       "limit (set BACKDOORLAB_MAX_PIXELS to raise it)")
            if size is not None and im.format == "JPEG":
                im.draft(mode, (size, size))  # DCT-domain downscale: much faster decoding
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise BackdoorLabError(f"corrupt image {name}: not an image format that can be read") from None
    except Image.DecompressionBombError as exc:  # PIL's own cap fires first for the largest headers
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size_text = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        raise BackdoorLabError(f"image {name} is {size_text}, over the {lim.max_pixels:,}-pixel limit "
                               "(set BACKDOORLAB_MAX_PIXELS to raise it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BackdoorLabError(f"corrupt image {name}: {_OBJ_REPR.sub('it', str(exc)) or type(exc).__name__}") from None
    return arr if arr.ndim == 3 else arr[..., None]


def _decode(data: bytes, size: int | None, name: str) -> np.ndarray:
    return decode_image(data, name, size)


def _unsafe_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (bool(p.parts) and ":" in p.parts[0])


class _Source:
    """A directory or a zip archive, read by relative POSIX names, within the caps of
    :mod:`~backdoorlab.data.limits` (checked from the zip directory or ``stat`` before reading)."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        lim = limits()
        self.sizes: dict[str, int] = {}
        if self.is_zip:
            try:
                with zipfile.ZipFile(path) as zf:
                    infos = [i for i in zf.infolist() if not i.is_dir()]
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                raise BackdoorLabError(f"corrupt archive {path}: {exc}") from None
            for info in infos:
                if _unsafe_name(info.filename):
                    raise BackdoorLabError(f"unsafe member name {info.filename!r} in archive {path}: "
                                           "absolute or with '..'")
                self.sizes[info.filename] = info.file_size
        else:
            for p in path.rglob("*"):
                if p.is_file():
                    self.sizes[p.relative_to(path).as_posix()] = p.stat().st_size
        if len(self.sizes) > lim.max_members:
            raise BackdoorLabError(f"{path} holds {len(self.sizes):,} files, over the {lim.max_members:,} limit "
                                   "(set BACKDOORLAB_MAX_MEMBERS to raise it)")
        self.names = list(self.sizes)

    def check(self, names: list[str]) -> None:
        """Refuse (one line) before reading if any of ``names`` or their total is over the caps."""
        lim = limits()
        total = 0
        for n in names:
            size = self.sizes[n]
            if size > lim.max_file_bytes:
                raise BackdoorLabError(f"{self.path}:{n} expands to {human(size)}, over the "
                                       f"{human(lim.max_file_bytes)} limit (set BACKDOORLAB_MAX_FILE_MB to raise it)")
            total += size
        if total > lim.max_total_bytes:
            raise BackdoorLabError(f"{self.path} expands to {human(total)}, over the {human(lim.max_total_bytes)} "
                                   "limit (set BACKDOORLAB_MAX_DATA_GB to raise it)")

    def reader(self) -> Callable[[str], bytes]:
        if not self.is_zip:
            def read_file(n: str) -> bytes:
                try:
                    return (self.path / n).read_bytes()
                except OSError as exc:
                    raise BackdoorLabError(f"cannot read {self.path / n}: {exc.strerror or exc}") from None

            return read_file
        try:
            zf = zipfile.ZipFile(self.path)  # one handle per thread: ZipFile is not thread-safe
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise BackdoorLabError(f"corrupt archive {self.path}: {exc}") from None

        def read_member(n: str) -> bytes:
            try:
                return zf.read(n)  # never more than the declared (checked) size; CRC verified
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
                raise BackdoorLabError(f"corrupt archive {self.path}: member {n}: {exc}") from None

        return read_member


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
    src.check([n for s in splits for _, n in entries[s]])
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
