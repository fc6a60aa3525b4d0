"""TrojanNN (Liu et al., NDSS 2018; issue 25): neuron selection by weight sums, a trigger optimised
to excite the selected neurons, the patch stamped by apply(), and the backdoor learned on the GTSRB
subset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.attacks import ATTACKS
from backdoorlab.attacks.base import AssetContext
from backdoorlab.attacks.trojannn import TrojanNN, activations, select_neurons, trojannn_trigger
from backdoorlab.data import TensorData
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import build_model

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
SMALL = DatasetInfo("toy8", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, False, 1)  # 8x8: the search in a few seconds


def toy_model(seed=0):
    torch.manual_seed(seed)  # the toy model's initial weights (tests seed; the library never does)
    return build_model("small-cnn", SMALL.num_classes, SMALL.channels, SMALL.mean, SMALL.std).eval()


def smooth_model(seed=0):
    """A small classifier whose penultimate features respond to every input pixel (no ReLU that
    could leave a randomly initialised neuron dead on the all-zero background)."""
    from backdoorlab.models.common import ImageClassifier, Normalize

    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return ImageClassifier(Normalize(SMALL.mean, SMALL.std), body, nn.Linear(32, SMALL.num_classes)).eval()


def toy_ctx(model, seed=0):
    x = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    return AssetContext(train=TensorData(x, torch.arange(4)), info=SMALL, generator=torch.Generator().manual_seed(seed),
                        device=torch.device("cpu"), model=lambda spec: model)


def test_penultimate_neurons_are_those_with_the_largest_outgoing_weight_sums():
    model = toy_model()
    with torch.no_grad():
        model.head.weight.fill_(0.01)
        model.head.weight[:, 7] = -0.5  # |w| counts, not w
        model.head.weight[3, 200] = 2.0
    idx, module = select_neurons(model, "penultimate", 2)
    assert idx.tolist() == [7, 200] and module is None
    conv = dict(model.named_modules())["body.0"]
    with torch.no_grad():
        conv.weight.fill_(0.01)
        conv.weight[5] = 1.0  # incoming weights of output channel 5
    idx, module = select_neurons(model, "body.0", 1)
    assert idx.tolist() == [5] and module is conv
    with pytest.raises(BackdoorLabError, match="conv/linear layers") as e:
        select_neurons(model, "body.1", 1)  # a BatchNorm, not a conv/linear layer
    assert "\n" not in str(e.value)
    with pytest.raises(BackdoorLabError, match="exceeds"):
        select_neurons(model, "penultimate", 1000)


def test_trigger_search_excites_the_selected_neurons():
    model = smooth_model()
    out = trojannn_trigger(toy_ctx(model), patch_size=3, top=5, left=5, iterations=200)
    idx, _ = select_neurons(model, "penultimate", 2)
    assert torch.equal(out["neurons"], idx)
    assert out["patch"].shape == (3, 3, 3) and out["patch"].min() >= 0 and out["patch"].max() <= 1
    assert (out["activation_end"] > out["activation_start"]).all(), out
    x = torch.zeros(21, 3, 8, 8)
    x[0, :, 5:, 5:] = out["patch"]
    x[1:, :, 5:, 5:] = torch.rand(20, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        act = activations(model, x, None, idx)
    torch.testing.assert_close(act[0], out["activation_end"])
    cost = ((act - 100) ** 2).sum(1)  # the paper's cost: the optimised patch beats 20 random ones
    assert cost[0] < cost[1:].min()
    again = trojannn_trigger(toy_ctx(model), patch_size=3, top=5, left=5, iterations=200)
    assert torch.equal(again["patch"], out["patch"])  # same generator, same trigger
    conv = trojannn_trigger(toy_ctx(model), patch_size=3, top=5, left=5, layer="body.2", num_neurons=1, iterations=50)
    assert (conv["activation_end"] > conv["activation_start"]).all()


def test_apply_stamps_the_patch_and_nothing_else():
    atk = TrojanNN(INFO)
    assert atk.mode == "all-to-one" and atk.target == 0 and atk.rate == 0.1 and (atk.top, atk.left) == (27, 27)
    spec = atk.assets()["trigger"]
    assert spec["name"] == "trojannn-trigger" and spec["patch_size"] == 5 and spec["layer"] == "penultimate"
    patch = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))
    atk.bind_assets({"trigger": {"patch": patch}})
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    xt = atk.apply(x)
    assert torch.equal(xt[:, :, 27:, 27:], patch.expand(4, -1, -1, -1))
    xt[:, :, 27:, 27:] = x[:, :, 27:, 27:]
    assert torch.equal(xt, x)
    assert torch.equal(atk.apply(x), atk.apply(x))
    top_left = TrojanNN(INFO, patch_size=3, position="top-left")
    assert (top_left.top, top_left.left) == (0, 0)
    at = TrojanNN(INFO, patch_size=4, position=[2, 10])
    assert (at.top, at.left) == (2, 10)


def test_objectives_and_bad_values():
    patch = torch.ones(3, 5, 5)
    data = TensorData(torch.zeros(100, 32, 32, 3, dtype=torch.uint8), torch.arange(100) % 10)
    for mode in ("all-to-all", "source-specific"):
        extra = {"sources": [3]} if mode == "source-specific" else {}
        atk = ATTACKS.build({"name": "trojannn", "mode": mode, **extra}, info=INFO)
        atk.bind_assets({"trigger": {"patch": patch}})
        split = atk.poison(data, torch.Generator().manual_seed(0))
        assert (split.data.y[split.poison_idx] == atk.target_labels(data.y[split.poison_idx])).all()
        assert (split.data.x[split.poison_idx][:, 27:, 27:] == 255).all()
    for params, match in [({"patch_size": 40}, "patch_size"), ({"position": "middle"}, "position"),
                          ({"position": [30, 30]}, "does not fit"), ({"num_neurons": 0}, "num_neurons"),
                          ({"target_value": -1}, "target_value"), ({"lr": 0}, "lr"), ({"layer": ""}, "layer")]:
        with pytest.raises(BackdoorLabError, match=match) as e:
            ATTACKS.build({"name": "trojannn", **params}, info=INFO)
        assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="not bound"):
        TrojanNN(INFO).apply(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="shape"):
        TrojanNN(INFO).bind_assets({"trigger": {"patch": torch.ones(3, 4, 4)}})


def test_named_layer_that_is_not_conv_or_linear_fails_in_one_line():
    with pytest.raises(BackdoorLabError, match="conv/linear"):
        trojannn_trigger(toy_ctx(toy_model()), patch_size=3, top=0, left=0, layer="nope", iterations=1)
    assert isinstance(dict(toy_model().named_modules())["body.4"], nn.Conv2d)
