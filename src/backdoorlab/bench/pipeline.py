"""The staged pipeline: data -> poison -> train -> compress -> defense -> metrics -> store.

Each costly stage is an artifact keyed by its config and its parent's key (see
:class:`~backdoorlab.bench.cache.ArtifactCache`); the poison stage stores only index records
(the poisoned images are recomputed from them, deterministically), the train stage stores the
weights. A cell's row is written in one transaction when the cell ends, so a study killed at
any point and run again finishes the missing cells only, with no lost or duplicated row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks import ATTACKS, Attack, NoAttack, PoisonedSplit
from ..classifier import Classifier
from ..config import canonical_json, to_dict
from ..data.datasets import DataBundle, DatasetConfig, load_dataset
from ..data.splits import defender_split
from ..data.tensordata import TensorData
from ..errors import BackdoorLabError, check
from ..metrics import asr, clean_acc, ra
from ..models import build_model
from ..registry import split_spec
from ..train.fit import fit
from ..utils import derive_seed, generator, resolve_device
from .cache import ArtifactCache
from .store import ResultStore, Row, new_owner, now, versions
from .study import TTA, Cell, Study

POISON_VERSION = 1
ASSET_VERSION = 1
DEFENSE_VERSION = 1
TRAIN_VERSION = 1


def _top1(clf: Classifier, x: torch.Tensor, batch_size: int, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 labels of ``x`` without and with test-time augmentation ``tta`` (``flip``: the
    logits of each image and of its mirror image summed, airbench's protocol)."""
    plain, aug = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        logits = clf.logits(xb)
        plain.append(logits.argmax(1).cpu())
        if tta == "flip":
            aug.append((logits + clf.logits(xb.flip(3))).argmax(1).cpu())
    if not plain:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    p = torch.cat(plain)
    return p, (torch.cat(aug) if aug else p)


def evaluate(clf: Classifier, test: TensorData, attack: Attack, batch_size: int = 1024,
             tta: str = "none") -> dict[str, Any]:
    """CA on the clean test set; ASR and RA on its triggered copy (see :mod:`backdoorlab.metrics`).

    ``tta="flip"`` (study setting ``tta: flip``, for mirror-symmetric datasets): predictions sum
    the logits of each image and of its horizontal mirror, for clean and triggered images alike;
    ``ca`` / ``asr`` / ``ra`` are then those of the augmented predictions, the single-view ones are
    kept as ``ca_plain`` / ``asr_plain`` / ``ra_plain``, and ``tta`` names the protocol.
    """
    check(tta in TTA, f"tta must be one of {', '.join(TTA)}, got {tta!r}")
    x = test.float()
    counted = attack.counted(test.y)
    yc = test.y[counted]
    pred, pred_aug = _top1(clf, x, batch_size, tta)
    pred_t, pred_t_aug = _top1(clf, attack.apply(x[counted]), batch_size, tta)

    def scores(p: torch.Tensor, pt: torch.Tensor) -> dict[str, float]:
        return {"ca": clean_acc(p, test.y), "asr": asr(pt, attack.target_labels(yc)), "ra": ra(pt, yc)}

    out: dict[str, Any] = scores(pred, pred_t)
    if tta != "none":
        out = {**scores(pred_aug, pred_t_aug), **{f"{k}_plain": v for k, v in out.items()}, "tta": tta}
    return out


@dataclass
class Poisoned:
    """Output of the split+poison stage."""

    split: PoisonedSplit  # poisoned training set (the holdout removed)
    holdout: TensorData  # the defender's clean holdout
    train_idx: torch.Tensor  # indices of ``split.data`` in the full training set
    key: str


def _algo_version(spec: Any) -> int | None:
    """The registered attack's ``algo_version`` (``None``: keys follow the spec alone, as before)."""
    from ..attacks.base import ATTACKS
    from ..registry import split_spec

    name, _ = split_spec(spec)
    return getattr(ATTACKS.get(name), "algo_version", None)


