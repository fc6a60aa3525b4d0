"""Hostile and broken inputs (issue 24), built at test time: each goes through the CLI and must
end in exit status 2 with one line naming the file, no traceback, the result store's bytes
unchanged, and no side effect of any payload a file carries. Plus: a changed dataset file is new
work, and the readers' caps are configurable."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from _helpers import sample_row
from PIL import Image

from backdoorlab.bench.store import ResultStore
from backdoorlab.cli import main

# --------------------------------------------------------------------------- corpus builders


class Payload:
    """Pickles to a call of ``os.system`` that creates ``marker``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def png_bytes(size=(32, 32), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width=20000, height=20000) -> bytes:
    """A valid PNG signature and IHDR that declare ``width x height`` pixels, with a tiny IDAT:
    a few hundred bytes that would decode to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def folder_zip(path: Path, classes=("00000", "00001"), n=4, splits=("train", "test"), extra=None,
               color_shift=0) -> Path:
    """A small ``<split>/<class>/<image>.png`` archive; ``extra``: {member name: bytes} added."""
    with zipfile.ZipFile(path, "w") as zf:
        for split in splits:
            for c, cls in enumerate(classes):
                for i in range(n):
                    color = ((60 * c + 10 * i + color_shift) % 256, 40 * c % 256, 200)
                    zf.writestr(f"{split}/{cls}/{i}.png", png_bytes(color=color))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def cifar_batches(root: Path, data_for_batch1=None, labels=None) -> Path:
    """The official ``cifar-10-batches-py`` layout, tiny; batch 1 replaced if asked."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10)),
                 b"batch_label": b"x", b"filenames": [b"f"] * 10}
        if name == "data_batch_1" and data_for_batch1 is not None:
            batch = data_for_batch1
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


STUDY = "datasets: [{ds}]\nmodels: [small-cnn]\nattacks: [{attack}]\ntrain: {{epochs: 1, batch_size: 32}}\n"


def run_expecting_error(tmp_path, capsys, data_dir, study_text, match, marker=None, env=None):
    """Run the CLI on ``study_text`` with ``--data data_dir`` and check issue 24's contract."""
    store = tmp_path / "store.sqlite"
    if not store.exists():
        ResultStore(store).put(sample_row())
    before = store.read_bytes()
    study = tmp_path / "s.yaml"
    study.write_text(study_text)
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        code = main(["run", str(study), "--data", str(data_dir), "--store", str(store), "--no-progress"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("study ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("backdoorlab: error: "), err
    assert match in lines[0], err
    assert "Traceback" not in err and "object at 0x" not in err
    assert store.read_bytes() == before, "the store changed"
    if marker is not None:
        assert not marker.exists(), "a payload ran"
    return lines[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)
    return tmp_path / "home"


# --------------------------------------------------------------------------- code execution


def test_pickle_payload_in_cifar_batch_never_runs(tmp_path, capsys, home):
    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    cifar_batches(data / "cifar-10-batches-py", data_for_batch1={b"data": Payload(marker), b"labels": [0]})
    line = run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="cifar10", attack="badnets"),
                               "data_batch_1", marker)
    assert "refused" in line and "system" in line


def test_pickle_payload_inside_an_object_array_never_runs(tmp_path, capsys, home):
    marker = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    data = tmp_path / "data"
    cifar_batches(data / "cifar-10-batches-py", data_for_batch1={b"data": arr, b"labels": [0]})
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="cifar10", attack="badnets"), "data_batch_1", marker)


@pytest.mark.parametrize("batch,match", [
    ({b"labels": [0] * 10}, "'data' must be a uint8 array"),
    ({b"data": np.zeros((10, 3072), np.float32), b"labels": [0] * 10}, "'data' must be a uint8 array"),
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, "'labels' must be 10 integers"),
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [11] * 10}, "'labels' must be 10 integers"),
    ([1, 2, 3], "expected a dict"),
])
def test_malformed_cifar_batches(tmp_path, capsys, home, batch, match):
    data = tmp_path / "data"
    cifar_batches(data / "cifar-10-batches-py", data_for_batch1=batch)
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="cifar10", attack="badnets"), match)


def test_truncated_cifar_batch(tmp_path, capsys, home):
    data = tmp_path / "data"
    root = cifar_batches(data / "cifar-10-batches-py")
    raw = (root / "data_batch_1").read_bytes()
    (root / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="cifar10", attack="badnets"),
                        "corrupt CIFAR-10 batch file")


