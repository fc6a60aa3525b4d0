"""The attack interface (issue 25, part 1): config dataclasses from signatures, objectives as a
setting of every trigger, triggers inside the compression-conditioned attacks, assets built and
cached by the pipeline, learned trigger state travelling with the trained model, one attack
object per cell, and a bug inside a method keeping its traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backdoorlab.attacks import ATTACKS
from backdoorlab.config import to_dict
from backdoorlab.data.datasets import DatasetConfig
from backdoorlab.defenses import DEFENSES
from backdoorlab.errors import BackdoorLabError
from backdoorlab.registry import config_class

INFO = DatasetConfig("digits").info()
TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("registry,name", [(ATTACKS, n) for n in ATTACKS.names()] +
                         [(DEFENSES, n) for n in DEFENSES.names()])
def test_every_method_has_a_frozen_config_with_its_signature_defaults(registry, name):
    cfg = registry.config(name)
    assert dataclasses.is_dataclass(cfg)
    for f in dataclasses.fields(cfg)[:1]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, f.name, None)
    json.dumps(to_dict(cfg))  # plain data: it can go into a study's settings table


@pytest.mark.parametrize("spec,field", [
    ({"name": "badnets", "rate": "high"}, "rate"), ({"name": "blended", "alpha": [0.2]}, "alpha"),
    ({"name": "qcb", "lam": "x"}, "lam"), ({"name": "strip", "n": 1.5}, "n"),
    ({"name": "neural-cleanse", "early_stop": "yes"}, "early_stop"),
])
def test_wrong_types_are_one_line_naming_the_parameter(spec, field):
    reg = ATTACKS if spec["name"] in ATTACKS else DEFENSES
    with pytest.raises(BackdoorLabError) as e:
        reg.build(spec, **({"info": INFO} if reg is ATTACKS else {}))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_a_type_error_inside_a_method_keeps_its_traceback():
    class Buggy(ATTACKS.get("badnets")):
        def __init__(self, info, target: int = 0):
            super().__init__(info, target)
            len(5)  # a bug: TypeError from inside the method

    ATTACKS.register("buggy")(Buggy)
    try:
        with pytest.raises(TypeError, match="has no len"):
            ATTACKS.build("buggy", info=INFO)
        with pytest.raises(BackdoorLabError):  # the user's mistake stays one line
            ATTACKS.build({"name": "buggy", "colour": 1}, info=INFO)
    finally:
        ATTACKS._entries.pop("buggy")


def test_config_class_is_cached_and_typed():
    assert config_class(ATTACKS.get("badnets")) is config_class(ATTACKS.get("badnets"))
    assert to_dict(ATTACKS.config({"name": "badnets", "rate": 0.05}))["rate"] == 0.05


# ---------------------------------------------------------------- objectives
Y = torch.arange(10).repeat(5)


def test_all_to_all_maps_each_class_to_the_next():
    a = ATTACKS.build({"name": "badnets", "mode": "all-to-all"}, info=INFO)
    assert torch.equal(a.target_labels(Y), (Y + 1) % 10)
    assert bool(a.counted(Y).all())
    assert torch.equal(a.target_labels(torch.tensor([9])), torch.tensor([0]))  # wraps around


def test_source_specific_poisons_and_counts_only_the_sources():
    a = ATTACKS.build({"name": "badnets", "mode": "source-specific", "sources": [3, 5], "target": 1, "rate": 0.1},
                      info=INFO)
    assert set(Y[a.candidates(Y)].tolist()) == {3, 5}
    assert set(Y[a.counted(Y)].tolist()) == {3, 5}
    from backdoorlab.data.tensordata import TensorData

    x = torch.zeros(len(Y), 8, 8, 1, dtype=torch.uint8)
    split = a.poison(TensorData(x, Y.clone()), torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == 5 and set(split.original_labels[split.poison_idx].tolist()) <= {3, 5}
    assert set(split.data.y[split.poison_idx].tolist()) == {1}
    with pytest.raises(BackdoorLabError, match="sources"):
        ATTACKS.build({"name": "badnets", "mode": "source-specific"}, info=INFO)
    with pytest.raises(BackdoorLabError, match="sources"):
        ATTACKS.build({"name": "badnets", "sources": [1]}, info=INFO)


def test_clean_label_poisons_target_images_and_keeps_their_labels():
    from backdoorlab.data.tensordata import TensorData

    a = ATTACKS.build({"name": "blended", "mode": "clean-label", "target": 2, "rate": 0.06}, info=INFO)
    x = torch.full((len(Y), 8, 8, 1), 100, dtype=torch.uint8)
    split = a.poison(TensorData(x, Y.clone()), torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == 3
    assert set(split.original_labels[split.poison_idx].tolist()) == {2}
    assert torch.equal(split.data.y, Y)  # no label changed
    assert not torch.equal(split.data.x[split.poison_idx], x[split.poison_idx])  # the trigger is there


def test_any_trigger_inside_a_conditioned_attack():
    q = ATTACKS.build({"name": "qcb", "trigger": {"name": "blended", "mode": "all-to-all"}}, info=INFO)
    b = ATTACKS.build({"name": "blended", "mode": "all-to-all"}, info=INFO)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q.apply(x), b.apply(x))
    assert torch.equal(q.target_labels(Y), (Y + 1) % 10)
    with pytest.raises(BackdoorLabError, match="not both"):
        ATTACKS.build({"name": "qcb", "trigger": "blended", "patch_size": 2}, info=INFO)
    with pytest.raises(BackdoorLabError, match="data-poisoning"):
        ATTACKS.build({"name": "qcb", "trigger": "qcb"}, info=INFO)


def test_existing_specs_keep_their_behaviour():
    """BadNets' poisoning draws are unchanged by the objective refactor (cached poison artifacts
    are checked against a recomputation, so a change would surface there too)."""
    from backdoorlab.data import load_dataset

    data = load_dataset("digits")
    split = ATTACKS.build("badnets", info=data.info).poison(data.train, torch.Generator().manual_seed(0))
    assert split.poison_idx[:5].tolist() == [10, 12, 25, 41, 53] and len(split.poison_idx) == 144
    assert int(split.data.x.sum()) == 7416789  # the same images as before the refactor, byte for byte


# ---------------------------------------------------------------- assets and learned state
CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import _toy_attacks
_toy_attacks.register()
from backdoorlab.bench.pipeline import Pipeline
from backdoorlab.bench.study import Study
study = Study.from_dict({{"datasets": ["digits"], "models": ["small-cnn"], "attacks": ["toy-learned"],
                         "train": {{"epochs": 1}}}})
cell = study.cells()[0]
pipe = Pipeline(device="cpu", progress=False)
attack = pipe.attack(cell)
model, meta = pipe.train(cell, pipe.poison(cell, attack), attack)
x = pipe.data(cell.dataset).test.float()[:4]
print(json.dumps({{"triggered": attack.apply(x).flatten().tolist(), "builds": _toy_attacks.BUILDS}}))
"""


