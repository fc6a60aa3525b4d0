"""``fetch`` against a real HTTP server on 127.0.0.1 serving tiny archives in official formats."""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import io
import pickle
import shutil
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backdoorlab.data import fetch as fetch_mod
from backdoorlab.data import load_dataset, locate
from backdoorlab.data.fetch import fetch
from backdoorlab.errors import BackdoorLabError

CIFAR = "cifar-10-python.tar.gz"
GTSRB = (
    "GTSRB_Final_Training_Images.zip", "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip"
)
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


# ---------------------------------------------------------------- fake official archives
def _cifar_tar(path: Path, per_batch: int = 3) -> dict[str, list[int]]:
    """A tiny cifar-10-python.tar.gz: 5 data batches + test batch in the real pickle format."""
    labels = {}
    with tarfile.open(path, "w:gz") as tf:
        for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
            ys = [(k + j) % 10 for j in range(per_batch)]
            data = np.zeros((per_batch, 3072), dtype=np.uint8)
            data[:, :1024] = np.array(ys, dtype=np.uint8)[:, None] * 20  # red plane = label*20
            batch = {b"batch_label": name.encode(), b"labels": ys, b"data": data,
                     b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)]}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
            labels[name] = ys
    return labels


def _ppm(color, size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PPM")
    return buf.getvalue()


def _gtsrb_zips(srv: Path) -> tuple[list[int], list[int]]:
    """The three official GTSRB zips, with their real internal layout, a few images each."""
    train = {0: 2, 5: 3, 42: 1}  # class -> number of images
    test = [5, 0, 42, 5]
    with zipfile.ZipFile(srv / GTSRB[0], "w") as zf:
        zf.writestr("GTSRB/", b"")
        zf.writestr("GTSRB/Readme-Images.txt", "readme")
        for cls, n in train.items():
            d = f"GTSRB/Final_Training/Images/{cls:05d}"
            rows = [HEADER]
            for i in range(n):
                zf.writestr(f"{d}/00000_{i:05d}.ppm", _ppm((cls * 5, 10, 20), (30 + i, 35)))
                rows.append(f"00000_{i:05d}.ppm;{30 + i};35;5;5;{25 + i};30;{cls}")
            zf.writestr(f"{d}/GT-{cls:05d}.csv", "\r\n".join(rows) + "\r\n")
    rows, rows_nolabel = [HEADER], [HEADER.rsplit(";", 1)[0]]
    with zipfile.ZipFile(srv / GTSRB[1], "w") as zf:
        zf.writestr("GTSRB/Readme-Images-Final-test.txt", "readme")
        for i, cls in enumerate(test):
            zf.writestr(f"GTSRB/Final_Test/Images/{i:05d}.ppm", _ppm((cls * 5, 10, 20), (41, 33)))
            rows.append(f"{i:05d}.ppm;41;33;5;5;36;28;{cls}")
            rows_nolabel.append(f"{i:05d}.ppm;41;33;5;5;36;28")
        zf.writestr("GTSRB/Final_Test/Images/GT-final_test.test.csv", "\r\n".join(rows_nolabel))
        zf.writestr("GTSRB/", b"")
    with zipfile.ZipFile(srv / GTSRB[2], "w") as zf:
        zf.writestr("GT-final_test.csv", "\r\n".join(rows) + "\r\n")
    return [c for c, n in train.items() for _ in range(n)], test


def _sha256(path: Path) -> tuple[str, str]:
    return "sha256", hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- local server
class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.hits: collections.Counter[str] = collections.Counter()
        hits = self.hits

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits[self.path.rsplit("/", 1)[-1]] += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"  # root/mirror/<file>
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def total(self) -> int:
        return sum(self.hits.values())


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    (root / "mirror").mkdir(parents=True)
    s = _Server(root)
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_HOME", str(tmp_path / "home"))
    for var in ("BACKDOORLAB_DATA", "BACKDOORLAB_MIRROR", "http_proxy", "HTTP_PROXY",
                "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(fetch_mod, "TIMEOUT_S", 5.0)


@pytest.fixture
def cifar(server, monkeypatch):
    labels = _cifar_tar(server.root / "mirror" / CIFAR)
    monkeypatch.setitem(fetch_mod.CHECKSUMS, CIFAR, _sha256(server.root / "mirror" / CIFAR))
    return labels


@pytest.fixture
def gtsrb(server, monkeypatch):
    ys = _gtsrb_zips(server.root / "mirror")
    for f in GTSRB:
        monkeypatch.setitem(fetch_mod.CHECKSUMS, f, _sha256(server.root / "mirror" / f))
    return ys


# ---------------------------------------------------------------- tests
def test_fetch_cifar10_then_load(server, cifar, tmp_path):
    dest = tmp_path / "data"
    out = fetch("cifar10", dest, base_url=server.url)
    assert out == dest / "cifar-10-batches-py"
    assert sorted(p.name for p in dest.iterdir()) == sorted([CIFAR, "cifar-10-batches-py"])
    assert server.hits[CIFAR] == 1
    assert locate("cifar10", dest) == out
    b = load_dataset("cifar10", data_dir=dest)
    ytr = sum((cifar[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert tuple(b.train.x.shape) == (15, 32, 32, 3) and tuple(b.test.x.shape) == (3, 32, 32, 3)
    assert b.train.y.tolist() == ytr and b.test.y.tolist() == cifar["test_batch"]
    assert b.train.x[:, 0, 0, 0].tolist() == [y * 20 for y in ytr]


def test_second_fetch_downloads_nothing(server, cifar, tmp_path):
    dest = tmp_path / "data"
    fetch("cifar10", dest, base_url=server.url)
    assert server.total == 1
    fetch("cifar10", dest, base_url=server.url)  # extracted folder present
    assert server.total == 1
    shutil.rmtree(dest / "cifar-10-batches-py")
    fetch("cifar10", dest, base_url=server.url)  # verified archive present: re-extract only
    assert server.total == 1
    assert (dest / "cifar-10-batches-py" / "test_batch").is_file()


def test_damaged_archive_is_downloaded_again(server, cifar, tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / CIFAR).write_bytes(b"half a download")
    fetch("cifar10", dest, base_url=server.url)
    assert server.hits[CIFAR] == 1
    assert _sha256(dest / CIFAR) == fetch_mod.CHECKSUMS[CIFAR]


def test_default_dest_and_mirror_env(server, cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_MIRROR", server.url.rstrip("/"))  # no trailing slash
    out = fetch("cifar10")
    assert out == tmp_path / "home" / "data" / "cifar-10-batches-py"
    assert locate("cifar10") == out  # found with no further setting
    assert load_dataset("cifar10").train.x.shape[0] == 15


def test_checksum_mismatch_leaves_nothing(server, cifar, tmp_path):
    dest = tmp_path / "data"
    bad = {CIFAR: ("sha256", "0" * 64)}
    with pytest.raises(BackdoorLabError, match=r"sha256 mismatch for cifar-10-python\.tar\.gz from "
                       r"http://127\.0\.0\.1:\d+/mirror/cifar-10-python\.tar\.gz: expected 0{64}, "
                       r"got [0-9a-f]{64}; the download was discarded") as e:
        fetch("cifar10", dest, base_url=server.url, checksums=bad)
    assert "\n" not in str(e.value)
    assert list(dest.iterdir()) == []


def test_md5_entries_are_checked(server, cifar, tmp_path):
    md5 = hashlib.md5((server.root / "mirror" / CIFAR).read_bytes()).hexdigest()
    out = fetch("cifar10", tmp_path / "a", base_url=server.url, checksums={CIFAR: ("md5", md5)})
    assert out.is_dir()
    with pytest.raises(BackdoorLabError, match="md5 mismatch"):
        fetch("cifar10", tmp_path / "b", base_url=server.url, checksums={CIFAR: ("md5", "f" * 32)})


def test_http_404(server, tmp_path):
    dest = tmp_path / "data"
    with pytest.raises(BackdoorLabError, match=r"HTTP 404 .*cifar-10-python\.tar\.gz"):
        fetch("cifar10", dest, base_url=server.url)
    assert list(dest.iterdir()) == []


def test_network_failure(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackdoorLabError, match=r"cannot download http://127\.0\.0\.1:\d+/"):
        fetch("cifar10", tmp_path / "data", base_url=f"http://127.0.0.1:{port}/")
    assert list((tmp_path / "data").iterdir()) == []


def test_malformed_mirror(tmp_path):
    with pytest.raises(BackdoorLabError, match="cannot download not-a-url/cifar-10-python"):
        fetch("cifar10", tmp_path / "data", base_url="not-a-url")
    assert list((tmp_path / "data").iterdir()) == []


def test_fetch_gtsrb_then_load(server, gtsrb, tmp_path):
    ytr, yte = gtsrb
    dest = tmp_path / "data"
    out = fetch("gtsrb", dest, base_url=server.url)
    assert out == dest / "GTSRB"
    assert (out / "GT-final_test.csv").is_file()
    assert sorted(p.name for p in dest.iterdir()) == sorted([*GTSRB, "GTSRB"])
    assert locate("gtsrb", dest) == out
    b = load_dataset("gtsrb", data_dir=dest)
    assert tuple(b.train.x.shape) == (len(ytr), 32, 32, 3)
    assert tuple(b.test.x.shape) == (len(yte), 32, 32, 3)
    assert b.train.y.tolist() == ytr and b.test.y.tolist() == yte
    assert b.test.x[:, 16, 16, 0].tolist() == [c * 5 for c in yte]
    assert server.total == 3
    fetch("gtsrb", dest, base_url=server.url)
    assert server.total == 3


def test_unsafe_zip_member_is_rejected(server, gtsrb, tmp_path, monkeypatch):
    evil = server.root / "mirror" / GTSRB[2]
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.csv", "x")
    monkeypatch.setitem(fetch_mod.CHECKSUMS, GTSRB[2], _sha256(evil))
    dest = tmp_path / "data"
    with pytest.raises(BackdoorLabError, match=r"unsafe member '\.\./escape\.csv'"):
        fetch("gtsrb", dest, base_url=server.url)
    assert not (tmp_path / "escape.csv").exists()
    assert not (dest / "GTSRB").exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # staging removed


def test_unknown_and_bundled_names(tmp_path):
    with pytest.raises(BackdoorLabError, match="did you mean 'cifar10'"):
        fetch("cifar1", tmp_path)
    assert fetch("digits", tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_incomplete_existing_target(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(BackdoorLabError, match="not a complete cifar10 extraction"):
        fetch("cifar10", tmp_path, base_url="http://127.0.0.1:9/")


def test_cli_fetch_digits_needs_nothing(capsys):
    from backdoorlab.cli import main

    assert main(["data", "fetch", "digits"]) == 0
    assert "needs no download" in capsys.readouterr().out


def test_cli_fetch_from_local_mirror(server, cifar, tmp_path, capsys):
    """`backdoorlab data fetch cifar10 --mirror URL` end to end against the 127.0.0.1 server."""
    from backdoorlab.cli import main

    dest = tmp_path / "cli-data"
    assert main(["data", "fetch", "cifar10", "--dest", str(dest), "--mirror", server.url]) == 0
    assert capsys.readouterr().out.strip() == str(dest / "cifar-10-batches-py")
    fetch_mod.CHECKSUMS[CIFAR] = ("sha256", "0" * 64)  # monkeypatched entry: restored after the test
    assert main(["data", "fetch", "cifar10", "--dest", str(tmp_path / "other"), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mismatch" in err
    assert not (tmp_path / "other" / CIFAR).exists()
