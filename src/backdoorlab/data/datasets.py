"""Registered datasets (``cifar10``, ``gtsrb``, ``digits``), located, decoded once and cached.

Where data is looked for, in order: the ``data_dir`` argument (CLI ``--data``), the
``BACKDOORLAB_DATA`` variable, and ``$BACKDOORLAB_HOME/data`` (where ``backdoorlab data fetch``
puts archives). Decoded uint8 arrays are cached as ``.npy`` under
``$BACKDOORLAB_HOME/datasets/<name>-<key>/``, so a second load only reads them back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import stable_hash
from ..errors import BackdoorLabError, check
from ..registry import Registry, split_spec
from ..utils import home
from . import readers
from .tensordata import TensorData

READER_VERSION = 2  # 2: decode cache keyed by the source's content fingerprint


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without loading it."""

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether horizontal-flip augmentation is label-preserving
    crop_pad: int  # random-crop padding used by training augmentation
    classes: tuple[str, ...] = field(default=())


@dataclass
class DataBundle:
    """A loaded dataset: train and test splits plus its :class:`DatasetInfo`."""

    info: DatasetInfo
    train: TensorData
    test: TensorData
    source: str = ""
    fingerprint: str | None = None  # content fingerprint of the files read (None: no files)


@dataclass(frozen=True)
class DatasetEntry:
    info: Callable[..., DatasetInfo]
    candidates: tuple[str, ...]  # file or folder names looked for in the data dirs
    read: Callable[..., dict[str, readers.Arrays]]  # (path, **params) -> arrays per split
    needs_files: bool = True


DATASETS: Registry[DatasetEntry] = Registry("dataset")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
GTSRB_MEAN = (0.3403, 0.3121, 0.3214)
GTSRB_STD = (0.2724, 0.2608, 0.2669)


def _read_cifar(path: Path, size: int = 32) -> dict[str, readers.Arrays]:
    if path.is_dir() and (path / "data_batch_1").exists():
        arrays = readers.read_cifar_batches(path)
    else:
        arrays, _ = readers.read_image_folder(path, size=size)
    return arrays


def _read_gtsrb(path: Path, size: int = 32) -> dict[str, readers.Arrays]:
    from . import gtsrb_official

    if gtsrb_official.is_official(path):
        return gtsrb_official.read(path, size=size)
    arrays, _ = readers.read_image_folder(path, size=size)
    return arrays


@DATASETS.register("cifar10")
def _cifar10() -> DatasetEntry:
    return DatasetEntry(
        info=lambda size=32: DatasetInfo("cifar10", 10, 3, 32, CIFAR_MEAN, CIFAR_STD, True, 4),
        candidates=("cifar-10-batches-py", "cifar10-jpeg.zip", "cifar10"),
        read=_read_cifar,
    )


@DATASETS.register("gtsrb")
def _gtsrb() -> DatasetEntry:
    return DatasetEntry(
        # Traffic signs are not mirror-symmetric ("keep left" vs "keep right"): no flips.
        info=lambda size=32: DatasetInfo("gtsrb", 43, 3, int(size), GTSRB_MEAN, GTSRB_STD, False, 4),
        candidates=("gtsrb-jpeg.zip", "gtsrb", "GTSRB"),
        read=_read_gtsrb,
    )


@DATASETS.register("digits")
def _digits() -> DatasetEntry:
    return DatasetEntry(
        info=lambda: DatasetInfo("digits", 10, 1, 8, (0.3,), (0.37,), False, 1),
        candidates=(),
        read=lambda path: readers.read_digits(),
        needs_files=False,
    )


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset and which part of it.

    ``size``: image side after resizing (GTSRB only; CIFAR-10 and digits are fixed).
    ``train_limit`` / ``test_limit``: keep a class-stratified random subset of that many images
    (``None``: all), drawn with ``subset_seed`` so every seed of a study sees the same subset.
    """

    name: str
    size: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    subset_seed: int = 0

    @classmethod
    def from_spec(cls, spec: str | dict[str, Any]) -> DatasetConfig:
        name, params = split_spec(spec)
        DATASETS.get(name)
        from ..config import from_dict

        cfg = from_dict(cls, {"name": name, **params}, what=f"dataset {name!r}")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from ..config import check_fields

        check_fields(self, f"dataset {self.name!r}")
        check(0 <= self.subset_seed < 2**32, f"dataset {self.name!r} subset_seed must be an integer in "
                                             f"[0, 2**32), got {self.subset_seed!r}")
        if self.size is not None:
            check(self.name == "gtsrb", f"dataset {self.name!r} has a fixed image size; drop 'size'")
            check(isinstance(self.size, int) and 8 <= self.size <= 512,
                  f"dataset size must be an integer in [8, 512], got {self.size!r}")
        for key in ("train_limit", "test_limit"):
            v = getattr(self, key)
            check(v is None or (isinstance(v, int) and v > 0),
                  f"dataset {key} must be a positive integer, got {v!r}")

    def info(self) -> DatasetInfo:
        entry = DATASETS.build(self.name)
        return entry.info(self.size) if self.size is not None else entry.info()

    def read_params(self) -> dict[str, Any]:
        return {"size": self.size or 32} if self.name in ("gtsrb", "cifar10") else {}


def data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("BACKDOORLAB_DATA")
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.append(home() / "data")
    return dirs


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Path of dataset ``name``'s files, or ``None`` for datasets that need none."""
    entry = DATASETS.build(name)
    if not entry.needs_files:
        return None
    dirs = data_dirs(data_dir)
    for d in dirs:
        for cand in entry.candidates:
            p = d / cand
            if p.exists():
                return p
    looked = ", ".join(str(d) for d in dirs)
    raise BackdoorLabError(
        f"dataset {name!r} not found: looked for {' or '.join(entry.candidates)} in {looked}; "
        f"pass --data DIR, set BACKDOORLAB_DATA, or run `backdoorlab data fetch {name}`"
    )