def test_pickle_payload_in_the_artifact_and_dataset_caches_never_runs(tmp_path, home):
    """The caches are files too: a ``.pt`` artifact or a decoded ``.npy`` carrying a payload is
    refused (``torch.load(weights_only=True)``, ``np.load`` without pickles) and rebuilt."""
    import torch

    from backdoorlab.bench.cache import ArtifactCache
    from backdoorlab.data import load_dataset

    marker = tmp_path / "pwned"
    cache = ArtifactCache(tmp_path / "artifacts")
    p = cache.path("train", "k")
    p.parent.mkdir(parents=True)
    torch.save({"state_dict": Payload(marker)}, p)
    assert cache.get("train", "k") is None and not p.exists() and not marker.exists()

    load_dataset("digits")  # a decoded dataset in the cache; poison its arrays
    (npy,) = [f for f in (home / "datasets").rglob("train_y.npy")]
    np.save(npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    bundle = load_dataset("digits")
    assert len(bundle.train) == 1437 and not marker.exists()


def test_yaml_payload_never_runs(tmp_path, capsys, home):
    marker = tmp_path / "pwned"
    text = f"datasets: !!python/object/apply:os.system ['touch {marker}']\nmodels: [small-cnn]\nattacks: [none]\n"
    run_expecting_error(tmp_path, capsys, tmp_path, text, "malformed study file", marker)


# --------------------------------------------------------------------------- broken archives


def test_truncated_archive(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    raw = folder_zip(tmp_path / "src.zip").read_bytes()
    (data / "gtsrb-jpeg.zip").write_bytes(raw[: len(raw) // 2])
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "corrupt archive")


def test_not_an_archive(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gtsrb-jpeg.zip").write_bytes(b"this is not a zip file" * 10)
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"),
                        f"corrupt archive {data / 'gtsrb-jpeg.zip'}")


def test_damaged_member_data(tmp_path, capsys, home):
    """Central directory intact, a member's compressed bytes overwritten: its CRC check fails."""
    data = tmp_path / "data"
    data.mkdir()
    z = folder_zip(data / "gtsrb-jpeg.zip")
    raw = bytearray(z.read_bytes())
    i = raw.index(b"IDAT")  # inside the first member's stored PNG
    raw[i + 8:i + 40] = b"\xff" * 32
    z.write_bytes(bytes(raw))
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "gtsrb-jpeg.zip")


def test_zero_byte_image(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip", extra={"train/00000/empty.png": b""})
    line = run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "empty.png")
    assert "corrupt image" in line


def test_no_test_split(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip", splits=("train",))
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "no images under test")


def test_one_class_dataset(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip", classes=("00000",))
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="none"), "1 class")


def test_path_traversal_member(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip", extra={"../../escape/train/00000/x.png": png_bytes()})
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "unsafe member name")
    assert not (tmp_path / "escape").exists()


# --------------------------------------------------------------------------- bombs


def test_zip_bomb_member_is_refused_before_it_is_read(tmp_path, capsys, home):
    """A member that expands past the file cap (here lowered to 1 MB; 256 MB by default) is
    refused from the zip directory's declared size, before a byte of it is decompressed."""
    data = tmp_path / "data"
    data.mkdir()
    z = data / "gtsrb-jpeg.zip"
    folder_zip(z)
    with zipfile.ZipFile(z, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/00000/bomb.png", b"\0" * (8 << 20))
    assert z.stat().st_size < 200_000
    line = run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "bomb.png",
                               env={"BACKDOORLAB_MAX_FILE_MB": "1"})
    assert "BACKDOORLAB_MAX_FILE_MB" in line and "8.0 MiB" in line


def test_total_expansion_cap(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip")
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "BACKDOORLAB_MAX_DATA_GB",
                        env={"BACKDOORLAB_MAX_DATA_GB": "0.000001"})


def test_huge_image_in_archive(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip", extra={"train/00001/huge.png": huge_png_header()})
    line = run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "huge.png")
    assert "400,000,000 pixels" in line and "BACKDOORLAB_MAX_PIXELS" in line


def test_huge_image_as_blended_pattern(tmp_path, capsys, home):
    pattern = tmp_path / "kitty.png"
    pattern.write_bytes(huge_png_header())
    study = STUDY.format(ds="digits", attack=f"{{name: blended, pattern: {pattern}}}")
    line = run_expecting_error(tmp_path, capsys, tmp_path, study, "kitty.png")
    assert "400,000,000 pixels" in line


def test_pixel_cap_is_configurable(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    folder_zip(data / "gtsrb-jpeg.zip", extra={"train/00001/big.png": huge_png_header(6000, 5000)})
    line = run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "big.png")
    assert "6000x5000 = 30,000,000 pixels" not in line  # under the default 40 M: decoding starts (and fails)
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "6000x5000 = 30,000,000",
                        env={"BACKDOORLAB_MAX_PIXELS": "20000000"})
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "1,000-pixel limit",
                        env={"BACKDOORLAB_MAX_PIXELS": "1000"})
    run_expecting_error(tmp_path, capsys, data, STUDY.format(ds="gtsrb", attack="badnets"), "BACKDOORLAB_MAX_PIXELS",
                        env={"BACKDOORLAB_MAX_PIXELS": "lots"})


