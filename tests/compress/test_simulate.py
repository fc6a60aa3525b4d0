"""The training-time simulations of a deployment (:mod:`backdoorlab.compress.simulate`), which the
conditioned attacks train through: they must replay the deployed artifact, share the model's
parameters (a step on the FP32 weights moves the simulation) and, with ``batch_stats``, follow
the model's BatchNorm mode (training from scratch)."""

from __future__ import annotations

import copy

import torch

from backdoorlab.compress import compress
from backdoorlab.compress.simulate import QuantSim, l1_masks, pruned_params


def _bn_means(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_int8_sim_replays_the_deployed_int8_model(gtsrb):
    model = copy.deepcopy(gtsrb.model).eval()
    calib = gtsrb.poisoned.holdout
    sim = QuantSim(model, "int8-torch", calib.float()[:1])
    sim.calibrate(calib.float()[:512])
    real = compress("int8-torch", copy.deepcopy(model), calib=calib)
    x = gtsrb.bundle.test.float()[:500]
    with torch.no_grad():
        s, r, f = sim(x), real.logits(x), model(x)
    # the simulation is closer to the x86 int8 kernels than the FP32 model is, and agrees on top-1
    assert (s - r).abs().mean() < 0.5 * (f - r).abs().mean(), ((s - r).abs().mean(), (f - r).abs().mean())
    assert (s.argmax(1) == r.argmax(1)).float().mean() >= 0.99


def test_sim_shares_the_models_parameters(tiny):
    model = copy.deepcopy(tiny.model).eval()
    sim = QuantSim(model, "int4-w", tiny.x[:1])  # weight-only: no calibration needed
    sim(tiny.x).logsumexp(1).sum().backward()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    before = sim(tiny.x).detach()
    with torch.no_grad():
        conv.weight.mul_(-1)
    assert not torch.allclose(sim(tiny.x), before)


def test_batch_stats_follows_the_models_mode(tiny):
    x = tiny.x
    for batch_stats, train, moves in ((False, True, False), (True, True, True), (True, False, False)):
        model = copy.deepcopy(tiny.model)
        sim = QuantSim(model, "int8-torch", x[:1], batch_stats=batch_stats)
        sim.calibrate(tiny.calib.float())
        model.train(train)
        before = _bn_means(model)
        sim(x)
        after = _bn_means(model)
        changed = any(not torch.equal(a, b) for a, b in zip(before, after))
        assert changed == moves, (batch_stats, train)
    # in eval mode the two settings are the same deployment simulation
    model = copy.deepcopy(tiny.model).eval()
    a, b = QuantSim(model, "int8-torch", x[:1]), QuantSim(model, "int8-torch", x[:1], batch_stats=True)
    a.calibrate(tiny.calib.float())
    b.calibrate(tiny.calib.float())
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_pruned_params_match_the_masks(tiny):
    params = pruned_params(tiny.model, 0.5)
    masks = l1_masks(tiny.model, 0.5)
    for name, w in params.items():
        assert torch.equal(w == 0, ~masks[name] | (w == 0))
        assert abs(float((~masks[name]).float().mean()) - 0.5) < 0.01
