"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): the generators, the mask
pre-training asset, the joint training hook (backdoor, cross-trigger and clean samples, diversity
loss), and the learned generator travelling with the trained model to another process (issue 25)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from backdoorlab.attacks import ATTACKS, InputAware
from backdoorlab.attacks.base import AssetContext
from backdoorlab.attacks.input_aware import TriggerGenerator, diversity_loss, pretrain_mask, threshold
from backdoorlab.data import load_dataset
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError
from backdoorlab.train.fit import FitState, TrainConfig, fit

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)


def _toy(n: int = 256, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def _bound(**params) -> InputAware:
    """An attack with a mask generator bound as the pipeline binds it (here its initial weights:
    pre-training is tested on its own, below, and through the pipeline)."""
    atk = InputAware(INFO, **params)
    atk.bind_assets({"mask": InputAware(INFO).mask_net.state_dict()})
    return atk


def test_generator_is_the_papers_encoder_decoder():
    """At the paper's CIFAR-10 / GTSRB size (32 channels, three stages) the layers are those of its
    code: conv widths 3-32-32 | 32-64-64 | 64-128-128 | 128 | 128-128-64 | 64-64-32 | 32-32-3."""
    net = TriggerGenerator(3, 3, (0.5,) * 3, (0.25,) * 3, width=32, steps=3)
    convs = [(m.in_channels, m.out_channels) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 128),
                     (128, 128), (128, 64), (64, 64), (64, 32), (32, 32), (32, 3)]
    assert isinstance(list(net.body)[-1], torch.nn.BatchNorm2d)  # the last block has no ReLU
    small = TriggerGenerator(3, 1, (0.5,) * 3, (0.25,) * 3)  # the default: the paper's MNIST size
    convs = [(m.in_channels, m.out_channels) for m in small.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(3, 16), (16, 16), (16, 32), (32, 32), (32, 32), (32, 32), (32, 16), (16, 16), (16, 1)]
    with torch.no_grad():
        out = small(torch.rand(4, 3, 32, 32))
    assert out.shape == (4, 1, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_threshold_and_diversity_loss():
    m = torch.tensor([0.0, 0.4, 0.5, 0.6, 1.0])
    t = threshold(m)
    assert float(t[0]) < 1e-4 and float(t[-1]) > 1 - 1e-4 and abs(float(t[2]) - 0.5) < 1e-6
    x1, x2 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)  # image distance 1
    g1, g2 = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.25)  # pattern distance 0.25
    assert abs(float(diversity_loss(x1, x2, g1, g2)) - 4.0) < 1e-4


def test_apply_is_deterministic_in_range_and_input_dependent():
    atk = _bound()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xt = atk.apply(x)
    assert xt.shape == x.shape and xt.dtype == x.dtype and 0 <= float(xt.min()) and float(xt.max()) <= 1
    assert torch.equal(xt, atk.apply(x)) and not torch.equal(xt, x)
    delta = xt - x
    assert not torch.allclose(delta[0], delta[1])  # each image gets its own trigger


def test_poison_leaves_the_split_clean_and_the_mask_asset_is_declared():
    atk = InputAware(INFO)
    data = _toy(50)
    split = atk.poison(data, torch.Generator())
    assert len(split.poison_idx) == 0 and torch.equal(split.data.x, data.x)
    assert atk.assets() == {"mask": {"name": "input-aware-mask", "width": 16, "steps": 2, "epochs": 5, "lr": 0.01,
                                     "density": 0.032, "lambda_div": 1.0, "lambda_norm": 100.0}}


def test_training_without_the_mask_is_refused():
    atk = InputAware(INFO)
    with pytest.raises(BackdoorLabError, match="mask generator is not bound") as e:
        fit(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)), _toy(), TrainConfig(epochs=1),
            generator=torch.Generator().manual_seed(0), hooks=[atk.train_hook()], device="cpu", progress=False)
    assert "\n" not in str(e.value)


def test_mask_pretraining_pulls_the_density_down():
    """Step 1 of the paper on the 8x8 digits: the norm term pulls the mask's density from about
    one half (untrained) towards ``density``, while the diversity term keeps masks apart."""
    from backdoorlab.attacks.input_aware import _build

    data = load_dataset("digits")
    ctx = AssetContext(train=data.train.subset(torch.arange(512)), info=data.info,
                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), model=None)
    x = data.test.float()[:200]
    net = _build(data.info, 1, 16, 2, seed=3).eval()
    with torch.no_grad():
        before = float(threshold(net(x)).mean())
    out = pretrain_mask(ctx, epochs=5, batch_size=64)
    net.load_state_dict({k: v for k, v in out.items() if not k.startswith("stats.")})
    with torch.no_grad():
        masks = threshold(net(x))
    assert before > 0.3 and float(masks.mean()) < 0.15, (before, float(masks.mean()))
    assert abs(float(out["stats.density"]) - float(masks.mean())) < 0.1  # the recorded density
    assert float((masks[0] - masks[1:]).abs().mean()) > 0.01  # not one mask for every image


