"""`backdoorlab scan` on model files made from the session's GTSRB models (issue 28): the user's
path (a file and a folder of clean images, nothing of the project's in-memory objects), at the
fast budget. A BadNets model is `backdoored` with target 0 as its FP32 ONNX file and as its INT8
ONNX file; a clean model's file is `clean`; the exit status says so; `--out` writes the page with
the recovered trigger; the data-free mode runs MM-BD alone."""

from __future__ import annotations

import json

import pytest
import torch

from backdoorlab.cli import main

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from _helpers import trained_gtsrb
    from PIL import Image

    from backdoorlab.compress.ort import OrtInt8Config, export_onnx, quantize_ort

    d = tmp_path_factory.mktemp("scan-zoo")
    bad, clean = trained_gtsrb("badnets"), trained_gtsrb("none")
    holdout = bad.poisoned.holdout.float()
    for name, t in (("badnets", bad), ("clean", clean)):
        data = export_onnx(t.model, holdout[:8])
        (d / f"{name}.onnx").write_bytes(data)
        if name == "badnets":
            (d / f"{name}.int8.onnx").write_bytes(quantize_ort(data, holdout[:256], OrtInt8Config()))
    # a folder of clean test images, 5 per class, as a user would have them
    test = bad.bundle.test
    g = torch.Generator().manual_seed(0)
    for c in range(43):
        idx = torch.nonzero(test.y == c).flatten()
        for i in idx[torch.randperm(len(idx), generator=g)[:5]].tolist():
            (d / "images" / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(test.x[i].numpy()).save(d / "images" / str(c) / f"{i}.png")
    return d


def _scan(capsys, *args):
    code = main(["scan", *map(str, args), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code in (0, 1, 3), err
    return code, json.loads(out)


def test_a_badnets_file_is_backdoored_with_its_target(zoo, capsys, tmp_path):
    code, rep = _scan(capsys, zoo / "badnets.onnx", "--data", zoo / "images", "--out", tmp_path / "page")
    assert code == 1 and rep["verdict"] == "backdoored" and rep["targets"] == [0], rep
    assert rep["model"]["format"] == "onnx" and rep["model"]["gradient_path"] == "surrogate"
    assert rep["model"]["surrogate_check"]["agreement"] == 1.0  # the FP32 replay is the same computation
    assert rep["model"]["clean_images"] == 43 * 5  # the folder holds 5 per class (fewer than the budget takes)
    ran = {o["name"]: o for o in rep["scanners"]}
    assert ran["k-arm"]["error"] is None and ran["k-arm"]["flagged"][:1] == [0]
    page = (tmp_path / "page" / "index.html").read_text()
    assert "backdoored" in page and (tmp_path / "page" / "mask.png").exists()
    assert (tmp_path / "page" / "example.png").exists()


def test_the_int8_file_is_scanned_as_deployed(zoo, capsys):
    code, rep = _scan(capsys, zoo / "badnets.int8.onnx", "--data", zoo / "images")
    assert rep["model"]["precision"] == "int8-qdq" and rep["model"]["gradient_path"] == "surrogate"
    assert rep["model"]["surrogate_check"]["agreement"] >= 0.95
    assert code == 1 and rep["targets"] == [0], rep


def test_a_clean_file_is_clean(zoo, capsys):
    code, rep = _scan(capsys, zoo / "clean.onnx", "--data", zoo / "images")
    assert code == 0 and rep["verdict"] == "clean" and rep["targets"] == [], rep


def test_data_free_mode_runs_the_data_free_scanner_only(zoo, capsys):
    code, rep = _scan(capsys, zoo / "badnets.onnx")
    ran = {o["name"]: o for o in rep["scanners"]}
    assert ran["mm-bd"]["error"] is None
    assert "clean images" in ran["k-arm"]["error"]
    assert rep["verdict"] in ("backdoored", "inconclusive") and code in (1, 3)
