"""``int8-tflite`` (issue 29): full-integer int8 LiteRT converted with litert-torch's PT2E route, run
by the LiteRT interpreter, and its surrogate that replays the flatbuffer in PyTorch."""

from __future__ import annotations

import time

import pytest
import torch

from backdoorlab.classifier import Capability, agreement
from backdoorlab.compress import COMPRESSIONS, compress
from backdoorlab.errors import BackdoorLabError

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")


@pytest.fixture(scope="module")
def tiny_tflite(tiny):
    start = time.perf_counter()
    clf = compress("int8-tflite", tiny.model, calib=tiny.calib, device="cpu")
    clf.build_seconds = time.perf_counter() - start
    return clf


def test_tiny_builds_full_integer_model(tiny, tiny_tflite):
    clf = tiny_tflite
    assert clf.precision == "int8-tflite"
    assert clf.info["runtime"] == "litert" and clf.info["converter"].startswith("litert-torch ")
    assert clf.info["io_dtype"] == "int8" and clf.info["simulated"] is False and clf.info["calib_size"] == 100
    assert clf.io_dtypes == ["int8", "int8", "int8"]  # input, logits, features
    assert clf.int8_layers == "conv:6/6, linear:1/1"
    assert clf.input_shape == (3, 16, 16)
    # MinMax over images in [0, 1]: the input's int8 grid is the uint8 pixel grid shifted by 128
    assert clf.input_q[0] == pytest.approx(1 / 255) and clf.input_q[1] == -128
    ops = clf.ops()
    names = [o["op_name"] for o in ops]
    assert names.count("CONV_2D") == 6 and names.count("FULLY_CONNECTED") == 1
    assert "DEQUANTIZE" not in names  # nothing runs in float
    assert all(o["inputs"][:2] == ["int8", "int8"] for o in ops if o["op_name"] in ("CONV_2D", "FULLY_CONNECTED"))
    assert clf.capabilities == frozenset({Capability.FEATURES})
    assert 0 < clf.size_bytes < 100_000


def test_tiny_shapes_and_batches(tiny, tiny_tflite):
    clf = tiny_tflite
    x = tiny.x
    logits = clf.logits(x[:1])
    assert logits.shape == (1, 10) and logits.dtype == torch.float32
    batch = clf.logits(torch.cat([x, x[:5]]))
    assert batch.shape == (37, 10)
    assert torch.equal(batch[:1], logits)  # one image at a time: batch-independent
    assert clf.features(x[:3]).shape == (3, 64)
    with pytest.raises(BackdoorLabError):
        clf.features(x[:1], "body.0")
    # close to FP32: int8 rounding only
    ref = tiny.model(x)
    assert (clf.logits(x) - ref).abs().max() <= 0.05 * ref.abs().max()


def test_tiny_rebuild_from_artifact(tiny, tiny_tflite):
    art = tiny_tflite.artifact
    assert set(art) == {"tflite", "input_shape"} and art["tflite"].dtype == torch.uint8
    again = compress("int8-tflite", tiny.model, calib=None, device="cpu", artifact=art)
    assert torch.equal(again.logits(tiny.x), tiny_tflite.logits(tiny.x))
    assert torch.equal(again.surrogate.logits(tiny.x), tiny_tflite.surrogate.logits(tiny.x))


def test_tiny_surrogate_replays_the_flatbuffer(tiny, tiny_tflite):
    sur = tiny_tflite.surrogate
    assert sur.precision == "int8-tflite/surrogate"
    assert sur.capabilities == frozenset({Capability.GRAD, Capability.FEATURES})
    x = tiny.x
    a, s = tiny_tflite.logits(x), sur.logits(x)
    out_scale = tiny_tflite.output_q["output_0"][0]
    assert (a - s).abs().max() <= 3 * out_scale + 1e-6  # a few int8 steps of requantization rounding
    assert (tiny_tflite.features(x) - sur.features(x)).abs().max() <= 3 * tiny_tflite.output_q["output_1"][0] + 1e-6
    xr = x[:4].clone().requires_grad_(True)
    sur.logits(xr).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_surrogate_names_an_unknown_op(tiny_tflite, monkeypatch):
    from backdoorlab.compress import tflite

    monkeypatch.delitem(tflite._OPS, "MAX_POOL_2D")
    with pytest.raises(BackdoorLabError, match="no surrogate for TFLite op MAX_POOL_2D"):
        tflite.tflite_surrogate(tiny_tflite.model_bytes)


def test_surrogate_sums_over_the_axes_tflite_names():
    """litert-torch puts a SUM op in VGG-16-BN's flatbuffer; without it in the surrogate the
    whole int8-tflite cell of a VGG model was an error row (BENCHMARKS.md, the transfer matrix)."""
    from types import SimpleNamespace

    from backdoorlab.compress import tflite

    x = torch.rand(2, 4, 5, 3)
    axes = torch.tensor([1, -2], dtype=torch.int32)  # NHWC: H and W, one of them counted from the end
    out = tflite._OPS["SUM"](None, [x, axes], SimpleNamespace(keepDims=False))
    assert out.shape == (2, 3) and torch.allclose(out, x.sum((1, 2)))
    kept = tflite._OPS["SUM"](None, [x, axes], SimpleNamespace(keepDims=True))
    assert kept.shape == (2, 1, 1, 3) and torch.allclose(kept.flatten(1), out)


