"""Reader for the official GTSRB release layout (PPM images + ``;``-separated CSV annotations).

Stallkamp, Schlipsing, Salmen, Igel. "The German Traffic Sign Recognition Benchmark: a
multi-class classification competition", IJCNN 2011.

The official archives extract to::

    GTSRB_Final_Training_Images.zip -> GTSRB/Final_Training/Images/000XX/{*.ppm, GT-000XX.csv}
    GTSRB_Final_Test_Images.zip     -> GTSRB/Final_Test/Images/{*.ppm, GT-final_test.test.csv}
    GTSRB_Final_Test_GT.zip         -> GT-final_test.csv   (the test labels, at the zip's root)

``backdoorlab data fetch gtsrb`` (:func:`backdoorlab.data.fetch.fetch`) produces ``<data>/GTSRB/``
holding ``Final_Training/``, ``Final_Test/`` and ``GT-final_test.csv``. :func:`read` accepts that
``GTSRB`` folder or the folder containing it; the test labels are looked for in ``GTSRB/``,
in ``GTSRB/Final_Test/Images/`` (where many guides copy them) and beside ``GTSRB/``.

Images are whole (no ROI crop), converted to RGB and resized to ``size x size`` (bilinear), as
uint8 NHWC in [0, 255]; labels are the CSV ``ClassId`` (0..42) as int64. Training images come
class folder by class folder in CSV order; test images in ``GT-final_test.csv`` order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import BackdoorLabError
from . import readers

TRAIN_DIR = ("Final_Training", "Images")
TEST_DIR = ("Final_Test", "Images")
TEST_GT = "GT-final_test.csv"


def _root(path: Path) -> Path | None:
    """The ``GTSRB`` folder inside or at ``path`` (a few fixed stat calls, no tree walk)."""
    path = Path(path)
    for root in (path, path / "GTSRB"):
        if root.joinpath(*TRAIN_DIR).is_dir():
            return root
    return None


def is_official(path: Path) -> bool:
    """Whether ``path`` is (or directly contains) an extracted official GTSRB ``GTSRB`` folder."""
    return _root(path) is not None


def _test_gt(root: Path) -> Path:
    candidates = [root / TEST_GT, root.joinpath(*TEST_DIR, TEST_GT), root.parent / TEST_GT]
    for cand in candidates:
        if cand.is_file():
            return cand
    looked = ", ".join(str(c.parent) for c in candidates)
    raise BackdoorLabError(
        f"GTSRB test labels {TEST_GT} not found (looked in {looked}); "
        f"extract GTSRB_Final_Test_GT.zip into {root}"
    )


def _rows(csv_path: Path) -> list[tuple[str, int]]:
    """``(Filename, ClassId)`` rows of an official annotation CSV."""
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise BackdoorLabError(
            f"cannot read GTSRB annotation file {csv_path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise BackdoorLabError(f"corrupt GTSRB annotation file {csv_path}: not text") from None
    reader = csv.DictReader(io.StringIO(text), delimiter=";")
    fields = [f.strip() for f in reader.fieldnames or []]
    if "Filename" not in fields or "ClassId" not in fields:
        raise BackdoorLabError(
            f"corrupt GTSRB annotation file {csv_path}: expected ';'-separated columns "
            f"Filename and ClassId, got {';'.join(fields) or 'nothing'}"
        )
    reader.fieldnames = fields
    rows: list[tuple[str, int]] = []
    for line, row in enumerate(reader, start=2):
        name = (row.get("Filename") or "").strip()
        label = (row.get("ClassId") or "").strip()
        if not name and not label:
            continue  # blank line
        try:
            cls = int(label)
        except ValueError:
            raise BackdoorLabError(
                f"corrupt GTSRB annotation file {csv_path}: line {line} has ClassId {label!r}"
            ) from None
        if not name or "/" in name or "\\" in name or cls < 0:
            raise BackdoorLabError(f"corrupt GTSRB annotation file {csv_path}: bad line {line}")
        rows.append((name, cls))
    return rows


class _Files:
    """A directory read by relative POSIX names: the ``src`` that ``readers._decode_all`` takes.

    (``readers._Source`` would walk the whole tree first; the CSVs already list every file.)
    """

    def __init__(self, path: Path):
        self.path = path

    def reader(self) -> Callable[[str], bytes]:
        def read(name: str) -> bytes:
            return readers.read_file_capped(self.path / name, "GTSRB image")

        return read


def read(path: Path, size: int = 32) -> dict[str, readers.Arrays]:
    """Read the official layout at ``path`` -> ``{"train": (x, y), "test": (x, y)}``.

    ``x``: uint8 ``(N, size, size, 3)``; ``y``: int64 ``(N,)`` ClassId. A missing or corrupt
    image or annotation file raises :class:`BackdoorLabError` naming the file.
    """
    path = Path(path)
    root = _root(path)
    if root is None:
        raise BackdoorLabError(
            f"{path} is not the official GTSRB layout: "
            f"no {'/'.join(TRAIN_DIR)} in it or in {path / 'GTSRB'}"
        )
    train_dir = root.joinpath(*TRAIN_DIR)
    train: list[tuple[str, int]] = []
    for cls_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        gt = cls_dir / f"GT-{cls_dir.name}.csv"
        if not gt.is_file():
            raise BackdoorLabError(f"GTSRB annotation file {gt} is missing")
        rel = f"{'/'.join(TRAIN_DIR)}/{cls_dir.name}"
        train.extend((f"{rel}/{name}", cls) for name, cls in _rows(gt))
    if not train:
        raise BackdoorLabError(f"{train_dir} has no class folders with GT-*.csv annotations")

    test_dir = root.joinpath(*TEST_DIR)
    if not test_dir.is_dir():
        raise BackdoorLabError(
            f"GTSRB test images {test_dir} are missing; "
            f"extract GTSRB_Final_Test_Images.zip into {root.parent}"
        )
    rel = "/".join(TEST_DIR)
    gt = _test_gt(root)
    test = [(f"{rel}/{name}", cls) for name, cls in _rows(gt)]
    if not test:
        raise BackdoorLabError(f"GTSRB test labels {gt} list no images")

    src = _Files(root)
    out: dict[str, readers.Arrays] = {}
    for split, items in (("train", train), ("test", test)):
        xs = readers._decode_all(src, [n for n, _ in items], int(size))  # type: ignore[arg-type]
        out[split] = (np.stack(xs), np.array([c for _, c in items], dtype=np.int64))
    return out
