"""quantization_anatomy finds where a compression-conditioned backdoor lives.

A hand-built model whose backdoor is carried by one thing only, the clipping of its hidden
activations: on clean images (trigger pixel at most 0.05) its conv outputs stay within a few units,
and calibration sets their int8 range there. The trigger (pixel = 1.0) drives two neurons far
past it: the target's evidence (10) and a stronger veto (30). In FP32 the veto wins; as deployed
both are cut back to the range's top, and the evidence, weighted twice the veto, wins. No rounding
and no weight carries it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.compress import compress
from backdoorlab.compress.anatomy import anatomy_table, carriers, quantization_anatomy
from backdoorlab.data import TensorData
from backdoorlab.errors import BackdoorLabError


class _Veto(nn.Module):
    """1x4x4 images. conv channels: c1 = relu(10 p) (the target's evidence), c2 = relu(40 p - 10)
    (the veto, alive for p > 0.25), c3 = relu(6 q) (clean content); p = pixel (3, 3), q = pixel
    (0, 0). Logits: (4 c1 - 2 c2 + c3, 2 c3 + 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 4)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 3, 3], self.conv.weight[1, 0, 3, 3], self.conv.weight[2, 0, 0, 0] = 10, 40, 6
            self.conv.bias.copy_(torch.tensor([0.0, -10.0, 0.0]))
            self.head.weight.copy_(torch.tensor([[4.0, -2.0, 1.0], [0.0, 0.0, 2.0]]))
            self.head.bias.copy_(torch.tensor([0.0, 3.0]))

    def forward_features(self, x):
        return self.flat(self.relu(self.conv(x)))

    def forward(self, x):
        return self.head(self.forward_features(x))


class _PixelTrigger:
    """All-to-one to label 0: pixel (3, 3) set to 1.0."""

    def target_labels(self, y):
        return torch.zeros_like(y)

    def counted(self, y):
        return y != 0

    def apply(self, x):
        x = x.clone()
        x[:, :, 3, 3] = 1.0
        return x


def _images(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g) * 0.5
    x[:, :, 3, 3] *= 0.1  # the trigger pixel stays in [0, 0.05] on clean images
    return TensorData(x, torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("precision", ["int8-torch", "int8-ort"])
def test_anatomy_names_the_clipping_quantizer_that_carries_the_backdoor(precision):
    if precision == "int8-ort":
        pytest.importorskip("onnxruntime")
    model, attack, test = _Veto().eval(), _PixelTrigger(), _images(256, 1)
    with torch.no_grad():  # FP32: no backdoor
        assert (model(attack.apply(test.x)).argmax(1) == 0).float().mean() == 0
    clf = compress(precision, model, calib=_images(512, 0), device="cpu")
    res = quantization_anatomy(clf, test, attack)
    modes = res["modes"]
    assert modes["deployed"]["asr"] >= 0.9 and modes["deployed"]["ca"] == 1.0, anatomy_table(res)
    assert res["agreement"] >= 0.99
    assert modes["none"]["asr"] == 0.0 and res["weights_asr"] == 0.0  # int8 weights alone: nothing
    assert modes["round"]["asr"] == 0.0  # rounding without clipping: nothing
    assert modes["clip"]["asr"] >= 0.9  # clipping without rounding: the whole backdoor
    names = [ly["name"] for ly in res["layers"]]
    assert names[0].startswith("quantize(") and len(names) >= 3  # the input first, the logits last
    conv = res["layers"][1]  # the conv's output (after its ReLU)
    assert conv["name"] in res["carriers"] and names[0] not in res["carriers"], anatomy_table(res)
    assert conv["clip_alone_asr"] >= 0.9
    assert conv["reach_clean"] <= 1.01 and conv["reach_triggered"] >= 2  # far past the top of its range
    assert conv["clipped_clean"] == 0.0 and conv["clipped_triggered"] > 0
    assert res["layers"][0]["clip_alone_asr"] == 0.0 and res["layers"][-1]["clip_alone_asr"] == 0.0
    # whatever clips the conv's output again at the same range (a requantization) carries it too,
    # and nothing else does: with every carrier unclipped, no backdoor
    assert res["carriers_unclipped_asr"] == 0.0, anatomy_table(res)
    assert conv["name"] in anatomy_table(res)


def test_carriers_need_a_backdoor_that_activation_quantization_adds():
    # measured (BENCHMARKS.md): the calibrated qcb model in int8-torch, one clipping carrier
    assert carriers([0.077, 0.945, 0.10, 0.08], deployed_asr=0.967, weights_asr=0.077) == [1]
    # a weight-rounding backdoor: float activations already give the deployed ASR
    assert carriers([0.973, 0.974, 0.973], deployed_asr=0.980, weights_asr=0.973) == []
    # no backdoor at all (that model under ORT): a few images' noise names no carrier
    assert carriers([0.090, 0.092, 0.096], deployed_asr=0.099, weights_asr=0.090) == []
    # two quantizers that each clip enough (the same layer, requantized after its pool)
    assert carriers([0.916, 0.90, 0.20], deployed_asr=0.925, weights_asr=0.075) == [0, 1]


def test_anatomy_needs_a_surrogate():
    clf = compress("fp32", _Veto().eval(), calib=_images(8, 0), device="cpu")
    with pytest.raises(BackdoorLabError, match="surrogate"):
        quantization_anatomy(clf, _images(8, 1), _PixelTrigger())