def source_fingerprint(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """Content fingerprint of dataset ``name``'s files as located (``None``: it reads no files)."""
    from .fingerprint import fingerprint

    path = locate(name, data_dir)
    return None if path is None else fingerprint(path)


def _load_full(cfg: DatasetConfig, data_dir: str | os.PathLike | None) -> tuple[dict, str, str | None]:
    from .fingerprint import fingerprint

    entry = DATASETS.build(cfg.name)
    path = locate(cfg.name, data_dir)
    fp = None if path is None else fingerprint(path)
    params = cfg.read_params()
    key = stable_hash(cfg.name, params, fp or "", READER_VERSION)  # by content, not by path or date
    cache = home() / "datasets" / f"{cfg.name}-{key}"
    files = [cache / f"{s}_{k}.npy" for s in ("train", "test") for k in ("x", "y")]
    if all(f.exists() for f in files):
        try:
            arrays = {s: (np.load(cache / f"{s}_x.npy"), np.load(cache / f"{s}_y.npy"))
                      for s in ("train", "test")}
            return arrays, str(path or cfg.name), fp
        except (OSError, ValueError):
            shutil.rmtree(cache, ignore_errors=True)  # a damaged cache is rebuilt
    arrays = entry.read(path, **params)
    _check_arrays(cfg.name, path, arrays)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        for s, (x, y) in arrays.items():
            np.save(tmp / f"{s}_x.npy", x)
            np.save(tmp / f"{s}_y.npy", y)
        (tmp / "source.json").write_text(json.dumps({"source": str(path), "fingerprint": fp, "params": params}))
        try:
            os.replace(tmp, cache)  # atomic publish of the whole directory
        except OSError:
            pass  # another process published it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arrays, str(path or cfg.name), fp


def _check_arrays(name: str, path: Path | None, arrays: dict[str, readers.Arrays]) -> None:
    """A dataset a study can learn from and be scored on: both splits present and non-empty,
    images and labels of equal count, at least two classes to train on."""
    where = f"dataset {name!r} at {path}" if path is not None else f"dataset {name!r}"
    for split in ("train", "test"):
        check(split in arrays and len(arrays[split][0]) > 0, f"{where} has no {split} images")
        x, y = arrays[split]
        check(len(x) == len(y), f"{where}: {split} has {len(x)} images but {len(y)} labels")
    classes = np.unique(arrays["train"][1])
    check(len(classes) >= 2, f"{where} has {len(classes)} class in its training split; "
                             "a classifier needs at least 2")


def stratified_subset(y: torch.Tensor, limit: int, g: torch.Generator) -> torch.Tensor:
    """Sorted indices of a random subset of ``limit`` items that keeps class proportions."""
    n = y.shape[0]
    if limit >= n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=g)
    yp = y[perm]
    order = torch.argsort(yp, stable=True)  # group by class, random order within each class
    counts = torch.bincount(yp)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[yp[order]]
    frac = rank.double() / counts[yp[order]].double()  # interleave classes proportionally
    take = order[torch.argsort(frac, stable=True)[:limit]]
    return torch.sort(perm[take]).values


def load_dataset(
    spec: str | dict[str, Any] | DatasetConfig, data_dir: str | os.PathLike | None = None
) -> DataBundle:
    """Load a registered dataset as uint8 NHWC :class:`TensorData` splits (cached decode)."""
    cfg = spec if isinstance(spec, DatasetConfig) else DatasetConfig.from_spec(spec)
    arrays, source, fp = _load_full(cfg, data_dir)
    info = cfg.info()
    splits = {}
    for s, limit in (("train", cfg.train_limit), ("test", cfg.test_limit)):
        x, y = arrays[s]
        data = TensorData(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y).long())
        if limit is not None:
            g = torch.Generator().manual_seed(cfg.subset_seed * 2 + (s == "test"))
            data = data.subset(stratified_subset(data.y, limit, g))
        splits[s] = data
    for s in ("train", "test"):
        check(int(splits[s].y.max()) < info.num_classes,
              f"dataset {cfg.name!r} at {source} has more classes than {info.num_classes}")
    return DataBundle(info=info, train=splits["train"], test=splits["test"], source=source, fingerprint=fp)
