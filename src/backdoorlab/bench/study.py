"""Study specs: a grid over datasets x models x attacks x compressions x defenses x seeds.

A study is a YAML file (the only YAML in the repo lives in ``studies/``)::

    name: quickstart
    datasets: [digits]                  # names or {name: gtsrb, train_limit: 6000, ...}
    models: [small-cnn]
    attacks: [none, badnets, {name: blended, alpha: 0.2}]
    compress: [fp32]                    # deployment precisions (axis grows with later work)
    defenses: [none]
    seeds: [0, 1, 2]
    train: {epochs: 30, batch_size: 128}
    holdout: 0.05                       # defender's clean share of the training set
    tta: none                           # or flip: CA / ASR / RA from image + mirror-image logits
    ray: {cpus_per_cell: 1, gpus_per_cell: 0.25}   # resources per cell with --executor ray

Everything is validated before any cell runs, so a bad study changes nothing on disk.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import canonical_json, from_dict, stable_hash
from ..data.datasets import DatasetConfig, locate
from ..errors import BackdoorLabError, check
from ..registry import split_spec
from ..train.fit import TrainConfig
from .ray_executor import RayOptions

KEYS = {"name", "description", "datasets", "models", "attacks", "compress", "defenses", "seeds",
        "train", "holdout", "device", "variants", "tta", "ray"}
TTA = ("none", "flip")


def _label(spec: str | dict[str, Any]) -> str:
    """Short human label of a spec: ``badnets``, ``badnets(rate=0.05)``, ``prune-l1-50+int8-torch``."""
    if isinstance(spec, list):
        return "+".join(_label(s) for s in spec)
    name, params = split_spec(spec)
    if not params:
        return name
    inner = ",".join(f"{k}={canonical_json(v).strip(chr(34))}" for k, v in sorted(params.items()))
    return f"{name}({inner})"


@dataclass(frozen=True)
class Cell:
    """One point of the grid; ``run_id`` hashes everything that determines its result."""

    study: str
    dataset: DatasetConfig
    model: Any
    attack: Any
    compression: Any
    defense: Any
    seed: int
    train: TrainConfig
    holdout: float
    tta: str = "none"
    # content fingerprints of the files the cell reads: ("data", "sha256:...") for the dataset's
    # archive or folder, ("attack.pattern", ...) for an attack's files; filled by bind_sources()
    sources: tuple[tuple[str, str], ...] = ()

    @property
    def config(self) -> dict[str, Any]:
        from ..config import to_dict

        cfg = {"dataset": to_dict(self.dataset), "model": self.model, "attack": self.attack,
               "compression": self.compression, "defense": self.defense, "seed": self.seed,
               "train": to_dict(self.train), "holdout": self.holdout}
        if self.tta != "none":  # only then, so that run ids of studies without it stay as they were
            cfg["tta"] = self.tta
        if self.sources:  # cells on files: a changed file is a new cell (digits reads none)
            cfg["sources"] = dict(self.sources)
        return cfg

    @property
    def run_id(self) -> str:
        return stable_hash(self.config, length=20)

    @property
    def labels(self) -> dict[str, str]:
        ds = _label({"name": self.dataset.name, **{k: v for k, v in self.config["dataset"].items()
                                                   if k != "name" and v is not None and k != "subset_seed"}})
        return {"dataset": ds, "model": _label(self.model), "attack": _label(self.attack),
                "compression": _label(self.compression), "defense": _label(self.defense)}


@dataclass
class Study:
    name: str
    datasets: list[DatasetConfig]
    models: list[Any]
    attacks: list[Any]
    compress: list[Any] = field(default_factory=lambda: ["fp32"])
    defenses: list[Any] = field(default_factory=lambda: ["none"])
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)
    holdout: float = 0.05
    device: str = "auto"
    description: str = ""
    tta: str = "none"
    ray: RayOptions = field(default_factory=RayOptions)  # how --executor ray runs the cells (not in run ids)

    def cells(self) -> list[Cell]:
        return [Cell(self.name, d, m, a, c, f, s, self.train, self.holdout, self.tta)
                for d, m, a, s, c, f in itertools.product(self.datasets, self.models, self.attacks,
                                                          self.seeds, self.compress, self.defenses)]

    def select(self, only: list[str] | None = None) -> list[Cell]:
        """The cells matching every ``AXIS=VALUE`` filter (several values: ``AXIS=a,b``).

        Axes: dataset, model, attack, compression, defense, seed. A value matches a cell's label
        (``badnets(rate=0.05)``) or its bare name (``badnets``; ``gtsrb`` for a dataset subset).
        Cells keep their run ids, so a selection adds rows to the full study's results.
        """
        cells = self.cells()
        for f in only or []:
            axis, sep, value = f.partition("=")
            axis = axis.strip()
            check(sep == "=" and value.strip() != "", f"--only expects AXIS=VALUE, got {f!r}")
            axes = ("dataset", "model", "attack", "compression", "defense", "seed")
            check(axis in axes, f"--only: unknown axis {axis!r} (one of {', '.join(axes)})")
            wanted = {v.strip() for v in value.split(",")}

            def names(c: Cell, axis: str = axis) -> set[str]:
                if axis == "seed":
                    return {str(c.seed)}
                lab = c.labels[axis]
                return {lab, lab.split("(")[0], c.dataset.name if axis == "dataset" else lab}

            cells = [c for c in cells if names(c) & wanted]
            check(len(cells) > 0, f"--only {f!r} matches no cell of study {self.name!r}")
        return cells

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, variant: str | None = None) -> Study:
        """Load a study file; ``variant`` picks one of its ``variants:`` (settings that replace the
        base ones, e.g. ``gpu: {models: [preact-resnet18]}``); the study is then named
        ``<name>-<variant>``."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise BackdoorLabError(f"study file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise BackdoorLabError(f"malformed study file {path}{where}: {problem}") from None
        except UnicodeDecodeError:
            raise BackdoorLabError(f"study file {path} is not UTF-8 text") from None
        check(isinstance(raw, dict), f"study file {path} must be a mapping of settings")
        return cls.from_dict(raw, default_name=path.stem, variant=variant)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], default_name: str = "study", variant: str | None = None) -> Study:
        """Build a study from its settings, checking the type of every one (and the values that need
        no registry) with one-line errors that name the setting; then :meth:`validate` (no data)."""
        import difflib
        import re

        safe = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
        safe_text = "letters, digits, '.', '_' and '-' (at most 100, starting with a letter or digit)"

        def label_ok(v: Any) -> bool:
            return isinstance(v, str) and safe.fullmatch(v) is not None

        if "name" in raw:  # it labels every result row and is what `results --study` selects by
            check(label_ok(raw["name"]), f"study name must be a non-empty string of {safe_text}, "
                                         f"got {raw['name']!r}")
        variants = raw.get("variants")
        variants = {} if variants is None else variants
        check(isinstance(variants, dict), f"study 'variants' must map variant names to settings, got {variants!r}")
        for vname, over in variants.items():
            check(label_ok(vname), f"study variant names extend the study name and must be strings of {safe_text}, "
                                   f"got {vname!r}")
            check(isinstance(over, dict) and "variants" not in over and "name" not in over,
                  f"study variant {vname!r} must be a mapping of settings (without name or variants)")
        if variant is not None:
            if variant not in variants:
                known = ", ".join(map(str, variants)) or "none"
                raise BackdoorLabError(f"study has no variant {variant!r} (variants: {known})")
            base = str(raw.get("name", default_name))
            raw = {**{k: v for k, v in raw.items() if k != "variants"}, **variants[variant],
                   "name": f"{base}-{variant}"}

        for key in raw:
            if key not in KEYS:
                close = difflib.get_close_matches(str(key), sorted(KEYS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise BackdoorLabError(f"study has no setting {key!r}{hint}")
        for key in ("datasets", "models", "attacks"):
            check(key in raw, f"study needs a '{key}' list")

        def as_list(key: str, default: list[Any]) -> list[Any]:
            v = raw.get(key, default)
            v = [v] if isinstance(v, (str, dict, int)) else v
            check(isinstance(v, list) and len(v) > 0, f"study '{key}' must be a non-empty list")
            return v

        def is_spec(s: Any) -> bool:
            if isinstance(s, dict):
                s = s.get("name")
            return isinstance(s, str) and s.strip() != ""

        def specs(key: str, default: list[Any], chains: bool = False) -> list[Any]:
            items = as_list(key, default)
            what = "a name or a mapping with a 'name'" + (", or a list of those (a chain)" if chains else "")
            for s in items:
                chain = chains and isinstance(s, list) and len(s) > 0 and all(is_spec(p) for p in s)
                check(is_spec(s) or chain, f"study '{key}' entries must each be {what}, got {s!r}")
            return items

        def text(key: str, default: str, allow_null: bool = False) -> str:
            v = raw.get(key, default)
            v = default if v is None and allow_null else v
            check(isinstance(v, str), f"study {key} must be a string, got {v!r}")
            return v

        train_raw = raw.get("train")
        train_raw = {} if train_raw is None else train_raw
        check(isinstance(train_raw, dict), f"study 'train' must be a mapping of training settings, got {train_raw!r}")
        train = from_dict(TrainConfig, train_raw, what="train")
        train.validate()
        seeds = as_list("seeds", [0])
        for s in seeds:
            check(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32,
                  f"seeds must be non-negative integers below 2**32, got {s!r}")
        holdout = raw.get("holdout", 0.05)
        check(isinstance(holdout, (int, float)) and not isinstance(holdout, bool) and 0 <= holdout < 1,
              f"holdout must be a number in [0, 1), got {holdout!r}")
        ray_raw = raw.get("ray")
        ray_raw = {} if ray_raw is None else ray_raw
        check(isinstance(ray_raw, dict), f"study 'ray' must be a mapping of executor settings "
                                         f"(cpus_per_cell, gpus_per_cell, max_retries), got {ray_raw!r}")
        ray = from_dict(RayOptions, ray_raw, what="ray")
        ray.validate()
        tta = raw.get("tta", "none")
        check(isinstance(tta, str) and tta in TTA, f"tta must be one of {', '.join(TTA)}, got {tta!r}")
        study = cls(
            name=str(raw.get("name", default_name)),
            datasets=[DatasetConfig.from_spec(d) for d in specs("datasets", [])],
            models=specs("models", []),
            attacks=specs("attacks", []),
            compress=specs("compress", ["fp32"], chains=True),
            defenses=specs("defenses", ["none"]),
            seeds=seeds,
            train=train,
            holdout=float(holdout),
            device=text("device", "auto"),
            description=text("description", "", allow_null=True),
            tta=tta,
            ray=ray,
        )
        study.validate(check_data=False)  # data files are checked where data_dir is known
        return study

    def validate(self, data_dir: str | os.PathLike | None = None, check_data: bool = True,
                 cells: list[Cell] | None = None, check_device: bool = True) -> None:
        """Build every named thing once (cheaply) and find every dataset's files (only those the
        given ``cells`` use, if any), so errors surface before any work is done or anything is
        written. ``check_device=False``: the device is not this machine's to check (the Ray
        executor's workers resolve it)."""
        from ..attacks import ATTACKS
        from ..compress import COMPRESSIONS
        from ..defenses import DEFENSES
        from ..models import MODELS
        from ..utils import resolve_device

        if check_device:
            resolve_device(self.device)
        for m in self.models:
            name, params = split_spec(m)
            MODELS.check_params(name, params)
        for c in self.compress:
            COMPRESSIONS.validate(c)
        for f in self.defenses:
            DEFENSES.validate(f)
        for d in self.datasets:
            if check_data and (cells is None or any(c.dataset == d for c in cells)):
                locate(d.name, data_dir)
            info = d.info()
            check(self.tta != "flip" or info.hflip,
                  f"tta 'flip' averages each image with its mirror image, but {d.name} is not mirror-symmetric "
                  f"(a flip changes its classes); use tta: none")
            for a in self.attacks:
                ATTACKS.build(a, info=info)  # checks target range, rate, patch fit, files


def bind_sources(cells: list[Cell], data_dir: str | os.PathLike | None = None) -> list[Cell]:
    """``cells`` with :attr:`Cell.sources` set to the content fingerprints of the files each one
    reads: its dataset's archive or folder as located from ``data_dir``, the files its attack
    names (:meth:`~backdoorlab.attacks.base.Attack.files`) and the other datasets its attack reads
    (:meth:`~backdoorlab.attacks.base.Attack.datasets`, located from ``data_dir`` too).
    Fingerprints are cached by ``stat`` signature, so binding an unchanged study costs a few ``stat`` calls."""
    import dataclasses

    from ..attacks import ATTACKS
    from ..data.datasets import source_fingerprint
    from ..data.fingerprint import fingerprint

    data_fp: dict[str, str | None] = {}
    attack_fp: dict[str, dict[str, str]] = {}
    out = []
    for c in cells:
        if c.dataset.name not in data_fp:
            data_fp[c.dataset.name] = source_fingerprint(c.dataset.name, data_dir)
        akey = canonical_json([c.attack, c.dataset])
        if akey not in attack_fp:
            attack = ATTACKS.build(c.attack, info=c.dataset.info())
            attack_fp[akey] = {f"attack.{k}": fingerprint(p) for k, p in sorted(attack.files().items())}
            for k, name in sorted(attack.datasets().items()):
                if name not in data_fp:
                    data_fp[name] = source_fingerprint(name, data_dir)
                if data_fp[name] is not None:
                    attack_fp[akey][f"attack.{k}"] = data_fp[name]
        src = {} if data_fp[c.dataset.name] is None else {"data": data_fp[c.dataset.name]}
        src.update(attack_fp[akey])
        out.append(dataclasses.replace(c, sources=tuple(sorted(src.items()))))
    return out
