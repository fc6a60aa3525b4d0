"""``int8-pt2e`` (PT2E x86 quantization lowered by Inductor to oneDNN) and ``int8-executorch``
(PT2E XNNPACK quantization in an ExecuTorch ``.pte``), issue 29.

On the tiny untrained CNN: both build, take any batch, rebuild from their artifact without
calibrating, replay their own qparams in the surrogate, and fail in one line without their extra.
On the session's GTSRB BadNets model: int8 kernels really run (the profiler for Inductor, the
XNNPACK delegate's subgraphs for ExecuTorch), clean accuracy stays within a point of FP32, the
surrogate agrees with the artifact, and the backdoor survives deployment.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

import pytest
import torch

from backdoorlab.bench.pipeline import evaluate
from backdoorlab.classifier import Capability, agreement
from backdoorlab.compress import COMPRESSIONS, compress
from backdoorlab.errors import BackdoorLabError

EXTRAS = {"int8-pt2e": [("torchao", "pt2e")], "int8-executorch": [("executorch", "executorch"), ("torchao", "pt2e")]}
NAMES = list(EXTRAS)


def _need(name: str) -> None:
    for module, extra in EXTRAS[name]:
        pytest.importorskip(module, reason=f"{name} needs the {extra} extra: pip install 'backdoorlab[{extra}]'")


@pytest.fixture(scope="module")
def tiny_built(tiny):
    """Each runtime built once on the tiny model (``None`` where its extra is missing)."""
    out = {}
    for name in NAMES:
        try:
            for module, _ in EXTRAS[name]:
                importlib.import_module(module)
        except ImportError:
            out[name] = None
            continue
        out[name] = compress(name, tiny.model, calib=tiny.calib, device="cpu")
    return out


def _built(tiny_built, name):
    _need(name)
    return tiny_built[name]


# ----------------------------------------------------------------------------- tiny model
@pytest.mark.parametrize("name", NAMES)
def test_builds_and_rebuilds_from_the_artifact_without_calibrating(tiny, tiny_built, name, monkeypatch):
    from backdoorlab.compress import executorch_rt, pt2e

    clf = _built(tiny_built, name)
    logits = clf.logits(tiny.x)
    assert logits.shape == (32, 10) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert clf.features(tiny.x).shape == (32, 64)
    assert clf.capabilities == {Capability.FEATURES}
    assert clf.int8_layers == "conv:6/6, linear:1/1"
    assert clf.input_shape == (3, 16, 16) and clf.size_bytes > 0
    assert clf.info["runtime"] == {"int8-pt2e": "torch-inductor", "int8-executorch": "executorch-xnnpack"}[name]
    assert clf.info["runtime_version"] and clf.info["simulated"] is False and clf.info["calib_size"] == 512

    def boom(*a, **k):
        raise AssertionError("calibrated again instead of rebuilding from the artifact")

    monkeypatch.setattr(pt2e, "calibration_images", boom)
    monkeypatch.setattr(executorch_rt, "calibration_images", boom)
    again = compress(name, tiny.model, calib=tiny.calib, device="cpu", artifact=clf.artifact)
    assert torch.equal(again.logits(tiny.x), logits)
    assert torch.equal(again.surrogate.logits(tiny.x), clf.surrogate.logits(tiny.x))
    assert again.int8_layers == clf.int8_layers and again.size_bytes == clf.size_bytes


@pytest.mark.parametrize("name", NAMES)
def test_any_batch_size_gives_the_same_logits(tiny, tiny_built, name):
    clf = _built(tiny_built, name)
    full = clf.logits(tiny.x)
    for n in (1, 7, 16):
        assert torch.allclose(clf.logits(tiny.x[:n]), full[:n], atol=1e-5), n


def test_executorch_runs_batches_above_its_bound_in_chunks(tiny, tiny_built):
    import copy

    clf = _built(tiny_built, "int8-executorch")
    assert clf.max_batch == 256  # the planned input capacity, read back from the program
    small = copy.copy(clf)
    small.max_batch = 8  # any chunk up to the planned capacity is valid
    ref = torch.cat([clf.logits(tiny.x[i:i + 8]) for i in range(0, 32, 8)])
    out = small.logits(tiny.x[:29])
    assert out.shape == (29, 10) and torch.equal(out, ref[:29])


def test_fp32_executorch_twin_reproduces_pytorch(tiny):
    """``fp32-executorch``: the same export and XNNPACK lowering without the quantizer."""
    _need("int8-executorch")
    clf = compress("fp32-executorch", tiny.model, calib=tiny.calib, device="cpu")
    assert clf.int8_layers == "conv:0/6, linear:0/1" and clf.max_batch == 256
    assert clf.info["runtime"] == "executorch-xnnpack" and clf.info["simulated"] is False
    assert clf.info["delegated_subgraphs"] >= 1 and "calib_size" not in clf.info
    with torch.no_grad():
        ref = tiny.model(tiny.x)
    full = clf.logits(tiny.x)
    assert (full - ref).abs().max() <= 1e-4 * ref.abs().max()
    for n in (1, 7, 16):
        assert torch.allclose(clf.logits(tiny.x[:n]), full[:n], atol=1e-5), n
    assert clf.features(tiny.x).shape == (32, 64)
    assert Capability.GRAD in clf.surrogate.capabilities and agreement(clf, clf.surrogate, tiny.x) == 1.0
    again = compress("fp32-executorch", tiny.model, calib=None, device="cpu", artifact=clf.artifact)
    assert torch.equal(again.logits(tiny.x), full) and again.size_bytes == clf.size_bytes


@pytest.mark.parametrize("name", NAMES)
def test_surrogate_uses_the_artifacts_own_qparams(tiny, tiny_built, name):
    from backdoorlab.compress.fakequant import FakeQuant
    from backdoorlab.compress.pt2e import load_program

    clf = _built(tiny_built, name)
    sur = clf.surrogate
    x = tiny.x[:8].clone().requires_grad_(True)
    sur.logits(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert agreement(clf, sur, tiny.x) >= 0.95
    # every activation quantize of the shipped program, with its scale / zero-point / range, is one
    # fake-quant of the surrogate: uint8 for the x86 quantizer, int8 for XNNPACK
    ep = load_program(clf.artifact["program"].numpy().tobytes())
    q = sorted((round(float(n.args[1]), 9), int(n.args[2]), int(n.args[3]), int(n.args[4]))
               for n in ep.graph.nodes if "quantize_per_tensor" in str(n.target) and "dequant" not in str(n.target))
    fq = sorted((round(float(m.scale), 9), int(m.zero_point), m.qmin, m.qmax)
                for m in sur.module.modules() if isinstance(m, FakeQuant))
    assert q and q == fq
    assert {(lo, hi) for *_, lo, hi in fq} == ({(0, 255)} if name == "int8-pt2e" else {(-128, 127)})


def test_pt2e_surrogate_rejects_an_unknown_quantized_op():
    pytest.importorskip("torchao")
    from torch import fx

    from backdoorlab.compress.pt2e import pt2e_surrogate

    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.quantized_decomposed.choose_qparams.tensor, (x, -128, 127, 1e-5, torch.int8)))
    with pytest.raises(BackdoorLabError, match="no surrogate for PT2E op"):
        pt2e_surrogate(fx.GraphModule(torch.nn.Module(), g))


@pytest.mark.parametrize("spec, match", [
    ({"name": "int8-pt2e", "calib_size": 0}, "int8-pt2e: calib_size must be a positive integer"),
    ({"name": "int8-pt2e", "reduce_range": True}, "int8-pt2e' has no parameter 'reduce_range'"),
    ({"name": "int8-executorch", "calib_size": -3}, "int8-executorch: calib_size must be a positive integer"),
    ({"name": "int8-executorch", "max_batch": 1}, r"int8-executorch: max_batch must be an integer in \[2, 4096\]"),
    ({"name": "int8-executorch", "threads": 0}, "int8-executorch: threads must be a positive integer"),
    ({"name": "fp32-executorch", "max_batch": 1}, r"fp32-executorch: max_batch must be an integer in \[2, 4096\]"),
    ({"name": "fp32-executorch", "calib_size": 8}, "fp32-executorch' has no parameter 'calib_size'"),
])
def test_validate_rejects_bad_values(spec, match):
    with pytest.raises(BackdoorLabError, match=match):
        COMPRESSIONS.validate(spec)


def test_deployed_artifacts_end_a_chain():
    with pytest.raises(BackdoorLabError, match="must be the last step"):
        COMPRESSIONS.validate("int8-pt2e+prune-l1-50")
    COMPRESSIONS.validate("prune-l1-50+int8-executorch")


@pytest.mark.parametrize("name, missing, extra", [("int8-pt2e", "torchao", "pt2e"),
                                                  ("int8-executorch", "executorch", "executorch"),
                                                  ("int8-executorch", "torchao", "pt2e")])
def test_missing_extra_is_one_line(tiny, monkeypatch, name, missing, extra):
    real = importlib.import_module

    def fake(mod, package=None):
        if mod == missing or mod.startswith(missing + "."):
            raise ModuleNotFoundError(f"No module named {mod!r}", name=missing)
        return real(mod, package)

    monkeypatch.setattr(importlib, "import_module", fake)  # what require_extra imports with
    with pytest.raises(BackdoorLabError, match=rf"^{name} needs {missing}, which is not installed: "
                                               rf"pip install 'backdoorlab\[{extra}\]'$"):
        compress(name, tiny.model, calib=tiny.calib, device="cpu")


def test_importing_the_package_does_not_import_the_runtimes():
    code = ("import sys, backdoorlab.compress as c; c.COMPRESSIONS.validate('int8-executorch'); "
            "print(sorted(m for m in ('torchao', 'executorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def deployed(gtsrb):
    """fp32 and each available runtime on the GTSRB BadNets model, built once, with the build
    seconds and the CA / ASR / RA of each on the test split."""
    out = {"fp32": compress("fp32", gtsrb.model, calib=gtsrb.poisoned.holdout, device="cpu")}
    for name in NAMES:
        try:
            for module, _ in EXTRAS[name]:
                importlib.import_module(module)
        except ImportError:
            continue
        t0 = time.perf_counter()
        out[name] = compress(name, gtsrb.model, calib=gtsrb.poisoned.holdout, device="cpu")
        out[name].build_s = time.perf_counter() - t0
    scores = {name: evaluate(clf, gtsrb.bundle.test, gtsrb.attack) for name, clf in out.items()}
    return out, scores


@pytest.mark.data
def test_pt2e_runs_onednn_int8_kernels(gtsrb, deployed):
    _need("int8-pt2e")
    clf = deployed[0]["int8-pt2e"]
    x = gtsrb.bundle.test.float()[:32]
    clf.logits(x)  # compiled already by the accuracy run (batch >= 16): no compilation in the profile
    with torch.profiler.profile() as prof:
        clf.logits(x)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("onednn::qconv_pointwise") == 6 and counts.get("onednn::qlinear_pointwise") == 1, counts
    assert not set(counts) & {"aten::convolution", "aten::mkldnn_convolution", "aten::conv2d", "aten::addmm",
                              "aten::linear", "aten::mm"}, counts
    assert clf.int8_layers == "conv:6/6, linear:1/1"
    assert 0 < clf.info["compile_s"] and 1 <= clf.info["compiles"] <= 3


@pytest.mark.data
def test_executorch_delegates_every_conv_and_linear_to_xnnpack_in_int8(deployed):
    _need("int8-executorch")
    clf = deployed[0]["int8-executorch"]
    facts = clf.artifact["delegation"]
    assert facts["backends"] == ["XnnpackBackend"] and facts["subgraphs"] >= 1
    assert facts["int8"] == {"conv": 6, "linear": 1}
    assert not any("conv" in op or "linear" in op or "addmm" in op for op in facts["non_delegated_ops"]), facts
    assert clf.int8_layers == "conv:6/6, linear:1/1"
    assert clf.logits(torch.rand(300, 3, 32, 32)).shape == (300, 43)  # above max_batch: chunks


@pytest.mark.data
@pytest.mark.parametrize("name", NAMES)
def test_clean_accuracy_within_one_point_of_fp32_and_backdoor_survives(deployed, name):
    """Both PT2E quantizers calibrate activations with ``HistogramObserver`` over the full 8 bits,
    whose clean-calibrated ranges clip part of the trigger's activations: ASR 0.94 (fp32) -> 0.84
    (int8-pt2e) / 0.85 (int8-executorch) with CA unchanged, 0.75 / 0.76 on another CI machine with the
    same FP32 model (the clipped activations sit near the histogram's cut, so the kernels' rounding
    moves the count); the same graph with MinMax observers keeps 0.94, as do int8-torch (7-bit
    scales, 8-bit headroom) and int8-ort (MinMax)."""
    _need(name)
    _, scores = deployed
    ref, got = scores["fp32"], scores[name]
    assert ref["ca"] >= 0.85 and ref["asr"] >= 0.9, ref
    assert abs(got["ca"] - ref["ca"]) <= 0.01, (name, got, ref)
    assert 0.65 <= got["asr"] <= ref["asr"] + 0.01, (name, got, ref)


@pytest.mark.data
@pytest.mark.parametrize("name", NAMES)
def test_surrogate_agrees_with_the_artifact(gtsrb, deployed, name):
    """On a CPU whose oneDNN int8 kernels use VNNI the int8-pt2e artifact and its surrogate agree
    on every image (measured 1.0); where oneDNN is held to AVX2 (an AVX2-only CPU, or the tests'
    pinning in conftest.py), vpmaddubsw's int16 saturation moves 2.2% of the test images (measured
    0.9785), which the surrogate's graph replay does not model (compress/pt2e.py)."""
    _need(name)
    clf = deployed[0][name]
    bound = 0.99
    if name == "int8-pt2e":
        from backdoorlab.compress.pt2e import onednn_vnni

        assert clf.info["onednn_vnni"] is onednn_vnni()
        bound = 0.99 if onednn_vnni() else 0.97
    assert agreement(clf, clf.surrogate, gtsrb.poisoned.holdout.float()) >= bound
    assert agreement(clf, clf.surrogate, gtsrb.bundle.test.float()) >= bound


@pytest.mark.data
@pytest.mark.parametrize("name", NAMES)
def test_int8_artifact_is_about_four_times_smaller(deployed, name):
    _need(name)
    fp32 = deployed[0]["fp32"].size_bytes
    assert 3.0 <= fp32 / deployed[0][name].size_bytes <= 4.5, (fp32, deployed[0][name].size_bytes)