def _hook_batch(atk, x, y, seed=0):
    hook = atk.train_hook()
    model = torch.nn.Identity()
    state = FitState(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), torch.device("cpu"),
                     torch.Generator().manual_seed(seed))
    hook.on_fit_start(state)
    return hook, state, hook.batch(state, x, y)


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
def test_hook_makes_backdoor_cross_and_clean_samples(mode):
    atk = _bound(mode=mode, target=2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    hook, state, (xo, yo) = _hook_batch(atk, x, y)
    changed = (xo != x).flatten(1).any(1)
    relabelled = yo != y
    # p_a = p_c = 0.1 of 128: 12 backdoor samples (relabelled), 12 cross samples (labels kept)
    assert int(relabelled.sum()) == 12 and int(changed.sum()) == 24
    assert bool(changed[relabelled].all())
    if mode == "all-to-all":  # (y + 1) mod K, never the true label
        assert torch.equal(yo[relabelled], (y[relabelled] + 1) % 10)
    else:
        assert (yo[relabelled] == 2).all()
    assert 0 <= float(xo.min()) and float(xo.max()) <= 1
    assert xo.requires_grad and hook.div is not None and float(hook.div.detach()) > 0  # the generator is in the graph
    # one joint step moves the pattern generator (diversity loss and the classifier's loss)
    before = {k: v.clone() for k, v in atk.pattern_net.state_dict().items()}
    loss = hook.loss(state, xo, yo, None, xo.mean())
    loss.backward()
    hook.after_step(state)
    after = atk.pattern_net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(p.grad is None for p in atk.mask_net.parameters())  # the mask stays frozen


def test_learned_state_round_trips():
    atk = _bound()
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    hook, state, (xo, yo) = _hook_batch(atk, x, y)  # one joint step: a generator unlike the initial one
    hook.loss(state, xo, yo, None, xo.mean()).backward()
    hook.after_step(state)
    x = x[:3]
    state = atk.state_dict()
    assert {k.split(".")[0] for k in state} == {"pattern", "mask"}
    other = InputAware(INFO)
    assert not torch.equal(other.apply(x), atk.apply(x))
    other.load_state_dict(state)
    assert torch.equal(other.apply(x), atk.apply(x))
    with pytest.raises(BackdoorLabError, match="no learned generator state"):
        InputAware(INFO).load_state_dict({})


@pytest.mark.parametrize("params,match", [
    ({"cross_rate": 0.95}, "cross_rate"), ({"lambda_div": -1}, "lambda_div"), ({"lr_g": 0}, "lr_g"),
    ({"width": 1}, "width"), ({"steps": 6}, "divisible"), ({"mask_density": 0}, "mask_density"),
    ({"mask_epochs": 0}, "mask_epochs"),
])
def test_bad_values_fail_with_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "input-aware", **params}, info=INFO)
    assert "\n" not in str(e.value)


CHILD = """
import json
from backdoorlab.bench.pipeline import Pipeline
from backdoorlab.bench.study import Study
study = Study.from_dict({"datasets": ["digits"], "models": ["small-cnn"],
                         "attacks": [{"name": "input-aware", "mask_epochs": 1}], "train": {"epochs": 1}})
cell = study.cells()[0]
pipe = Pipeline(device="cpu", progress=False)
attack = pipe.attack(cell)
model, meta = pipe.train(cell, pipe.poison(cell, attack), attack)
x = pipe.data(cell.dataset).test.float()[:8]
print(json.dumps({"triggered": attack.apply(x).flatten().tolist(), "history": meta["history"][-1]}))
"""


def test_generator_travels_with_the_model_to_a_fresh_process(tmp_path):
    """The pipeline trains the model and the pattern generator once and caches both; a second
    process gets both from the cache (no asset build, no training) and the same triggered images."""
    env = {**os.environ, "BACKDOORLAB_HOME": str(tmp_path)}

    def child():
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1]), out.stderr

    first, log1 = child()
    assert "building asset input-aware-mask" in log1 and "training small-cnn" in log1
    assert first["history"]["n_backdoor"] > 0 and first["history"]["n_cross"] > 0
    second, log2 = child()
    assert "building asset" not in log2 and "training" not in log2
    assert second["triggered"] == first["triggered"]
    x = load_dataset("digits").test.float()[:8]
    assert not torch.equal(torch.tensor(first["triggered"]).view_as(x), x)  # a trigger, not the clean images
