"""DFB, the data-free clean-label backdoor (issue 25): the poisoned images and the trigger depend
on nothing of the training set but its target-class images (the paper's attacker knows only the
target class), the perturbation respects its bound, poisoning is clean-label, and on the GTSRB
subset the backdoor is learned from a handful of poisoned images."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import ATTACKS, DFB
from backdoorlab.attacks import dfb as dfb_module
from backdoorlab.attacks.base import AssetContext
from backdoorlab.data import TensorData
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
EPS = 8 / 255


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def _bound(a: DFB, seed=0) -> DFB:
    g = torch.Generator().manual_seed(seed)
    a.bind_assets({"trigger": {"delta": (torch.rand(3, 32, 32, generator=g) * 2 - 1) * EPS}})
    return a


def _scramble_non_target(data: TensorData, target: int, seed: int) -> TensorData:
    """The same split with every non-target image replaced by fresh noise."""
    g = torch.Generator().manual_seed(seed)
    x = data.x.clone()
    other = data.y != target
    x[other] = torch.randint(0, 256, x[other].shape, dtype=torch.uint8, generator=g)
    return TensorData(x, data.y)


def test_defaults_are_the_papers():
    a = DFB(INFO)
    assert (a.target, a.rate, a.mode) == (0, 0.001, "clean-label")
    assert a.epsilon == pytest.approx(8 / 255) and (a.train_scale, a.test_scale) == (2.0, 6.0)
    assert a.negatives == "cifar10" and DFB(DatasetInfo("cifar10", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, True, 4)
                                            ).negatives == "gtsrb"
    spec = a.assets()["trigger"]
    assert spec["name"] == "dfb-trigger" and spec["target"] == 0 and spec["epsilon"] == pytest.approx(8 / 255)


def test_poisoning_is_clean_label_with_twice_the_perturbation():
    a = _bound(DFB(INFO, target=3, rate=0.05))
    data = _data()
    split = a.poison(data, torch.Generator().manual_seed(1))
    idx = split.poison_idx
    assert len(idx) == 10 and (data.y[idx] == 3).all() and torch.equal(split.data.y, data.y)
    expected = (data.subset(idx).float() + 2 * a.delta).clamp(0, 1)
    got = split.data.subset(idx).float()
    assert (got - expected).abs().max() <= 0.5 / 255 + 1e-6  # rounded to uint8
    rest = ~split.is_poisoned
    assert torch.equal(split.data.x[rest], data.x[rest])
    x = data.float()[:4]
    torch.testing.assert_close(a.apply(x), (x + 6 * a.delta).clamp(0, 1))
    assert torch.equal(a.apply(x), a.apply(x))
    with pytest.raises(BackdoorLabError, match="target class 3"):
        _bound(DFB(INFO, target=3, rate=0.2)).poison(data, torch.Generator())  # 40 asked, 20 held


def test_poison_reads_only_target_class_images():
    """The paper's attacker knows only the target class: replacing every other image of the
    training set by noise changes neither the choice nor the content of the poisoned images."""
    a = _bound(DFB(INFO, target=4, rate=0.05))
    data = _data()
    s1 = a.poison(data, torch.Generator().manual_seed(2))
    s2 = a.poison(_scramble_non_target(data, 4, seed=9), torch.Generator().manual_seed(2))
    assert torch.equal(s1.poison_idx, s2.poison_idx)
    assert torch.equal(s1.data.x[s1.poison_idx], s2.data.x[s2.poison_idx])


def test_trigger_search_reads_only_target_class_images(monkeypatch):
    """The asset builder (surrogate and perturbation) gets the attacker's whole view of the split;
    its result is bit-identical whether the non-target images are the real ones or NaN, so it reads
    none of them (a NaN that entered any computation would reach ``delta``)."""
    # the attacker's generic images (another dataset in real runs): random here, to stay small
    monkeypatch.setattr(dfb_module, "_negative_images",
                        lambda ctx, name, n: torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(7)))
    data = _data(100).as_float()
    nan = data.x.clone()
    nan[data.y != 2] = float("nan")
    out = []
    for x in (data.x, nan):
        ctx = AssetContext(train=TensorData(x, data.y), info=INFO, generator=torch.Generator().manual_seed(0),
                           device=torch.device("cpu"), model=None)
        out.append(dfb_module.dfb_trigger(ctx, target=2, n_negatives=40, surrogate_epochs=1, steps=5,
                                          batch_size=16))
    d = out[0]["delta"]
    assert torch.isfinite(out[1]["delta"]).all() and torch.equal(out[1]["delta"], d)
    assert d.shape == (3, 32, 32) and float(d.abs().max()) <= EPS + 1e-7 and float(d.abs().max()) > 0
    assert int(out[0]["n_positives"]) == 10


@pytest.mark.parametrize("spec, match", [
    ({"epsilon": 0}, "epsilon"),
    ({"test_scale": -1}, "test_scale"),
    ({"negatives": "imagenet"}, "negatives must be"),
    ({"n_negatives": 0}, "n_negatives"),
    ({"mode": "all-to-one"}, "mode"),
    ({"target": 10}, "target"),
])
def test_bad_settings_are_one_line(spec, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "dfb", **spec}, info=INFO)
    assert "\n" not in str(e.value)


def test_negatives_must_come_from_another_dataset():
    cifar = DatasetInfo("cifar10", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, True, 4)
    with pytest.raises(BackdoorLabError, match="another dataset"):
        DFB(cifar, negatives="cifar10")


def test_unbound_trigger_is_a_bug_not_a_user_error():
    with pytest.raises(RuntimeError, match="not bound"):
        DFB(INFO).apply(torch.zeros(1, 3, 32, 32))
