"""Issue 24, defects 5 and 6: every study setting is type-checked before anything runs.

Each wrongly typed setting (top-level keys, every TrainConfig and DatasetConfig field, model
parameters) ends `backdoorlab run` with one line `backdoorlab: error: ...` that names the setting,
exit status 2, no traceback, and no result store written. Cache keys do not move."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from backdoorlab.cli import main
from backdoorlab.config import check_value, field_types, from_dict, stable_hash, to_dict
from backdoorlab.data.datasets import DatasetConfig
from backdoorlab.errors import BackdoorLabError
from backdoorlab.train.fit import TrainConfig

BASE = {"name": "t", "datasets": ["digits"], "models": ["small-cnn"], "attacks": ["none"],
        "train": {"epochs": 1}}


def _wrong(hint) -> object:
    """A value of the wrong type for a field annotated ``hint``."""
    return 3 if hint is str else "x"


def _train_cases():
    return [pytest.param({"train": {f: _wrong(h)}}, f, id=f"train.{f}") for f, h in field_types(TrainConfig).items()]


def _dataset_cases():
    return [pytest.param({"datasets": [{"name": "digits", f: _wrong(h)}]}, f, id=f"dataset.{f}")
            for f, h in field_types(DatasetConfig).items() if f != "name"]


CASES = [
    # top-level settings
    pytest.param({"name": ["a"]}, "name", id="name-list"),
    pytest.param({"name": "bad name/../x"}, "name", id="name-unsafe"),
    pytest.param({"name": ""}, "name", id="name-empty"),
    pytest.param({"description": {"a": 1}}, "description", id="description"),
    pytest.param({"datasets": 3}, "datasets", id="datasets-int"),
    pytest.param({"datasets": [["digits"]]}, "datasets", id="datasets-nested-list"),
    pytest.param({"datasets": [{"name": ["digits"]}]}, "datasets", id="datasets-name-list"),
    pytest.param({"models": [3]}, "models", id="models"),
    pytest.param({"attacks": [{"rate": 0.1}]}, "attacks", id="attacks-no-name"),
    pytest.param({"compress": [[1]]}, "compress", id="compress"),
    pytest.param({"defenses": [{"name": ["none"]}]}, "defenses", id="defenses"),
    pytest.param({"seeds": ["x"]}, "seeds", id="seeds-str"),
    pytest.param({"seeds": [True]}, "seeds", id="seeds-bool"),
    pytest.param({"seeds": [2**40]}, "seeds", id="seeds-huge"),
    pytest.param({"train": [1]}, "train", id="train-list"),
    pytest.param({"holdout": "x"}, "holdout", id="holdout-str"),
    pytest.param({"holdout": False}, "holdout", id="holdout-bool"),
    pytest.param({"device": 3}, "device", id="device-int"),
    pytest.param({"device": ["cpu"]}, "device", id="device-list"),
    pytest.param({"tta": ["flip"]}, "tta", id="tta"),
    pytest.param({"variants": ["gpu"]}, "variants", id="variants-list"),
    pytest.param({"variants": {1: {"seeds": [1]}}}, "variant", id="variant-name-int"),
    # training settings: every field (above), and bools / ints where the other is wanted
    *_train_cases(),
    pytest.param({"train": {"epochs": True}}, "epochs", id="train.epochs-bool"),
    pytest.param({"train": {"epochs": 2.5}}, "epochs", id="train.epochs-float"),
    pytest.param({"train": {"lr": True}}, "lr", id="train.lr-bool"),
    pytest.param({"train": {"nesterov": 1}}, "nesterov", id="train.nesterov-int"),
    pytest.param({"train": {"momentum": 1.5}}, "momentum", id="train.momentum-range"),
    pytest.param({"train": {"weight_decay": -1}}, "weight_decay", id="train.weight_decay-range"),
    pytest.param({"train": {"label_smoothing": 1}}, "label_smoothing", id="train.label_smoothing-range"),
    pytest.param({"train": {"crop_pad": -1}}, "crop_pad", id="train.crop_pad-range"),
    pytest.param({"train": {"momentum": 0}}, "momentum", id="train.nesterov-without-momentum"),
    # dataset settings: every field (above)
    *_dataset_cases(),
    pytest.param({"datasets": [{"name": "digits", "subset_seed": -1}]}, "subset_seed", id="dataset.subset_seed-neg"),
    pytest.param({"datasets": [{"name": "digits", "train_limit": True}]}, "train_limit", id="dataset.train_limit-bool"),
    # model parameters
    pytest.param({"models": [{"name": "small-cnn", "widths": "x"}]}, "widths", id="model.widths-str"),
    pytest.param({"models": [{"name": "small-cnn", "widths": [8, 16, 32]}]}, "widths", id="model.widths-3"),
    pytest.param({"models": [{"name": "small-cnn", "widths": [8, 16, 32, "a"]}]}, "widths", id="model.widths-item"),
    pytest.param({"models": [{"name": "small-cnn", "widths": [8, 16, 32, 0]}]}, "widths", id="model.widths-zero"),
    pytest.param({"models": [{"name": "small-cnn", "num_classes": 3}]}, "num_classes", id="model.num_classes"),
    pytest.param({"models": [{"name": "mobilenetv2", "width_mult": "x"}]}, "width_mult", id="model.width_mult"),
    pytest.param({"models": [{"name": "mobilenetv2", "width_mult": 0}]}, "width_mult", id="model.width_mult-zero"),
]


def _run(tmp_path, monkeypatch, capsys, study: dict, store):
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    rc = main(["run", str(path), "--store", str(store)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("change,field", CASES)
def test_wrong_typed_setting_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, change, field):
    store = tmp_path / "store.sqlite"
    rc, err = _run(tmp_path, monkeypatch, capsys, {**BASE, **change}, store)
    assert rc == 2, err
    assert err.startswith("backdoorlab: error: ") and err.count("\n") == 1, err
    assert field in err, err
    assert "Traceback" not in err
    assert not store.exists()


def test_an_existing_store_keeps_its_bytes(tmp_path, monkeypatch, capsys):
    from _helpers import sample_row

    from backdoorlab.bench.store import ResultStore

    store = tmp_path / "store.sqlite"
    ResultStore(store).put(sample_row())
    before = store.read_bytes()
    rc, err = _run(tmp_path, monkeypatch, capsys, {**BASE, "train": {"lr": "fast"}}, store)
    assert rc == 2 and err == "backdoorlab: error: train lr must be a number (float), got 'fast'\n"
    assert store.read_bytes() == before


def test_zero_epochs_is_rejected_up_front(tmp_path, monkeypatch, capsys):
    """Defect 5: `epochs: 0` used to write an `ok` row for an untrained model."""
    store = tmp_path / "store.sqlite"
    rc, err = _run(tmp_path, monkeypatch, capsys, {**BASE, "train": {"epochs": 0}}, store)
    assert rc == 2 and err.startswith("backdoorlab: error: train epochs must be an integer >= 1"), err
    assert err.count("\n") == 1 and not store.exists()
    with pytest.raises(BackdoorLabError, match="epochs must be an integer >= 1"):
        TrainConfig(epochs=0).validate()  # fit() validates its config first: the Python API too


def test_python_api_configs_are_type_checked_too():
    with pytest.raises(BackdoorLabError, match="train nesterov must be true or false, got 'yes'"):
        TrainConfig(nesterov="yes").validate()
    with pytest.raises(BackdoorLabError, match="train crop_pad must be an integer >= 0, got 'a'"):
        TrainConfig(crop_pad="a").validate()
    with pytest.raises(BackdoorLabError, match="dataset 'digits' subset_seed must be an integer, got 'x'"):
        DatasetConfig("digits", subset_seed="x").validate()


def test_cache_keys_do_not_move():
    """Defaults, field order and given values are hashed into cache keys and run ids."""
    assert stable_hash(TrainConfig()) == "a3405dff386d100b"
    assert stable_hash(DatasetConfig("digits")) == "370e13212f3be7aa"
    # an int given for a float setting is accepted and kept as given (to_dict writes 1, not 1.0)
    cfg = from_dict(TrainConfig, {"lr": 1, "epochs": 3, "brightness": 0.4}, what="train")
    assert type(cfg.lr) is int and to_dict(cfg)["lr"] == 1
    assert stable_hash(cfg) == "e1472510590cdea8"


@dataclasses.dataclass(frozen=True)
class _Inner:
    k: int = 1


@dataclasses.dataclass(frozen=True)
class _Outer:
    mode: Literal["a", "b"] = "a"
    pair: tuple[int, float] = (1, 2.0)
    items: tuple[str, ...] = ()
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    anything: object = None


@pytest.mark.parametrize("data,message", [
    ({"mode": "c"}, "outer mode must be one of 'a', 'b', got 'c'"),
    ({"pair": [1]}, "outer pair must be a list of 2 items (an integer, a number (float)), got [1]"),
    ({"pair": [1.5, 2]}, "outer pair must be a list of 2 items"),
    ({"items": ["a", 1]}, "outer items must be a list (each item a string), got ['a', 1]"),
    ({"inner": {"k": "x"}}, "outer inner k must be an integer, got 'x'"),
    ({"inner": {"kk": 1}}, "outer inner has no setting 'kk'; did you mean 'k'?"),
    ({"inner": 3}, "outer inner must be a mapping of settings (k), got 3"),
    ({"mod": "a"}, "outer has no setting 'mod'; did you mean 'mode'?"),
])
def test_annotation_kinds(data, message):
    with pytest.raises(BackdoorLabError) as e:
        from_dict(_Outer, data, what="outer")
    assert str(e.value).startswith(message)


def test_good_values_and_unknown_annotations_pass():
    out = from_dict(_Outer, {"mode": "b", "pair": (2, 3), "items": ["a"], "inner": {"k": 2}, "anything": [1]})
    assert out.pair == (2, 3) and out.inner == {"k": 2}  # values are kept as given
    check_value({"any": "thing"}, "NotAType", "x")  # an annotation kind not handled: not checked