def test_pattern_file_that_is_not_an_image(tmp_path, capsys, home):
    pattern = tmp_path / "pattern.png"
    pattern.write_bytes(b"\x89PNG but not really")
    study = STUDY.format(ds="digits", attack=f"{{name: blended, pattern: {pattern}}}")
    line = run_expecting_error(tmp_path, capsys, tmp_path, study, str(pattern))
    assert "BytesIO" not in line


# --------------------------------------------------------------------------- stale results


GTSRB_STUDY = ("name: fp\ndatasets: [gtsrb]\nmodels: [small-cnn]\nattacks: [none]\n"
               "train: {epochs: 1, batch_size: 16}\nholdout: 0.1\n")


def _run(tmp_path, data, capsys, text=GTSRB_STUDY):
    study = tmp_path / "fp.yaml"
    study.write_text(text)
    code = main(["run", str(study), "--data", str(data), "--store", str(tmp_path / "s.sqlite"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def test_replacing_a_dataset_file_makes_the_next_run_train_again(tmp_path, capsys, home):
    data = tmp_path / "data"
    data.mkdir()
    z = folder_zip(data / "gtsrb-jpeg.zip", n=8)
    first = _run(tmp_path, data, capsys)
    assert "1 to run" in first and "training small-cnn" in first
    os.utime(z, ns=(z.stat().st_atime_ns, z.stat().st_mtime_ns + 10**9))  # touched, same bytes: still done
    assert "1 already done, 0 to run" in _run(tmp_path, data, capsys)
    st = z.stat()
    folder_zip(z, n=8, color_shift=7)  # other images of the same count
    os.utime(z, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    again = _run(tmp_path, data, capsys)
    assert "0 already done, 1 to run" in again and "training small-cnn" in again
    rows = ResultStore(tmp_path / "s.sqlite").rows("fp")
    assert len(rows) == 2 and len({r.config["sources"]["data"] for r in rows}) == 2


def test_changing_a_pattern_file_makes_the_next_run_train_again(tmp_path, capsys, home):
    pattern = tmp_path / "pattern.png"
    pattern.write_bytes(png_bytes(size=(8, 8), color=(10, 200, 30)))
    text = ("name: fp\ndatasets: [digits]\nmodels: [small-cnn]\n"
            f"attacks: [{{name: blended, pattern: {pattern}}}]\ntrain: {{epochs: 1}}\n")
    assert "training small-cnn" in _run(tmp_path, tmp_path, capsys, text)
    assert "1 already done" in _run(tmp_path, tmp_path, capsys, text)
    pattern.write_bytes(png_bytes(size=(8, 8), color=(250, 20, 130)))
    assert "training small-cnn" in _run(tmp_path, tmp_path, capsys, text)


def test_run_ids_of_fileless_datasets_are_unchanged():
    """digits reads no file: its cells carry no sources, so existing run ids stay valid."""
    from backdoorlab.bench.study import Study, bind_sources

    study = Study.from_dict({"datasets": ["digits"], "models": ["small-cnn"], "attacks": ["none"]})
    (cell,) = study.cells()
    (bound,) = bind_sources([cell])
    assert bound.sources == () and bound.run_id == cell.run_id


# --------------------------------------------------------------------------- messages


def test_messages_name_the_path_the_user_gave(tmp_path, capsys, monkeypatch):
    store = tmp_path / "s.sqlite"
    ResultStore(store).put(sample_row())
    home_file = tmp_path / "home-is-a-file"
    home_file.write_text("x")
    monkeypatch.setenv("BACKDOORLAB_HOME", str(home_file))
    assert main(["results"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"BACKDOORLAB_HOME={home_file} is not a directory" in err
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root may write anywhere: take a directory the kernel refuses
        ro = Path("/proc")
    try:
        for args in (["export", "--store", str(store), "--out", str(ro / "res")],
                     ["report", "--store", str(store), "--out", str(ro / "rep")]):
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and str(ro) in err and ".tmp" not in err, err
        study = tmp_path / "q.yaml"
        study.write_text("datasets: [digits]\nmodels: [small-cnn]\nattacks: [none]\ntrain: {epochs: 1}\n")
        assert main(["run", str(study), "--store", str(ro / "s.sqlite")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(ro) in err and "writable" in err and "SQLite" not in err, err
    finally:
        (tmp_path / "ro").chmod(0o700)
