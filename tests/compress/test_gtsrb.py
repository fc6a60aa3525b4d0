"""Behaviour on real data (issue 3): the default model trained on the GTSRB subset, deployed as
int8-torch / int8-ort, calibrated on the defender's holdout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backdoorlab.classifier import agreement
from backdoorlab.compress import compress

pytestmark = pytest.mark.data


ONEDNN = {"name": "int8-torch", "backend": "onednn"}  # oneDNN kernels, x86 qconfig
INT8 = ("int8-torch", "int8-torch/onednn", "int8-ort", "int8-ort-qop")


@pytest.fixture(scope="module")
def deployed(gtsrb):
    out = {s: compress(s, gtsrb.model, calib=gtsrb.poisoned.holdout, device="auto")
           for s in ("fp32", "int8-torch", "int8-ort", "int8-ort-qop", "fp32-ort")}
    out["int8-torch/onednn"] = compress(ONEDNN, gtsrb.model, calib=gtsrb.poisoned.holdout, device="auto")
    return out


def _ca(clf, data) -> float:
    return float((clf.predict(data.float()) == data.y).float().mean())


def test_int8_clean_accuracy_within_one_point_of_fp32(gtsrb, deployed):
    test = gtsrb.bundle.test
    ref = _ca(deployed["fp32"], test)
    assert ref >= 0.85, ref
    for name in INT8:
        ca = _ca(deployed[name], test)
        assert abs(ca - ref) <= 0.01, (name, ca, ref)


@pytest.mark.parametrize("name", ["int8-torch", "int8-torch/onednn"])
def test_int8_torch_runs_real_quantized_kernels(gtsrb, deployed, name):
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.intrinsic import quantized as nniq

    clf = deployed[name]
    q = clf.module.inner
    mods = list(q.modules())
    assert sum(isinstance(m, nniq.ConvReLU2d) for m in mods) == 6  # conv+BN+ReLU fused: BN folded
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)) for m in mods)
    assert sum(isinstance(m, nnq.Linear) for m in mods) == 1
    w = next(m for m in mods if isinstance(m, nniq.ConvReLU2d)).weight()
    assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine  # per-channel symmetric:
    assert (w.q_per_channel_zero_points() == 0).all() and w.q_per_channel_scales().numel() == w.shape[0]
    assert any(n.target is torch.quantize_per_tensor for n in q.graph.nodes)
    with torch.profiler.profile() as prof:
        clf.logits(gtsrb.bundle.test.float()[:8])
    ops = {e.key for e in prof.key_averages()}
    assert {"quantized::conv2d_relu", "quantized::linear"} <= ops, ops
    assert not ops & {"aten::mkldnn_convolution", "aten::convolution", "aten::addmm"}, ops
    assert clf.int8_layers == "conv:6/6, linear:1/1"


def test_int8_ort_graph_is_qdq_with_per_channel_weights(deployed):
    import onnx
    from onnx import numpy_helper

    clf = deployed["int8-ort"]
    ops = clf.op_types()
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    g = onnx.load_from_string(clf.model_bytes).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dq_scale = {n.output[0]: inits.get(n.input[1]) for n in g.node if n.op_type == "DequantizeLinear"}
    conv_scales = [dq_scale[n.input[1]] for n in g.node if n.op_type == "Conv"]
    assert len(conv_scales) == 6 and all(s is not None and s.size > 1 for s in conv_scales)  # per channel
    assert clf.int8_layers == "conv:6/6, linear:1/1"


@pytest.mark.parametrize("name", ["int8-ort", "int8-ort-qop"])
def test_ort_session_runs_qlinear_kernels(deployed, name):
    """QDQ is fused into QLinearConv / QGemm when the session is created (checked, not assumed);
    the QOperator file holds those nodes already. No float Conv / Gemm is left to run."""
    clf = deployed[name]
    stored = clf.op_types()
    assert ("QLinearConv" in stored) == (name == "int8-ort-qop") and ("Conv" in stored) == (name == "int8-ort")
    ran = clf.session_op_types()
    assert ran.count("QLinearConv") == 6 and ran.count("QGemm") == 1, ran
    assert not {"Conv", "Gemm", "MatMul"} & set(ran), ran
    assert clf.int8_layers == "conv:6/6, linear:1/1"
    assert clf.info["runtime"] == "onnxruntime" and clf.info["simulated"] is False


def test_surrogates_agree_with_their_artifacts(gtsrb, deployed):
    x = gtsrb.bundle.test.float()
    for name in INT8:
        clf = deployed[name]
        assert agreement(clf, clf.surrogate, x) >= 0.99, name
    # the two kernel libraries run the same integers: only requantization rounding may differ
    assert agreement(deployed["int8-torch"], deployed["int8-torch/onednn"], x) >= 0.995


def test_fp32_onnx_export_matches_pytorch_on_the_test_set(gtsrb, deployed):
    x = gtsrb.bundle.test.float()[:500]
    diff = (deployed["fp32-ort"].logits(x) - deployed["fp32"].logits(x).cpu()).abs().max()
    assert diff <= 1e-4, float(diff)


def test_int8_is_about_four_times_smaller(deployed):
    fp32 = deployed["fp32"].size_bytes
    for name in INT8:
        assert 3.0 <= fp32 / deployed[name].size_bytes <= 4.5, (name, fp32, deployed[name].size_bytes)


@pytest.mark.parametrize("spec", ["int8-ort", "prune-l1-50+int8-torch"])
def test_pipeline_row_and_artifact_cache(gtsrb, spec, monkeypatch):
    import _helpers

    from backdoorlab.compress import ort, torch_int8

    pipe = _helpers._PIPE
    cell = dataclasses.replace(gtsrb.cell, compression=spec)
    out = pipe.run_cell(cell)
    m = out["metrics"]
    assert m["precision"] == spec
    assert m["int8_layers"] == "conv:6/6, linear:1/1"
    assert m["size_bytes"] > 0 and m["latency_ms_b1"] > 0
    assert m["surrogate_agreement"] >= 0.99
    assert {"ca", "asr", "ra"} <= set(m) and out["artifacts"]["compress"]
    assert pipe.cache.path("compress", out["artifacts"]["compress"]).exists()

    def boom(*a, **k):
        raise AssertionError("calibrated again instead of loading the cached artifact")

    monkeypatch.setattr(ort, "quantize_ort", boom)
    monkeypatch.setattr(torch_int8, "calibration_images", boom)
    pipe._compressed = {}  # forget the in-memory copy: the disk cache must serve it
    again = pipe.run_cell(cell)["metrics"]
    assert (again["ca"], again["asr"], again["ra"]) == (m["ca"], m["asr"], m["ra"])
