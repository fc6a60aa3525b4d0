"""Every registered compression builds, predicts, reports size/latency, and (where it lacks GRAD)
carries a differentiable surrogate."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.classifier import Capability, agreement
from backdoorlab.compress import COMPRESSIONS, compress

NO_GRAD = {"int8-dynamic", "int8-torch", "int8-ort", "fp32-ort"}


@pytest.mark.parametrize("name", COMPRESSIONS.names())
def test_compression_smoke(tiny, name):
    clf = compress(name, tiny.model, calib=tiny.calib, device="cpu")
    logits = clf.logits(tiny.x)
    assert logits.shape == (len(tiny.x), 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert clf.precision.startswith(name.split("-")[0])
    assert clf.size_bytes > 0
    assert clf.latency_ms(batch_size=2, repeats=1, warmup=0) > 0
    assert clf.input_shape == (3, 16, 16)
    if Capability.FEATURES in clf.capabilities:
        assert clf.features(tiny.x[:4]).shape[0] == 4
    if name in NO_GRAD:
        assert Capability.GRAD not in clf.capabilities
        sur = clf.surrogate
        assert sur is not None and Capability.GRAD in sur.capabilities
        x = tiny.x[:8].clone().requires_grad_(True)
        sur.logits(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert agreement(clf, sur, tiny.x) >= 0.9
    else:
        assert Capability.GRAD in clf.capabilities


def test_sizes_shrink_as_expected(tiny):
    sizes = {n: compress(n, tiny.model, calib=tiny.calib, device="cpu").size_bytes
             for n in ("fp32", "fp16", "int8-torch", "int4-w")}
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert sizes["int8-torch"] < 0.45 * sizes["fp32"]  # tiny model: fixed overheads weigh more
    assert sizes["int4-w"] < sizes["int8-torch"]


def test_int8_dynamic_says_which_layers_run_in_int8(tiny):
    clf = compress("int8-dynamic", tiny.model, calib=tiny.calib, device="cpu")
    assert clf.int8_layers == "conv:0/6, linear:1/1"
    assert compress("int8-torch", tiny.model, calib=tiny.calib, device="cpu").int8_layers == "conv:6/6, linear:1/1"
