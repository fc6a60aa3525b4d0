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
])
def test_bad_studies_fail_with_one_line(change, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        Study.from_dict({**BASE, **change})
    assert "\n" not in str(e.value)


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
