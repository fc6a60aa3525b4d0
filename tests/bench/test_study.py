import pytest
import yaml

from backdoorlab.bench.study import Study
from backdoorlab.errors import BackdoorLabError

BASE = {"name": "t", "datasets": ["digits"], "models": ["small-cnn"], "attacks": ["none", "badnets"],
        "seeds": [0, 1], "train": {"epochs": 1}}


def test_grid_expands_and_ids_are_stable():
    s = Study.from_dict(BASE)
    cells = s.cells()
    assert len(cells) == 4
    assert len({c.run_id for c in cells}) == 4
    assert [c.run_id for c in Study.from_dict(BASE).cells()] == [c.run_id for c in cells]
    other = Study.from_dict({**BASE, "train": {"epochs": 2}}).cells()
    assert other[0].run_id != cells[0].run_id
    assert cells[1].labels["attack"] == "none" and cells[0].compression == "fp32"
    lab = Study.from_dict({**BASE, "attacks": [{"name": "badnets", "rate": 0.05}]}).cells()[0].labels
    assert lab["attack"] == "badnets(rate=0.05)"


@pytest.mark.parametrize("change,match", [
    ({"attacks": ["badnet"]}, "unknown attack 'badnet'; did you mean 'badnets'"),
    ({"models": ["resnet18"]}, "unknown model"),
    ({"datasets": ["cifar100"]}, "unknown dataset 'cifar100'"),
    ({"attacks": [{"name": "badnets", "rate": 1.2}]}, "rate must be in"),
    ({"attacks": [{"name": "badnets", "target": 10}]}, r"target label must be an integer in \[0, 9\]"),
    ({"compress": ["int9"]}, "unknown compression"),
    ({"defenses": ["nc"]}, "unknown defense"),
    ({"seeds": [-1]}, "seeds"),
    ({"train": {"epoch": 3}}, "did you mean 'epochs'"),
    ({"holdout": 1.0}, "holdout"),
    ({"datasest": []}, "did you mean 'datasets'"),
    ({"tta": "mirror"}, "tta must be one of none, flip, got 'mirror'"),
    ({"tta": "flip"}, "tta 'flip' averages each image with its mirror image, but digits is not mirror-symmetric"),
])
def test_bad_studies_fail_with_one_line(change, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        Study.from_dict({**BASE, **change})
    assert "\n" not in str(e.value)


def test_tta_enters_the_run_id_only_when_set():
    base = {**BASE, "datasets": ["cifar10"]}
    ids = [c.run_id for c in Study.from_dict(base).cells()]
    assert [c.run_id for c in Study.from_dict({**base, "tta": "none"}).cells()] == ids
    flip = Study.from_dict({**base, "tta": "flip"}).cells()
    assert all(c.tta == "flip" for c in flip) and not set(c.run_id for c in flip) & set(ids)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\ndatasets: [digits\nmodels: [small-cnn]\n")
    with pytest.raises(BackdoorLabError, match=r"malformed study file .* at line \d+"):
        Study.from_yaml(p)
    p.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(BackdoorLabError, match="must be a mapping"):
        Study.from_yaml(p)
    with pytest.raises(BackdoorLabError, match="does not exist"):
        Study.from_yaml(tmp_path / "missing.yaml")


def test_shipped_studies_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml")):
        Study.from_yaml(path)


def test_composed_compression_labels():
    s = Study.from_dict({**BASE, "compress": [["prune-l1-50", "int8-torch"], "prune-l1-50+int8-torch"]})
    labels = {c.labels["compression"] for c in s.cells()}
    assert labels == {"prune-l1-50+int8-torch"}


def test_variants_replace_settings_and_rename(tmp_path):
    raw = {**BASE, "variants": {"gpu": {"models": ["preact-resnet18"], "train": {"epochs": 3}}}}
    base = Study.from_dict(raw, default_name="s")
    gpu = Study.from_dict(raw, default_name="s", variant="gpu")
    assert base.models == ["small-cnn"] and gpu.models == ["preact-resnet18"]
    assert gpu.name == "t-gpu" and gpu.train.epochs == 3 and gpu.seeds == base.seeds
    assert {c.run_id for c in gpu.cells()}.isdisjoint(c.run_id for c in base.cells())
    with pytest.raises(BackdoorLabError, match="no variant 'tpu'"):
        Study.from_dict(raw, variant="tpu")
    with pytest.raises(BackdoorLabError, match="variant 'x' must be a mapping"):
        Study.from_dict({**BASE, "variants": {"x": {"name": "y"}}})


def test_select_filters_cells_by_axis():
    s = Study.from_dict({**BASE, "attacks": ["none", {"name": "badnets", "rate": 0.05}]})
    assert len(s.select(["attack=badnets"])) == 2 and len(s.select(["seed=1", "attack=none"])) == 1
    assert s.select(["attack=badnets(rate=0.05)"]) == s.select(["attack=badnets"])
    for bad, match in (["seed=7"], "matches no cell"), (["colour=red"], "unknown axis"), (["attack"], "AXIS=VALUE"):
        with pytest.raises(BackdoorLabError, match=match):
            s.select(bad)