def test_assets_and_learned_state_round_trip_through_the_cache_in_a_fresh_process(tmp_path):
    env = {**os.environ, "BACKDOORLAB_HOME": str(tmp_path)}

    def child():
        out = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(TESTS))], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1]), out.stderr

    first, log1 = child()
    assert "building asset toy-mean-image" in log1 and "training small-cnn" in log1
    assert first["builds"] == [1365]  # the attacker's split: 1,437 digits less the 5% holdout (72)
    second, log2 = child()
    assert "building asset" not in log2 and "training" not in log2  # both from the cache
    assert second["builds"] == []
    assert second["triggered"] == first["triggered"]  # the learned pattern came back with the model
    baseline = torch.tensor(first["triggered"])
    assert float(baseline.abs().sum()) > 0


def test_run_cell_reports_preparation_time_and_builds_the_attack_once(tmp_path, monkeypatch):
    sys.path.insert(0, str(TESTS))
    import _toy_attacks

    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path))
    _toy_attacks.register()
    try:
        from backdoorlab.bench.pipeline import Pipeline
        from backdoorlab.bench.study import Study

        built = []
        original = ATTACKS.build

        def counting(spec, **kw):
            built.append(spec)
            return original(spec, **kw)

        study = Study.from_dict({"datasets": ["digits"], "models": ["small-cnn"], "attacks": ["toy-learned"],
                                 "train": {"epochs": 1}})
        pipe = Pipeline(device="cpu", progress=False)
        (cell,) = pipe.bind(study.cells())  # as run_study does, before any cell runs
        monkeypatch.setattr(ATTACKS, "build", counting)
        out = pipe.run_cell(cell)
        assert built == ["toy-learned"]
        assert out["metrics"]["prep_wall"] >= 0 and out["metrics"]["asr"] >= 0
    finally:
        _toy_attacks.unregister()


def test_a_learned_trigger_cannot_be_conditioned_on():
    """Input-aware's generator exists only once its own model is trained: qcb cannot use it."""
    info = DatasetConfig("gtsrb").info()
    with pytest.raises(BackdoorLabError, match="learned while its own model trains") as e:
        ATTACKS.build({"name": "qcb", "trigger": "input-aware"}, info=info)
    assert "\n" not in str(e.value)


def test_another_dataset_an_attack_reads_enters_the_run_id(tmp_path):
    """Refool's reflections come from another dataset: it is located from the study's data
    directory, and its content fingerprint is part of the cell (a replaced archive is new work)."""
    import shutil

    from _helpers import need_data

    from backdoorlab.bench.study import Study, bind_sources
    from backdoorlab.data import locate

    need_data("gtsrb")
    need_data("cifar10")
    study = Study.from_dict({"name": "refool-src", "datasets": [{"name": "gtsrb", "train_limit": 500}],
                             "models": ["small-cnn"], "attacks": [{"name": "refool", "target": 1, "rate": 0.01}],
                             "seeds": [0]})
    (cell,) = bind_sources(study.cells())
    src = dict(cell.sources)
    assert set(src) == {"data", "attack.reflections"} and src["attack.reflections"] != src["data"]
    # the same files under another --data directory, then a different CIFAR-10 archive there
    for name in ("gtsrb", "cifar10"):
        p = locate(name)
        shutil.copyfile(p, tmp_path / p.name)
    (same,) = bind_sources(study.cells(), tmp_path)
    assert same.run_id == cell.run_id
    cifar = tmp_path / locate("cifar10").name
    with open(cifar, "ab") as f:
        f.write(b"\0")
    (moved,) = bind_sources(study.cells(), tmp_path)
    assert dict(moved.sources)["data"] == src["data"] and moved.run_id != cell.run_id
