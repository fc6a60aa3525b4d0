"""tune_cpu_allocator: large blocks come from glibc's heap (and are reused) instead of fresh mmaps."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from backdoorlab import utils
from backdoorlab.cli import main
from backdoorlab.errors import BackdoorLabError

# Runs in a fresh process (the setting is process-wide): allocate a 64 MB tensor after fit()'s
# setting and report glibc's count of mmap'd blocks before and after, and the setting.
PROBE = """
import ctypes, torch
from backdoorlab.utils import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mode = tune_cpu_allocator()
before = libc.mallinfo2().hblks
x = torch.empty(16 * 2**20)  # 64 MB: above glibc's largest default mmap threshold (32 MiB)
x.fill_(1.0)
print(mode, libc.mallinfo2().hblks - before)
"""

# the setting exists on glibc only (elsewhere tune_cpu_allocator reports "system" and changes nothing)
glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


@glibc
def test_tuned_allocator_keeps_a_training_sized_block_in_the_heap():
    assert _probe(BACKDOORLAB_MALLOC="tuned") == ["tuned", "0"]


@glibc
def test_system_allocator_maps_it_as_glibc_does_by_default():
    assert _probe(BACKDOORLAB_MALLOC="system") == ["system", "1"]


def test_bad_setting_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(utils, "_allocator", None)
    monkeypatch.setenv("BACKDOORLAB_MALLOC", "jemalloc")
    with pytest.raises(BackdoorLabError, match="BACKDOORLAB_MALLOC must be 'tuned' or 'system', got 'jemalloc'"):
        utils.tune_cpu_allocator()
    monkeypatch.setattr(utils, "_allocator", None)
    assert main(["results", "--store", str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["backdoorlab: error: BACKDOORLAB_MALLOC must be 'tuned' or 'system', got 'jemalloc'"]
    assert not (tmp_path / "r.sqlite").exists()


def test_setting_is_applied_once_per_process(monkeypatch):
    monkeypatch.setattr(utils, "_allocator", "system")
    monkeypatch.setenv("BACKDOORLAB_MALLOC", "tuned")
    assert utils.tune_cpu_allocator() == "system"  # what is in force; never re-applied


# One epoch of the default model at batch 256 on 32x32 images: its stem activations (33.5 MB) are
# the blocks the setting moves from mmap to the heap. Prints a hash of the trained weights.
TRAIN = """
import hashlib, torch
from backdoorlab.data import TensorData
from backdoorlab.models import build_model
from backdoorlab.train import TrainConfig, fit
from backdoorlab.utils import tune_cpu_allocator

torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = TensorData(torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (512,), generator=g))
r = fit(build_model("small-cnn", 10, 3, (0.5,) * 3, (0.25,) * 3), data, TrainConfig(epochs=1), generator=g,
        device="cpu", progress=False)
h = hashlib.sha256(b"".join(v.numpy().tobytes() for v in r.model.state_dict().values()))
print(tune_cpu_allocator(), h.hexdigest())
"""


@glibc
def test_allocator_setting_leaves_training_bit_identical():
    runs = {}
    for mode in ("system", "tuned"):
        out = subprocess.run([sys.executable, "-c", TRAIN], env={**os.environ, "BACKDOORLAB_MALLOC": mode},
                             capture_output=True, text=True, check=True).stdout.split()
        runs[out[0]] = out[1]
    assert set(runs) == {"system", "tuned"}
    assert runs["system"] == runs["tuned"]
