"""The official GTSRB layout reader, on a tiny tree written in the official format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backdoorlab.data import gtsrb_official, load_dataset
from backdoorlab.errors import BackdoorLabError

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
# class id -> solid colour of its images (so labels and pixels can be checked together)
TRAIN = {0: [(200, 0, 0)] * 3, 1: [(0, 200, 0)] * 2, 42: [(0, 0, 200)] * 2}
TEST = [(1, (0, 200, 0)), (42, (0, 0, 200)), (0, (200, 0, 0)), (1, (0, 200, 0))]


def _ppm(path: Path, color, size=(29, 33)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PPM")
    return f"{path.name};{size[0]};{size[1]};5;5;{size[0] - 5};{size[1] - 5}"


def make_tree(root: Path, gt_at: str = "root") -> Path:
    """Write ``root/GTSRB`` as the three official zips extract (GT csv where ``gt_at`` says)."""
    g = root / "GTSRB"
    for cls, colors in TRAIN.items():
        d = g / "Final_Training" / "Images" / f"{cls:05d}"
        rows = [f"{_ppm(d / f'00000_{i:05d}.ppm', c, (30 + i, 31 + 2 * i))};{cls}"
                for i, c in enumerate(colors)]
        (d / f"GT-{cls:05d}.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    t = g / "Final_Test" / "Images"
    rows, rows_nolabel = [], []
    for i, (cls, c) in enumerate(TEST):
        r = _ppm(t / f"{i:05d}.ppm", c, (40, 27 + i))
        rows.append(f"{r};{cls}")
        rows_nolabel.append(r)
    no_label = HEADER[: -len(";ClassId")]
    (t / "GT-final_test.test.csv").write_text("\n".join([no_label, *rows_nolabel]))
    gt_dir = {"root": g, "images": t, "parent": root}[gt_at]
    (gt_dir / "GT-final_test.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return g


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)


def _expected():
    ytr = [c for c, cols in TRAIN.items() for _ in cols]
    ctr = [col for cols in TRAIN.values() for col in cols]
    return ytr, ctr, [c for c, _ in TEST], [col for _, col in TEST]


@pytest.mark.parametrize("gt_at", ["root", "images", "parent"])
def test_read_official_layout(tmp_path, gt_at):
    g = make_tree(tmp_path / "d", gt_at)
    for path in (g, g.parent):  # the GTSRB folder or the folder holding it
        out = gtsrb_official.read(path, size=16)
        ytr, ctr, yte, cte = _expected()
        (xtr, ytr_got), (xte, yte_got) = out["train"], out["test"]
        assert xtr.shape == (len(ytr), 16, 16, 3) and xtr.dtype == np.uint8
        assert xte.shape == (len(yte), 16, 16, 3)
        assert ytr_got.dtype == np.int64 and ytr_got.tolist() == ytr
        assert yte_got.tolist() == yte
        np.testing.assert_array_equal(xtr[:, 8, 8], np.array(ctr, dtype=np.uint8))
        np.testing.assert_array_equal(xte[:, 8, 8], np.array(cte, dtype=np.uint8))


def test_is_official_is_cheap_and_exact(tmp_path, monkeypatch):
    g = make_tree(tmp_path / "d")
    monkeypatch.setattr(Path, "rglob", lambda *a, **k: pytest.fail("is_official walked the tree"))
    assert gtsrb_official.is_official(g)
    assert gtsrb_official.is_official(g.parent)
    assert not gtsrb_official.is_official(tmp_path)  # two levels up: not looked for
    assert not gtsrb_official.is_official(tmp_path / "missing")
    folder = tmp_path / "imgfolder" / "train" / "a"
    folder.mkdir(parents=True)
    assert not gtsrb_official.is_official(tmp_path / "imgfolder")
    zipfile_path = tmp_path / "gtsrb-jpeg.zip"
    zipfile_path.write_bytes(b"PK")
    assert not gtsrb_official.is_official(zipfile_path)


def test_load_dataset_uses_official_reader(tmp_path):
    make_tree(tmp_path / "data")
    b = load_dataset({"name": "gtsrb", "size": 24}, data_dir=tmp_path / "data")
    ytr, _, yte, _ = _expected()
    assert b.source.endswith("GTSRB")
    assert tuple(b.train.x.shape) == (len(ytr), 24, 24, 3)
    assert b.train.y.tolist() == ytr and b.test.y.tolist() == yte
    assert b.info.num_classes == 43


def test_missing_test_labels(tmp_path):
    g = make_tree(tmp_path / "d")
    (g / "GT-final_test.csv").unlink()
    with pytest.raises(BackdoorLabError, match="GT-final_test.csv not found.*Final_Test_GT.zip"):
        gtsrb_official.read(g)


def test_corrupt_image_names_the_file(tmp_path):
    g = make_tree(tmp_path / "d")
    bad = g / "Final_Training" / "Images" / "00001" / "00000_00001.ppm"
    bad.write_bytes(b"P6 not really")
    with pytest.raises(BackdoorLabError, match=r"corrupt image .*00001/00000_00001\.ppm") as e:
        gtsrb_official.read(g)
    assert "\n" not in str(e.value)


def test_missing_image_names_the_file(tmp_path):
    g = make_tree(tmp_path / "d")
    (g / "Final_Test" / "Images" / "00002.ppm").unlink()
    with pytest.raises(BackdoorLabError, match=r"cannot read GTSRB image .*00002\.ppm"):
        gtsrb_official.read(g)


def test_bad_annotations(tmp_path):
    g = make_tree(tmp_path / "d")
    csv = g / "Final_Training" / "Images" / "00042" / "GT-00042.csv"
    csv.write_text(HEADER + "\n00000_00000.ppm;30;31;5;5;25;26;forty-two\n")
    with pytest.raises(BackdoorLabError, match=r"GT-00042\.csv: line 2 has ClassId 'forty-two'"):
        gtsrb_official.read(g)
    csv.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(BackdoorLabError, match=r"GT-00042\.csv: expected ';'-separated"):
        gtsrb_official.read(g)
    csv.unlink()
    with pytest.raises(BackdoorLabError, match=r"GT-00042\.csv is missing"):
        gtsrb_official.read(g)


def test_not_official(tmp_path):
    with pytest.raises(BackdoorLabError, match="not the official GTSRB layout"):
        gtsrb_official.read(tmp_path)
