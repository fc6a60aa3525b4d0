"""The scan's clean images: a registered dataset, a folder of the user's images, or none.

* A registered dataset name (``gtsrb``, ``cifar10``, ``digits``): ``per_class`` images of each
  class from its **test** split (images no model of this project was trained on).
* A folder ``<class>/<image>`` (directory or ``.zip``): a handful of images per class. Folder
  names are the model's label indices (``0``, ``1``, ...), or, where they are not all integers,
  they sort into the model's label order. Images must already have the model's input size and
  mode (RGB for 3 channels, greyscale for 1): a scan does not resize, since a resampled image
  is not what the model sees in use.
* ``None``: the data-free mode (only data-free scanners run).

Returns :class:`~backdoorlab.data.tensordata.TensorData` (uint8 NHWC) and the class names.
"""

from __future__ import annotations

import io
import os
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..data.readers import IMAGE_EXTS, _Source, decode_image
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check

MODES = {1: ("L",), 3: ("RGB", "P")}  # what an image may be stored as, by the model's channel count


def _per_class(y: torch.Tensor, per_class: int, g: torch.Generator) -> torch.Tensor:
    idx = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.sort(torch.cat(idx)).values


def dataset_images(name: str, per_class: int, seed: int = 0, data_dir: str | os.PathLike | None = None
                   ) -> tuple[TensorData, list[str]]:
    from ..data import load_dataset

    b = load_dataset(name, data_dir)
    g = torch.Generator().manual_seed(seed)
    classes = list(b.info.classes) or [str(i) for i in range(b.info.num_classes)]
    return b.test.subset(_per_class(b.test.y, per_class, g)), classes


def folder_images(path: str | os.PathLike, channels: int | None, size: tuple[int, int] | None,
                  per_class: int | None = None) -> tuple[TensorData, list[str]]:
    """``<class>/<image>`` under ``path`` (a directory or zip) as uint8 NHWC; one line for a folder
    with fewer than two classes, an image of another size or mode, or an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    check(path.exists(), f"--data {path}: no such file or directory")
    src = _Source(path)
    entries: dict[str, list[str]] = {}
    for n in sorted(src.names):
        parts = PurePosixPath(n).parts
        if PurePosixPath(n).suffix.lower() in IMAGE_EXTS and len(parts) >= 2:
            entries.setdefault(parts[-2], []).append(n)
    check(len(entries) >= 2, f"--data {path}: {len(entries)} class folder(s) with images; a scan needs "
                             "<class>/<image> for at least two classes")
    names = list(entries)
    if all(c.isdigit() for c in names):
        names.sort(key=int)
    else:
        names.sort()
    chosen = {c: entries[c][:per_class] if per_class else entries[c] for c in names}
    src.check([n for ns in chosen.values() for n in ns])
    read = src.reader()
    xs, ys = [], []
    for label, c in enumerate(names):
        y = int(c) if c.isdigit() else label
        for n in chosen[c]:
            data = read(n)
            where = f"{path}/{n}" if not src.is_zip else f"{path}:{n}"
            try:
                with Image.open(io.BytesIO(data)) as im:
                    mode, wh = im.mode, im.size
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise BackdoorLabError(f"image {where}: cannot be read ({exc.__class__.__name__})") from None
            if channels is not None:
                check(mode in MODES.get(channels, ()), f"image {where} is mode {mode}; the model takes "
                      f"{'RGB' if channels == 3 else 'greyscale (L)'} images")
            if size is not None:
                check(wh == (size[1], size[0]), f"image {where} is {wh[0]}x{wh[1]}; the model takes "
                      f"{size[1]}x{size[0]}: resize the images the way the model's training data was")
            arr = decode_image(data, where, None, "RGB" if (channels or (3 if mode != "L" else 1)) == 3 else "L")
            xs.append(arr)
            ys.append(y)
    shapes = {a.shape for a in xs}
    check(len(shapes) == 1, f"--data {path}: images differ in size {sorted(shapes)[:3]}")
    x = torch.from_numpy(np.stack(xs))
    return TensorData(x, torch.tensor(ys, dtype=torch.long)), names


__all__ = ["dataset_images", "folder_images"]