def test_histogram_calibration_clips_activation_ranges(tiny, tiny_tflite):
    hist = compress({"name": "int8-tflite", "calibration": "histogram"}, tiny.model, calib=tiny.calib, device="cpu")
    assert hist.info["calibration"] == "histogram" and hist.info["io_dtype"] == "int8"
    assert hist.int8_layers == "conv:6/6, linear:1/1"
    # litert-torch's HistogramObserver narrows the ranges MinMax keeps
    assert hist.output_q["output_1"][0] < tiny_tflite.output_q["output_1"][0]
    assert agreement(hist, hist.surrogate, tiny.x) == 1.0


def test_fp32_twin_reproduces_pytorch(tiny, tiny_tflite):
    """``fp32-tflite``: the same conversion without the quantizer, float32 I/O, same interpreter."""
    clf = compress("fp32-tflite", tiny.model, calib=tiny.calib, device="cpu")
    assert clf.precision == "fp32-tflite" and clf.io_dtypes == ["float32", "float32", "float32"]
    assert clf.info["runtime"] == "litert" and clf.info["simulated"] is False and clf.info["io_dtype"] == "float32"
    assert clf.int8_layers == "conv:0/6, linear:0/1"  # the same kernel-truth counter as int8-tflite
    assert clf.size_bytes > 2 * tiny_tflite.size_bytes
    with torch.no_grad():
        ref = tiny.model(tiny.x)
    assert (clf.logits(tiny.x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert clf.features(tiny.x[:3]).shape == (3, 64)
    assert Capability.GRAD in clf.surrogate.capabilities and agreement(clf, clf.surrogate, tiny.x) == 1.0
    again = compress("fp32-tflite", tiny.model, calib=None, device="cpu", artifact=clf.artifact)
    assert torch.equal(again.logits(tiny.x), clf.logits(tiny.x))
    with pytest.raises(BackdoorLabError, match="fp32-tflite: threads must be a positive integer"):
        COMPRESSIONS.validate({"name": "fp32-tflite", "threads": 0})
    with pytest.raises(BackdoorLabError, match="has no parameter 'calib_size'"):
        COMPRESSIONS.validate({"name": "fp32-tflite", "calib_size": 10})


def test_config_validation():
    cfg = COMPRESSIONS.config("int8-tflite")
    assert cfg.calib_size == 100 and cfg.per_channel is True and cfg.calibration == "minmax"
    for bad in ({"calib_size": 0}, {"calib_size": 1.5}, {"threads": 0}, {"per_channel": "yes"},
                {"calibration": "entropy"}):
        with pytest.raises(BackdoorLabError, match="int8-tflite"):
            COMPRESSIONS.validate({"name": "int8-tflite", **bad})
    with pytest.raises(BackdoorLabError, match="did you mean 'calib_size'"):
        COMPRESSIONS.validate({"name": "int8-tflite", "calib_sise": 10})
    with pytest.raises(BackdoorLabError, match="last step"):
        COMPRESSIONS.validate("int8-tflite+fp32")
    COMPRESSIONS.validate("prune-l1-50+int8-tflite")


def test_needs_calibration_images(tiny):
    with pytest.raises(BackdoorLabError, match="int8-tflite needs calibration images"):
        compress("int8-tflite", tiny.model, calib=None, device="cpu")


@pytest.mark.parametrize("missing", ["ai_edge_litert", "litert_torch"])
def test_missing_extra_is_one_line(tiny, monkeypatch, missing):
    import importlib

    real = importlib.import_module

    def fake(name, package=None):
        if name == missing or name.startswith(missing + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=missing)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)  # what require_extra imports with
    with pytest.raises(BackdoorLabError, match=rf"int8-tflite needs {missing}, which is not installed: "
                                               r"pip install 'backdoorlab\[tflite\]'"):
        compress("int8-tflite", tiny.model, calib=tiny.calib, device="cpu")


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def gtsrb_tflite(gtsrb):
    start = time.perf_counter()
    clf = compress("int8-tflite", gtsrb.model, calib=gtsrb.poisoned.holdout, device="cpu")
    clf.build_seconds = time.perf_counter() - start
    fp32 = compress("fp32", gtsrb.model, calib=gtsrb.poisoned.holdout, device="cpu")
    return clf, fp32


@pytest.mark.data
def test_gtsrb_kernel_truth(gtsrb_tflite):
    clf, fp32 = gtsrb_tflite
    assert clf.info["io_dtype"] == "int8" and clf.io_dtypes == ["int8", "int8", "int8"]
    assert clf.int8_layers == "conv:6/6, linear:1/1"
    ops = clf.ops()
    names = [o["op_name"] for o in ops]
    assert "DEQUANTIZE" not in names and names.count("CONV_2D") == 6 and names.count("FULLY_CONNECTED") == 1
    assert all(o["inputs"][:2] == ["int8", "int8"] and o["outputs"] == ["int8"]
               for o in ops if o["op_name"] in ("CONV_2D", "FULLY_CONNECTED"))
    assert 3.0 <= fp32.size_bytes / clf.size_bytes <= 4.5


@pytest.mark.data
def test_gtsrb_accuracy_asr_and_surrogate(gtsrb, gtsrb_tflite):
    from backdoorlab.bench.pipeline import evaluate

    clf, fp32 = gtsrb_tflite
    ref = evaluate(fp32, gtsrb.bundle.test, gtsrb.attack)
    got = evaluate(clf, gtsrb.bundle.test, gtsrb.attack)
    assert ref["ca"] >= 0.85, ref
    assert abs(got["ca"] - ref["ca"]) <= 0.01, (got, ref)
    assert abs(got["asr"] - ref["asr"]) <= 0.03, (got, ref)  # MinMax ranges keep the trigger's activations
    assert agreement(clf, clf.surrogate, gtsrb.poisoned.holdout.float()) >= 0.99
