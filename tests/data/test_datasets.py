import io
import zipfile

import numpy as np
import pytest
import torch
from _helpers import need_data
from PIL import Image

from backdoorlab.data import datasets as ds
from backdoorlab.data import defender_split, load_dataset, locate
from backdoorlab.data.readers import read_cifar_batches, read_image_folder
from backdoorlab.errors import BackdoorLabError


def test_digits_loads_offline():
    b = load_dataset("digits")
    assert b.train.x.shape == (1437, 8, 8, 1) and b.test.x.shape == (360, 8, 8, 1)
    assert b.train.x.dtype == torch.uint8 and int(b.train.x.max()) == 255
    assert set(b.train.y.unique().tolist()) == set(range(10))
    x = b.test.float()
    assert x.shape == (360, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1


def _write_folder_zip(path, n_per_class=3, size=(20, 12), bad=False):
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for cls in ("b_cls", "a_cls"):
                for i in range(n_per_class):
                    buf = io.BytesIO()
                    color = (255, 0, 0) if cls == "a_cls" else (0, 0, 255)
                    Image.new("RGB", size, color).save(buf, format="PNG")
                    data = buf.getvalue() if not (bad and i == 0) else b"not an image"
                    zf.writestr(f"root/{split}/{cls}/{i}.png", data)


def test_image_folder_zip_and_dir(tmp_path):
    zpath = tmp_path / "set.zip"
    _write_folder_zip(zpath)
    arrays, classes = read_image_folder(zpath, size=8)
    assert classes == ["a_cls", "b_cls"]
    x, y = arrays["train"]
    assert x.shape == (6, 8, 8, 3) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert (x[y == 0][..., 0] == 255).all() and (x[y == 1][..., 2] == 255).all()
    zipfile.ZipFile(zpath).extractall(tmp_path / "dir")
    arrays2, _ = read_image_folder(tmp_path / "dir", size=8)
    np.testing.assert_array_equal(arrays2["test"][0], arrays["test"][0])


def test_corrupt_inputs_give_one_line(tmp_path):
    bad = tmp_path / "bad.zip"
    _write_folder_zip(bad, bad=True)
    with pytest.raises(BackdoorLabError, match="corrupt image .*bad.zip") as e:
        read_image_folder(bad, size=8)
    assert "\n" not in str(e.value)
    notzip = tmp_path / "cifar10-jpeg.zip"
    notzip.write_bytes(b"garbage")
    with pytest.raises(BackdoorLabError, match="corrupt archive"):
        load_dataset("cifar10", data_dir=tmp_path)
    batches = tmp_path / "b"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(BackdoorLabError, match="corrupt CIFAR-10 batch file"):
        read_cifar_batches(batches)


def test_missing_dataset_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(BackdoorLabError) as e:
        locate("gtsrb")
    msg = str(e.value)
    assert "nowhere" in msg and "--data" in msg and "BACKDOORLAB_DATA" in msg and "data fetch gtsrb" in msg


def test_cifar_python_batches(tmp_path):
    import pickle

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, fh)
    b = load_dataset("cifar10", data_dir=tmp_path)
    assert b.train.x.shape == (20, 32, 32, 3) and b.test.x.shape == (4, 32, 32, 3)
    raw = pickle.load(open(root / "test_batch", "rb"))[b"data"][1]
    np.testing.assert_array_equal(b.test.x[1].numpy(), raw.reshape(3, 32, 32).transpose(1, 2, 0))


def test_stratified_subset_keeps_proportions():
    y = torch.tensor([0] * 800 + [1] * 200)
    idx = ds.stratified_subset(y, 100, torch.Generator().manual_seed(0))
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert int((y[idx] == 1).sum()) == 20


def test_defender_split_is_disjoint_and_sized():
    tr, ho = defender_split(1000, 0.05, torch.Generator().manual_seed(0))
    assert len(ho) == 50 and len(tr) == 950
    assert not set(tr.tolist()) & set(ho.tolist())
    with pytest.raises(BackdoorLabError):
        defender_split(10, 1.0, torch.Generator())


@pytest.mark.parametrize("name", ["gtsrb", "cifar10"])
def test_real_dataset_decodes_once_then_reads_cache(name, monkeypatch):
    need_data(name)
    b = load_dataset(name)
    n_train, n_test = {"gtsrb": (25087, 7949), "cifar10": (50000, 10000)}[name]
    assert b.train.x.shape == (n_train, 32, 32, 3) and b.test.x.shape == (n_test, 32, 32, 3)
    assert int(b.train.y.max()) == b.info.num_classes - 1

    def boom(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(ds.readers, "read_image_folder", boom)
    again = load_dataset({"name": name, "train_limit": 500})
    assert len(again.train) == 500
    assert torch.equal(again.test.x, b.test.x)


def test_gtsrb_size_is_configurable():
    need_data("gtsrb")
    b = load_dataset({"name": "gtsrb", "size": 16, "train_limit": 100, "test_limit": 50})
    assert b.train.x.shape == (100, 16, 16, 3) and b.info.size == 16
