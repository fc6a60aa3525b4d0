"""Unit checks: fake-quant levels, INT4 grouping, pruning sparsity, ONNX export fidelity."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.compress import compress
from backdoorlab.compress.fakequant import fake_quant, quantize_weight
from backdoorlab.compress.layers import CONV, LINEAR


def _levels_per_row(w: torch.Tensor, group: int | None) -> int:
    rows = w.detach().reshape(w.shape[0], -1)
    step = group or rows.shape[1]
    return max(len(torch.unique(r[i:i + step])) for r in rows for i in range(0, rows.shape[1], step))


def test_fake_quant_matches_torch_quantize_per_tensor():
    x = torch.randn(1000) * 3
    s, z = torch.tensor(0.05), torch.tensor(7)
    ref = torch.quantize_per_tensor(x, 0.05, 7, torch.quint8).dequantize()
    assert torch.equal(fake_quant(x, s, z, 0, 255), ref)
    x.requires_grad_(True)
    fake_quant(x, s, z, 0, 255).sum().backward()
    q = torch.round(x.detach() / 0.05) + 7
    inside = (q >= 0) & (q <= 255)
    assert torch.equal(x.grad, inside.float())  # straight-through inside the range, 0 outside


@pytest.mark.parametrize("group", [None, 8, 32])
def test_int4_weights_have_at_most_16_levels_per_channel_or_group(tiny, group):
    spec = {"name": "int4-w", "group_size": group}
    clf = compress(spec, tiny.model, calib=tiny.calib, device="cpu")
    layers = [m for m in clf.module.modules() if isinstance(m, CONV + LINEAR)]
    assert len(layers) == 7
    for m in layers:
        assert _levels_per_row(m.weight, group) <= 16
    w = torch.randn(4, 70)
    w_hat, scale = quantize_weight(w, 4, 32)
    assert scale.shape == (4, 3) and _levels_per_row(w_hat, 32) <= 16
    assert (w_hat - w).abs().max() <= scale.max() / 2 + 1e-6


def test_w4a8_quantizes_activations(tiny):
    from backdoorlab.compress.fakequant import FakeQuant

    clf = compress("w4a8", tiny.model, calib=tiny.calib, device="cpu")
    fqs = [m for m in clf.module.modules() if isinstance(m, FakeQuant)]
    assert len(fqs) == 7 and all(not f.observe and f.qmax == 255 for f in fqs)
    x = tiny.x[:4]
    first = fqs[0](tiny.model.normalize(x))  # the first conv's input holds at most 256 levels
    assert len(torch.unique(first)) <= 256


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_l1_sparsity_is_what_was_asked(tiny, sparsity, scope):
    clf = compress({"name": "prune-l1", "sparsity": sparsity, "scope": scope}, tiny.model, calib=tiny.calib,
                   device="cpu")
    ws = [m.weight for m in clf.module.modules() if isinstance(m, CONV + LINEAR)]
    got = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert abs(got - sparsity) <= 0.01
    assert clf.precision == f"prune-l1-{round(sparsity * 100)}"
    assert not any(n.endswith("_mask") or n.endswith("_orig") for n in clf.module.state_dict())  # folded
    assert all(not (tiny.model.get_submodule(n).weight == 0).all() for n, m in clf.module.named_modules()
               if isinstance(m, CONV + LINEAR))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_prune_channel_zeroes_whole_filters(tiny, sparsity):
    clf = compress({"name": "prune-channel", "sparsity": sparsity}, tiny.model, calib=tiny.calib, device="cpu")
    convs = [m for m in clf.module.modules() if isinstance(m, CONV)]
    zeros = sum(int((c.weight == 0).sum()) for c in convs) / sum(c.weight.numel() for c in convs)
    assert abs(zeros - sparsity) <= 0.01 + 0.5 / min(c.out_channels for c in convs)  # whole filters
    conv, bn = clf.module.body[0], clf.module.body[1]
    dead = conv.weight.flatten(1).abs().sum(1) == 0
    assert dead.sum() == round(sparsity * conv.out_channels)
    with torch.no_grad():  # a removed filter's feature map is exactly zero after its BatchNorm
        out = bn(conv(clf.module.normalize(tiny.x[:4])))
    assert (out[:, dead] == 0).all()


def test_fp32_onnx_export_matches_pytorch_logits(tiny):
    clf = compress("fp32-ort", tiny.model, calib=tiny.calib, device="cpu")
    with torch.no_grad():
        ref = tiny.model(tiny.x)
        feats = tiny.model.forward_features(tiny.x)
    assert (clf.logits(tiny.x) - ref).abs().max() <= 1e-4
    assert (clf.features(tiny.x) - feats).abs().max() <= 1e-4
    ops = clf.op_types()
    assert "Sub" in ops and "Div" in ops  # Normalize is inside the exported graph
    assert "QuantizeLinear" not in ops
    # worker threads block between calls, so a session does not take the cores of the next one
    opts = clf.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_latency_and_size_of_classifier(tiny):
    from backdoorlab.classifier import state_dict_bytes

    clf = compress("fp32", tiny.model, calib=tiny.calib, device="cpu")
    assert clf.size_bytes == state_dict_bytes(tiny.model)
    assert 0 < clf.latency_ms(batch_size=4, repeats=2, warmup=1)


def test_pruning_a_channels_last_model(tiny):
    import copy

    model = copy.deepcopy(tiny.model).to(memory_format=torch.channels_last)  # as fit() returns it
    for spec in ("prune-l1-50", "prune-channel-50"):
        clf = compress(spec, model, calib=tiny.calib, device="cpu")
        assert abs(clf.info["sparsity"] - 0.5) <= 0.01
