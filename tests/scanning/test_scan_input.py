"""`backdoorlab scan` on bad input (issue 28 §5): each case is one line on stderr, exit status 2,
no traceback, and nothing the file carries ever runs. Also: the formats it does accept load to the
same logits (ONNX through ONNX Runtime and its PyTorch replay, safetensors, a weights-only state dict)."""

from __future__ import annotations

import builtins
import io
import os
import struct

import pytest
import torch

from backdoorlab.cli import main

C, H, W, K = 3, 32, 32, 5


@pytest.fixture(scope="module")
def model():
    from backdoorlab.models import build_model

    torch.manual_seed(0)
    return build_model({"name": "small-cnn", "widths": [8, 8, 16, 16]}, K, C, (0.5,) * C, (0.25,) * C).eval()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    from safetensors.torch import save_file

    from backdoorlab.compress.ort import export_onnx

    d = tmp_path_factory.mktemp("models")
    onnx_bytes = export_onnx(model, torch.rand(2, C, H, W))
    (d / "m.onnx").write_bytes(onnx_bytes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "m.safetensors"))
    torch.save(model.state_dict(), d / "m.pt")
    return d


def _scan(capsys, *args):
    code = main(["scan", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(capsys, *args, contains=""):
    code, out, err = _scan(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("backdoorlab: error: "), err
    assert "Traceback" not in err and contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def test_formats_load_to_the_same_logits(model, files):
    from backdoorlab.scanning import load_model

    x = torch.rand(16, C, H, W)
    ref = model(x)
    onnx = load_model(files / "m.onnx")
    assert onnx.format == "onnx" and onnx.precision == "fp32" and onnx.gradient_path == "surrogate"
    assert onnx.input_shape == (C, H, W)
    assert torch.allclose(onnx.clf.logits(x), ref, atol=1e-4)
    assert torch.allclose(onnx.clf.surrogate.logits(x), ref, atol=1e-4)  # the replay, with gradients
    chk = onnx.check_surrogate(x)
    assert chk["agreement"] == 1.0 and chk["max_logit_diff"] < 1e-4
    xg = x.clone().requires_grad_(True)
    onnx.clf.surrogate.logits(xg).sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    for name, fmt in (("m.safetensors", "safetensors"), ("m.pt", "state-dict")):
        lm = load_model(files / name, arch='{"name": "small-cnn", "widths": [8, 8, 16, 16]}')
        assert lm.format == fmt and lm.num_classes == K and lm.gradient_path == "artifact"
        assert torch.allclose(lm.clf.logits(x), ref, atol=1e-5)


@pytest.mark.parametrize("form", ["qdq", "qop"])
def test_int8_onnx_is_scanned_as_deployed(model, files, form):
    from backdoorlab.compress.ort import OrtInt8Config, OrtQOpConfig, quantize_ort
    from backdoorlab.scanning import load_model

    x = torch.rand(64, C, H, W)
    q = quantize_ort((files / "m.onnx").read_bytes(), x, OrtQOpConfig() if form == "qop" else OrtInt8Config())
    p = files / f"q-{form}.onnx"
    p.write_bytes(q)
    lm = load_model(p)
    assert lm.precision == f"int8-{form}" and lm.gradient_path == "surrogate", lm.notes
    chk = lm.check_surrogate(x)
    assert chk["agreement"] >= 0.9, chk  # fake-quant at the file's own scales reproduces ORT's int8 kernels
    xg = x[:4].clone().requires_grad_(True)
    lm.clf.surrogate.logits(xg).sum().backward()
    assert float(xg.grad.abs().sum()) > 0


def test_unknown_format(capsys, tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(os.urandom(64) + b"not a model")
    _one_line_error(capsys, p, contains="unknown model format")


def test_empty_and_truncated_files(capsys, files, tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _one_line_error(capsys, empty, contains="empty")
    data = (files / "m.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, cut, contains="onnx")
    st = tmp_path / "empty.safetensors"
    header = b"{}"
    st.write_bytes(struct.pack("<Q", len(header)) + header)
    _one_line_error(capsys, st, "--arch", "small-cnn", contains="no tensors")
    pt = tmp_path / "cut.pt"
    pt.write_bytes((files / "m.pt").read_bytes()[:300])
    _one_line_error(capsys, pt, "--arch", "small-cnn", contains="m")


def test_state_dict_that_does_not_fit_the_arch(capsys, files):
    line = _one_line_error(capsys, files / "m.safetensors", "--arch", "small-cnn", contains="does not fit")
    assert "small-cnn" in line
    _one_line_error(capsys, files / "m.pt", "--arch", "preact-resnet18", contains="does not fit")
    _one_line_error(capsys, files / "m.pt", contains="--arch")
    _one_line_error(capsys, files / "m.pt", "--arch", "resnet9000", contains="unknown architecture")


def test_wrong_input_size(capsys, files):
    _one_line_error(capsys, files / "m.onnx", "--input-size", "3,64,64", contains="does not match")
    _one_line_error(capsys, files / "m.onnx", "--input-size", "three", contains="C,H,W")
    _one_line_error(capsys, files / "m.pt", "--arch", '{"name": "small-cnn", "widths": [8, 8, 16, 16]}',
                    "--input-size", "1,32,32", contains="channels")


def _image_folder(root, classes, size=(W, H), mode="RGB", per_class=3):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, size, color=(i * 40) if mode == "L" else (i * 40, 10, 200)).save(root / c / f"{i}.png")
    return root


def test_images_of_the_wrong_size_mode_or_one_class(capsys, files, tmp_path):
    _one_line_error(capsys, files / "m.onnx", "--data", _image_folder(tmp_path / "big", ["0", "1"], size=(48, 48)),
                    contains="48x48")
    _one_line_error(capsys, files / "m.onnx", "--data", _image_folder(tmp_path / "grey", ["0", "1"], mode="L"),
                    contains="mode L")
    _one_line_error(capsys, files / "m.onnx", "--data", _image_folder(tmp_path / "one", ["0"]),
                    contains="at least two")
    _one_line_error(capsys, files / "m.onnx", "--data", _image_folder(tmp_path / "many", ["0", "7"]),
                    contains="label 7")
    _one_line_error(capsys, files / "m.onnx", "--data", tmp_path / "nowhere", contains="no such")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the payload ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_a_pickle_payload_never_runs(capsys, model, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "extra": _Payload(marker)}, evil)
    assert not marker.exists()
    line = _one_line_error(capsys, evil, "--arch", "small-cnn", contains="refused")
    assert "io.open" in line and "onnx" in line.lower()  # builtins.open is io.open
    assert not marker.exists()
    legacy = tmp_path / "evil-legacy.pt"  # the pre-zip torch.save format is a bare pickle
    torch.save({"extra": _Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    _one_line_error(capsys, legacy, "--arch", "small-cnn", contains="refused")
    assert not marker.exists()


def test_pickled_modules_and_torchscript_are_refused(capsys, model, tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(model, whole)
    line = _one_line_error(capsys, whole, "--arch", "small-cnn", contains="pickled model object")
    assert "safetensors" in line
    ts = tmp_path / "scripted.pt"
    torch.jit.trace(model, torch.rand(1, C, H, W)).save(str(ts))
    _one_line_error(capsys, ts, contains="torchscript")


def test_external_data_onnx_is_refused(capsys, files, tmp_path):
    import onnx

    proto = onnx.load_from_string((files / "m.onnx").read_bytes())
    onnx.save_model(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    _one_line_error(capsys, tmp_path / "ext.onnx", contains="external data")


def test_pickle_globals_reads_without_running():
    from backdoorlab.scanning.load import pickle_globals

    buf = io.BytesIO()
    import pickle

    pickle.dump(_Payload("/nonexistent/x"), buf, protocol=4)
    assert "io.open" in pickle_globals(buf.getvalue())