class Pipeline:
    """Runs cells, reusing artifacts from ``cache`` and in-memory results within one run."""

    def __init__(self, cache: ArtifactCache | None = None, data_dir: str | None = None,
                 device: str | torch.device = "auto", progress: bool | None = None,
                 log: Callable[[str], None] | None = None):
        self.cache = cache or ArtifactCache()
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.data_dir = data_dir
        self.device = resolve_device(device)
        self.progress = progress
        self._data: dict[str, DataBundle] = {}
        self._models: dict[str, tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]] = {}
        self._compressed: dict[str, Classifier] = {}
        self._poisoned: dict[str, Poisoned] = {}
        self._assets: dict[str, dict[str, Any]] = {}
        self._sources: dict[str, tuple[tuple[str, str], ...]] = {}
        self.trained: list[str] = []  # the train keys this pipeline really trained (not loaded), in order

    # -------------------------------------------------------------- stages
    def data(self, cfg: DatasetConfig) -> DataBundle:
        key = ArtifactCache.key("data", to_dict(cfg))
        if key not in self._data:
            self._data = {key: load_dataset(cfg, self.data_dir)}  # hold one dataset at a time
        return self._data[key]

    @staticmethod
    def _poison_cfg(cell: Cell) -> dict[str, Any]:
        cfg = {"dataset": to_dict(cell.dataset), "attack": cell.attack, "seed": cell.seed,
               "holdout": cell.holdout, "v": POISON_VERSION}
        version = _algo_version(cell.attack)
        if version is not None:  # the attack's algorithm or a default changed since: poison anew
            cfg["algo"] = version
        if cell.sources:  # the files' content: every later stage's key chains from this one
            cfg["sources"] = dict(cell.sources)
        return cfg

    def bind(self, cells: list[Cell]) -> list[Cell]:
        """``cells`` with the content fingerprints of their files (:func:`bind_sources`), worked out
        once per dataset and attack spec in this pipeline."""
        from .study import bind_sources

        out = []
        for c in cells:
            memo = canonical_json([c.dataset, c.attack])
            if memo not in self._sources:
                self._sources[memo] = bind_sources([c], self.data_dir)[0].sources
            out.append(dataclasses.replace(c, sources=self._sources[memo]))
        return out

    def prepare(self, cells: list[Cell]) -> list[Cell]:
        """Bind ``cells`` to their files' fingerprints and load (decode and check) every dataset
        they use, before any row is written: a corrupt, truncated, oversized or one-class dataset
        is the user's mistake and fails here with one line, leaving the store untouched, instead
        of as an error row per cell. Decoded datasets are cached, so the cells then load them
        from the cache. Returns the bound cells."""
        cells = self.bind(cells)
        seen: set[str] = set()
        for c in cells:
            key = canonical_json([c.dataset, c.sources])
            if key not in seen:
                seen.add(key)
                self._check_source(c, self.data(c.dataset))
        return cells

    @staticmethod
    def _check_source(cell: Cell, bundle: DataBundle) -> None:
        want = dict(cell.sources).get("data")
        check(want is None or bundle.fingerprint == want,
              f"dataset {cell.dataset.name!r} at {bundle.source} changed while the study ran; run it again")

    def _train_cfg(self, cell: Cell, attack: Attack) -> dict[str, Any]:
        """The train stage's config. A two-phase attack (``attack.init_from()`` not ``None``) adds
        the train key of the model it starts from and the config of its own phase; an attack that
        trains from scratch with its own recipe (``init: scratch``) adds that recipe. Attacks that
        train with the cell's recipe keep their keys."""
        cfg = {"model": cell.model, "train": to_dict(cell.train), "seed": cell.seed, "v": TRAIN_VERSION}
        if attack.algo_version is not None:  # its training changed since: retrain
            cfg["algo"] = attack.algo_version
        init = attack.init_from()
        if init is not None:
            parent = dataclasses.replace(cell, attack=init)
            pattack = ATTACKS.build(init, info=self.data(cell.dataset).info)
            cfg["init"] = ArtifactCache.key("train", self._train_cfg(parent, pattack),
                                            ArtifactCache.key("poison", self._poison_cfg(parent)))
            cfg["phase"] = to_dict(attack.train_config(cell.train))
        elif (phase := attack.train_config(cell.train)) != cell.train:  # own recipe from scratch
            cfg["phase"] = to_dict(phase)
        return cfg

    def train_key(self, cell: Cell) -> str:
        """The key of ``cell``'s trained model, as :meth:`train` computes it, without poisoning or
        training anything: every compression x defense cell of one model shares it."""
        if not cell.sources:
            cell = self.bind([cell])[0]
        attack = ATTACKS.build(cell.attack, info=self.data(cell.dataset).info)
        poison_key = ArtifactCache.key("poison", self._poison_cfg(cell))
        return ArtifactCache.key("train", self._train_cfg(cell, attack), poison_key)

    def attack(self, cell: Cell) -> Attack:
        """The cell's attack, built once per cell and given the assets it declares
        (:meth:`~backdoorlab.attacks.base.Attack.assets`), built or read from the cache."""
        attack = ATTACKS.build(cell.attack, info=self.data(cell.dataset).info)
        specs = attack.assets()
        if specs:
            attack.bind_assets({name: self.asset(cell, spec) for name, spec in sorted(specs.items())})
        return attack

    def asset(self, cell: Cell, spec: Any) -> dict[str, torch.Tensor]:
        """An attack's asset (an encoder, a model, an image pool), built by its registered builder
        (:data:`~backdoorlab.attacks.base.ASSETS`) from the attacker's view of the data (the training
        split, holdout excluded) and cached under stage ``asset``, keyed by the spec and everything
        the builder may read (dataset, file fingerprints, seed, holdout, model and training recipe).
        The build time is kept with it and reported as the row's ``prep_wall``."""
        from ..attacks.base import ASSETS, AssetContext

        key = self._asset_key(cell, spec)
        if key in self._assets:
            return self._assets[key]["tensors"]
        rec = self.cache.get("asset", key)
        if rec is None:
            with self.cache.lock("asset", key):
                rec = self.cache.get("asset", key)  # another process may have built it meanwhile
                if rec is None:
                    bundle = self.data(cell.dataset)
                    train_idx, _ = defender_split(len(bundle.train), cell.holdout, generator(cell.seed, "holdout"))

                    def model(attack_spec: Any) -> nn.Module:
                        c = dataclasses.replace(cell, attack=attack_spec)
                        a = self.attack(c)
                        return self.train(c, self.poison(c, a), a)[0]

                    name, _ = split_spec(spec)
                    self.log(f"building asset {name} for {cell.labels['attack']} on {cell.labels['dataset']} "
                             f"seed={cell.seed} (asset key {key})")
                    ctx = AssetContext(train=bundle.train.subset(train_idx), info=bundle.info,
                                       generator=generator(cell.seed, "asset", canonical_json(spec)),
                                       device=self.device, model=model,
                                       dataset=lambda name: load_dataset(name, self.data_dir))
                    t0 = time.perf_counter()
                    tensors = ASSETS.build(spec, ctx=ctx)
                    rec = {"tensors": {k: v.detach().cpu() for k, v in tensors.items()},
                           "meta": {"build_s": time.perf_counter() - t0, "key": key}}
                    self.cache.put("asset", key, rec)
        self._assets[key] = rec
        return rec["tensors"]

    @staticmethod
    def _asset_key(cell: Cell, spec: Any) -> str:
        return ArtifactCache.key("asset", {
            "spec": spec, "algo": _algo_version(cell.attack), "dataset": to_dict(cell.dataset),
            "sources": dict(cell.sources), "seed": cell.seed,
            "holdout": cell.holdout, "model": cell.model, "train": to_dict(cell.train), "v": ASSET_VERSION})

    def prep_wall(self, cell: Cell, attack: Attack) -> float:
        """Seconds the cell's assets took to build (when they were built, in whichever process)."""
        return sum(float(self._assets[self._asset_key(cell, spec)]["meta"]["build_s"])
                   for spec in attack.assets().values())

    def poison(self, cell: Cell, attack: Attack | None = None) -> Poisoned:
        if not cell.sources:
            cell = self.bind([cell])[0]
        bundle = self.data(cell.dataset)
        self._check_source(cell, bundle)
        attack = attack if attack is not None else self.attack(cell)
        cfg = self._poison_cfg(cell)
        key = ArtifactCache.key("poison", cfg)
        if key in self._poisoned:  # every compression x defense cell of a model shares it
            return self._poisoned[key]
        n = len(bundle.train)
        rec = self.cache.get("poison", key)
        train_idx, hold_idx = defender_split(n, cell.holdout, generator(cell.seed, "holdout"))
        train = bundle.train.subset(train_idx)
        split = attack.poison(train, generator(cell.seed, "poison"))
        if rec is None:
            self.cache.put("poison", key, {"poison_idx": split.poison_idx, "holdout_idx": hold_idx,
                                           "train_idx": train_idx, "config": cfg})
        elif not torch.equal(rec["poison_idx"], split.poison_idx):
            raise BackdoorLabError(f"poison artifact {key} disagrees with a recomputation; "
                                   f"delete {self.cache.path('poison', key)} and rerun")
        self._poisoned = {key: Poisoned(split, bundle.train.subset(hold_idx), train_idx, key)}
        return self._poisoned[key]

    def train(self, cell: Cell, poisoned: Poisoned, attack: Attack) -> tuple[nn.Module, dict[str, Any]]:
        """The cell's trained model: from memory, from the cache, or trained and cached.

        Concurrent runs sharing the cache train each model once: a miss takes the artifact's lock
        (:meth:`ArtifactCache.lock`) and looks again before training, so a process that waited for
        another one's training loads its result. A real training logs one line, ``training <model>
        for <attack> on <dataset> seed=<s> (train key <key>)``."""
        info = self.data(cell.dataset).info
        cfg = self._train_cfg(cell, attack)
        key = ArtifactCache.key("train", cfg, poisoned.key)
        if key in self._models:
            model, meta, state = self._models[key]
            attack.load_state_dict(state)
            return model, meta
        torch.manual_seed(derive_seed(cell.seed, "init"))  # only the runner seeds (house rule 2)
        model = build_model(cell.model, info.num_classes, info.channels, info.mean, info.std)
        rec = self.cache.get("train", key)
        lock = self.cache.lock("train", key) if rec is None else contextlib.nullcontext()
        with lock:
            if rec is None:
                rec = self.cache.get("train", key)  # another process may have trained it meanwhile
            if rec is not None:
                model.load_state_dict(rec["state_dict"])
                meta = dict(rec["meta"])
                state = dict(rec.get("attack_state", {}))
                attack.load_state_dict(state)  # a learned trigger travels with the trained model
            else:
                lab = cell.labels
                self.log(f"training {lab['model']} for {lab['attack']} on {lab['dataset']} seed={cell.seed} "
                    f"(train key {key})")
                train_cfg = attack.train_config(cell.train)
                if (init := attack.init_from()) is not None:  # second phase: start from the init attack's model
                    parent = dataclasses.replace(cell, attack=init)
                    pattack = self.attack(parent)
                    base, _ = self.train(parent, self.poison(parent, pattack), pattack)
                    model.load_state_dict(base.state_dict())
                hooks = [h] if (h := attack.train_hook()) is not None else []
                result = fit(model, poisoned.split.data, train_cfg, generator=generator(cell.seed, "train"),
                             hooks=hooks, device=self.device, crop_pad=info.crop_pad, hflip=info.hflip,
                             progress=self.progress)
                model = result.model.cpu()
                meta = {"train_wall": result.wall_time, "images_per_s": result.images_per_s,
                        "history": result.history, "key": key}
                state = {k: v.detach().cpu() for k, v in attack.state_dict().items()}
                rec = {"state_dict": model.state_dict(), "meta": meta}
                if state:  # only then, so artifacts of attacks that learn nothing keep their bytes
                    rec["attack_state"] = state
                self.cache.put("train", key, rec)
                self.trained.append(key)
        model.eval()
        self._models = {key: (model, meta, state)}  # keep the latest model only
        return model, meta

    def retrain(self, cell: Cell, poisoned: Poisoned, attack: Attack, keep: torch.Tensor) -> nn.Module | None:
        """A training-data filter's retraining step: the cell's model trained again from scratch,
        with the recipe and seed of :meth:`train`, on the samples of the received training set
        where the ``(N,)`` bool ``keep`` is true; cached under the train stage, keyed by the
        training config and a digest of ``keep``. ``None`` for an attack that poisons during
        training (a training hook) or starts from another model: removing samples cannot remove
        those backdoors, and there is nothing to retrain on."""
        if attack.train_hook() is not None or attack.init_from() is not None:
            return None
        keep = keep.bool().cpu()
        if bool(keep.all()):
            # nothing removed: the same samples, recipe and seeds give the model :meth:`train`
            # built (bit for bit on CPU), so it is reused instead of trained a second time
            model, _ = self.train(cell, poisoned, attack)
            return copy.deepcopy(model).eval()
        info = self.data(cell.dataset).info
        digest = hashlib.sha256(keep.numpy().tobytes()).hexdigest()[:16]
        key = ArtifactCache.key("train", {**self._train_cfg(cell, attack), "retrain_keep": digest}, poisoned.key)
        torch.manual_seed(derive_seed(cell.seed, "init"))
        model = build_model(cell.model, info.num_classes, info.channels, info.mean, info.std)
        with self.cache.lock("train", key):
            rec = self.cache.get("train", key)
            if rec is None:
                self.log(f"retraining {cell.labels['model']} on {int(keep.sum())} of {len(keep)} samples kept by "
                         f"a filter (train key {key})")
                result = fit(model, poisoned.split.data.subset(torch.nonzero(keep).flatten()),
                             attack.train_config(cell.train), generator=generator(cell.seed, "train"),
                             device=self.device, crop_pad=info.crop_pad, hflip=info.hflip, progress=self.progress)
                rec = {"state_dict": result.model.cpu().state_dict(),
                       "meta": {"train_wall": result.wall_time, "key": key, "n_kept": int(keep.sum())}}
                self.cache.put("train", key, rec)
        model.load_state_dict(rec["state_dict"])
        return model.eval()

    def compress(self, cell: Cell, model: nn.Module, poisoned: Poisoned, train_key: str) -> tuple[Classifier, str]:
        """The deployed classifier of ``cell.compression``, calibrated on the defender's holdout.

        Keyed by hash(compression spec, train key, poison key): the train key covers the model and
        its weights, the poison key the holdout (the calibration set), the spec its ``calib_size``.
        Artifacts that are costly to build (``int8-torch`` state dict, ONNX bytes) are stored in the
        cache and rebuilt from it without calibrating; the latest classifier is kept in memory.
        """
        from ..compress import compress

        key = ArtifactCache.key("compress", {"spec": cell.compression, "v": 1}, f"{train_key}/{poisoned.key}")
        if key in self._compressed:
            return self._compressed[key], key
        rec = self.cache.get("compress", key)
        clf = compress(cell.compression, model, calib=poisoned.holdout, device=self.device, artifact=rec)
        if rec is None and clf.artifact is not None:
            self.cache.put("compress", key, clf.artifact)
        self._compressed = {key: clf}  # keep the latest classifier only
        return clf, key

    # -------------------------------------------------------------- one cell
    def run_cell(self, cell: Cell) -> dict[str, Any]:
        from ..classifier import agreement

        if not cell.sources:  # a cell from the Python API, not bound by run_study
            cell = self.bind([cell])[0]
        bundle = self.data(cell.dataset)
        attack = self.attack(cell)  # built once per cell: poisoning, training, scoring and defense share it
        poisoned = self.poison(cell, attack)
        model, meta = self.train(cell, poisoned, attack)
        clf, ckey = self.compress(cell, model, poisoned, meta["key"])
        # CA / ASR / RA of the deployed artifact itself
        metrics = evaluate(clf, bundle.test, attack, tta=cell.tta)
        metrics.update(n_train=len(poisoned.split.data), n_poison=int(poisoned.split.poison_idx.numel()),
                       n_holdout=len(poisoned.holdout), n_test=len(bundle.test),
                       train_wall=meta["train_wall"], precision=clf.precision, size_bytes=clf.size_bytes,
                       int8_layers=clf.int8_layers, runtime=clf.info.get("runtime"),
                       runtime_version=clf.info.get("runtime_version"), simulated=bool(clf.info.get("simulated")))
        # a simulated artifact (int4 fake-quant) has no kernel of its own: its latency is not reported
        if not metrics["simulated"]:
            metrics["latency_ms_b1"] = clf.latency_ms(batch_size=1, repeats=5, warmup=1,
                                                      x=bundle.test.subset(torch.arange(1)).float())
        if attack.assets():
            metrics["prep_wall"] = self.prep_wall(cell, attack)
        if clf.surrogate is not None:
            metrics["surrogate_agreement"] = agreement(clf, clf.surrogate, bundle.test.float())
        artifacts = {"poison": poisoned.key, "train": meta["key"], "compress": ckey}
        if split_spec(cell.defense)[0] != "none":
            dmetrics, images = self.defend(cell, clf, model, poisoned, attack, metrics)
            metrics["deployed_surrogate_agreement"] = metrics.pop("surrogate_agreement", None)
            metrics.update(dmetrics)
            if images:
                dkey = ArtifactCache.key("defense", {"run_id": cell.run_id, "v": DEFENSE_VERSION})
                self.cache.put("defense", dkey, {"images": {k: v.detach().cpu().float() for k, v in images.items()}})
                artifacts["defense"] = dkey
        return {"metrics": metrics, "artifacts": artifacts}

    def defend(self, cell: Cell, clf: Classifier, model: nn.Module, poisoned: Poisoned, attack: Attack,
               before: dict[str, float]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Run the cell's defense on the deployed ``clf`` (see :mod:`backdoorlab.defenses.evaluate`).

        The defense sees the defender's holdout, the training set as the victim received it, the
        FP32 model and a ``redeploy`` that compresses a repaired model as this cell does; the
        ground truth (attack, poisoned indices, test set) is used only to score it.
        """
        from ..compress import compress
        from ..defenses import DEFENSES, DefenseContext
        from ..defenses.evaluate import Truth, run_defense

        info = self.data(cell.dataset).info
        defense = DEFENSES.build(cell.defense)
        ctx = DefenseContext(
            clf=clf, clean=poisoned.holdout, num_classes=info.num_classes,
            generator=generator(cell.seed, "defense", canonical_json(cell.defense)), device=self.device,
            train=poisoned.split.data, model=model,
            redeploy=lambda m: compress(cell.compression, m, calib=poisoned.holdout, device=self.device),
            progress=bool(self.progress), retrain=lambda keep: self.retrain(cell, poisoned, attack, keep))
        truth = Truth(attack, poisoned.split.is_poisoned, self.data(cell.dataset).test,
                      before={k: before[k] for k in ("ca", "asr", "ra")}, tta=cell.tta,
                      reference_model=self.reference_model(cell) if self._wants_reference(defense, attack, before)
                      else None)
        return run_defense(defense, ctx, truth)

    @staticmethod
    def _wants_reference(defense: Any, attack: Attack, before: dict[str, Any]) -> bool:
        """A remover on a backdoored model: its row says whether the backdoor is gone or dormant,
        which needs a clean model of the same architecture (:mod:`backdoorlab.defenses.dormant`)."""
        from ..defenses import Remover
        from ..defenses.evaluate import ASR_BACKDOORED

        return (isinstance(defense, Remover) and defense.dormancy is not None and not isinstance(attack, NoAttack)
                and before["asr"] >= ASR_BACKDOORED)

    def reference_model(self, cell: Cell) -> nn.Module:
        """The clean FP32 model of ``cell``'s dataset, architecture, recipe and seed: the cell with
        attack ``none`` (trained once and cached; a study with ``none`` among its attacks has it)."""
        ref = dataclasses.replace(cell, attack="none", defense="none", compression="fp32",
                                  sources=tuple(s for s in cell.sources if not s[0].startswith("attack.")))
        attack = self.attack(ref)
        model, _ = self.train(ref, self.poison(ref, attack), attack)
        return model


def _summary(m: dict[str, Any]) -> str:
    """One log line: the deployed model's CA / ASR / RA, then the defense's verdict if any."""
    out = f"CA {m['ca']:.4f}  ASR {m['asr']:.4f}  RA {m['ra']:.4f}"
    if "defense_kind" in m:
        score = m.get("defense_score")
        verdict = {True: "detected", False: "not detected", None: "no verdict"}[m.get("detected")]
        out += f"  | {verdict}, score {score:.4f}" if isinstance(score, float) else f"  | {verdict}"
        if m.get("flagged"):
            out += f", flagged {m['flagged']}"
        if "asr_after" in m:
            out += f", after repair CA {m['ca_after']:.4f} ASR {m['asr_after']:.4f}"
    return out


#: Seconds between heartbeats of a running study's leases (well under ``store.LEASE_STALE_S``).
HEARTBEAT_S = 30.0
#: Seconds between looks at the cells other processes hold, once this process has run the rest.
WAIT_POLL_S = 3.0


class _Heartbeat:
    """A daemon thread refreshing ``owner``'s leases every ``HEARTBEAT_S`` seconds until stopped.
    A failed refresh (the store busy past SQLite's timeout) is retried at the next beat."""

    def __init__(self, store: ResultStore, owner: str):
        self.store, self.owner = store, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backdoorlab-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.heartbeat(self.owner)
            except (sqlite3.Error, BackdoorLabError, OSError):
                pass

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def execute_cell(pipe: Pipeline, cell: Cell) -> dict[str, Any]:
    """Run ``cell`` and return its row's fields (``status``, ``metrics``, ``artifacts``, ``error``,
    ``wall_time``, ``finished_at``), with the executors' one error semantics: a method's failure
    (:class:`BackdoorLabError`, ``RuntimeError``, ``ValueError``, ``MemoryError``) is an ``error``
    row, with its traceback in the metrics unless it is a user error; any other exception (a
    programming error) propagates."""
    out: dict[str, Any] = {"status": "ok", "metrics": {}, "artifacts": {}, "error": None}
    t0 = time.perf_counter()
    try:
        res = pipe.run_cell(cell)
        out["metrics"], out["artifacts"] = res["metrics"], res["artifacts"]
    except (BackdoorLabError, RuntimeError, ValueError, MemoryError) as exc:
        out["status"], out["error"] = "error", f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, BackdoorLabError):
            out["metrics"] = {"traceback": traceback.format_exc(limit=5)}
    out["wall_time"] = time.perf_counter() - t0
    out["finished_at"] = now()
    return out


def new_row(study: str, cell: Cell, vers: dict[str, str]) -> Row:
    """``cell``'s row, not run yet (status ``running``)."""
    lab = cell.labels
    return Row(cell.run_id, study, lab["dataset"], lab["model"], lab["attack"], lab["compression"],
               lab["defense"], cell.seed, cell.config, status="running", versions=vers, started_at=now())


def cell_line(i: int, n: int, cell: Cell, row: Row, written: bool, note: str = "") -> str:
    """The log line of a finished cell: ``[i/n] <labels> seed=<s>: <summary or error> (<wall> s)``."""
    lab = cell.labels
    result = _summary(row.metrics) if row.status == "ok" else str(row.error)
    if not written:
        result += " (not stored: another process had finished this cell)"
    return (f"[{i}/{n}] {lab['dataset']} {lab['model']} {lab['attack']} {lab['compression']} "
            f"{lab['defense']} seed={cell.seed}: {result} ({row.wall_time or 0:.1f} s{note})")


EXECUTORS = ("local", "ray")


def run_study(study: Study, store: ResultStore, *, cache: ArtifactCache | None = None,
              data_dir: str | None = None, device: str | None = None, progress: bool | None = None,
              log: Callable[[str], None] | None = None, retry_errors: bool = True,
              cells: list[Cell] | None = None, executor: str = "local", address: str | None = None,
              cpus_per_cell: int | None = None, gpus_per_cell: float | None = None,
              max_retries: int | None = None) -> list[Row]:
    """Run every cell of ``study`` (or the given subset ``cells``) that ``store`` does not already
    hold as ``ok``; returns the rows this process ran.

    Several processes may run one study on one store (and one artifact cache) at once and share
    the work: each claims a cell (:meth:`ResultStore.claim`, a lease with its pid, host and a
    heartbeat refreshed every ``HEARTBEAT_S`` seconds) before running it and skips the cells
    others hold; once through its list, it waits for the cells live processes hold, taking over
    those whose holder died, until every cell has finished (``ok`` or ``error``). A finished
    ``ok`` row is never rewritten, and each model is trained once (see :meth:`Pipeline.train`).

    ``executor="ray"`` runs the cells as tasks on the Ray cluster at ``address`` (``None``:
    ``$RAY_ADDRESS``, else a local one), this process being the store's one writer; see
    :mod:`backdoorlab.bench.ray_executor`. ``cpus_per_cell``, ``gpus_per_cell`` and
    ``max_retries`` override the study's ``ray:`` setting (:class:`~.ray_executor.RayOptions`)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check(executor in EXECUTORS, f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    ray_opts = {"cpus_per_cell": cpus_per_cell, "gpus_per_cell": gpus_per_cell, "max_retries": max_retries}
    if executor == "ray":
        from .ray_executor import _import_ray

        _import_ray()  # the extra is missing: one line, before anything is done
        options = study.ray.replace(**ray_opts)
    else:
        given = [k for k, v in {"address": address, **ray_opts}.items() if v is not None]
        check(not given, f"{', '.join(given)} apply to executor 'ray' only (this run's executor is {executor!r})")
    owner, since = new_owner(), now()  # rows finished from now on by others are not rerun
    # the Ray driver only binds and checks data: its cells resolve their device on the workers
    pipe = Pipeline(cache, data_dir, "cpu" if executor == "ray" else device or study.device, progress, log)
    # run ids hold the content fingerprints of the files each cell reads: a changed file is new work
    cells = pipe.bind(study.cells() if cells is None else cells)
    done = store.status(c.run_id for c in cells)
    todo = [c for c in cells if done.get(c.run_id) != "ok" and (retry_errors or c.run_id not in done)]
    pipe.prepare(todo)  # every dataset decoded and checked before the first row is written
    log(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    if executor == "ray":
        from .ray_executor import run_ray

        if not todo:
            return []
        return run_ray(study, store, pipe, todo, owner=owner, since=since, log=log, address=address,
                       options=options, device=str(device or study.device))
    rows: list[Row] = []
    vers = versions()

    def run(i: int, cell: Cell) -> None:  # the lease on ``cell`` is held
        row = new_row(study.name, cell, vers)
        finished = False
        try:
            store.put(row)  # never replaces an ok row
            out = execute_cell(pipe, cell)
            for f in ("status", "metrics", "artifacts", "error", "wall_time", "finished_at"):
                setattr(row, f, out[f])
            written = store.finish(row, owner)
            finished = True
        finally:
            if not finished:  # an unexpected exception: let another process take the cell
                with contextlib.suppress(sqlite3.Error, BackdoorLabError, OSError):
                    store.release(cell.run_id, owner)
        rows.append(row)
        log(cell_line(i, len(todo), cell, row, written))

    with _Heartbeat(store, owner):
        held: dict[str, tuple[int, Cell]] = {}  # cells another process held when we came to them
        for i, cell in enumerate(todo, 1):
            if store.claim(cell.run_id, owner, since):
                run(i, cell)
            elif cell.run_id not in store.settled([cell.run_id], since):
                held[cell.run_id] = (i, cell)
        waiting = -1
        while held:
            for rid in store.settled(held, since):
                del held[rid]
            leases = store.leases()
            for rid, (i, cell) in list(held.items()):
                lease = leases.get(rid)
                if (lease is None or not lease["alive"]) and store.claim(rid, owner, since):  # holder died
                    del held[rid]
                    run(i, cell)
            if held and len(held) != waiting:
                waiting = len(held)
                log(f"waiting for {waiting} cells held by other processes")
            if held:
                time.sleep(WAIT_POLL_S)
    return rows
