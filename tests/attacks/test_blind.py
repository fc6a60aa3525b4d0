"""Blind backdoors (Bagdasaryan & Shmatikov, USENIX Security 2021): the MGDA weighting, the poisoned
loss computation on each batch, the authors' pattern trigger, the objectives, and the backdoor
learned on GTSRB through the cached pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backdoorlab.attacks import ATTACKS, Blind
from backdoorlab.attacks.blind import mgda_scales, min_norm_2
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError
from backdoorlab.train.fit import FitState, TrainConfig, fit

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
DIGITS = DatasetInfo("digits", 10, 1, 8, (0.3,), (0.37,), False, 1)


def _alpha(g1, g2):
    g1, g2 = torch.tensor(g1, dtype=torch.float64), torch.tensor(g2, dtype=torch.float64)
    return float(min_norm_2(g1 @ g1, g1 @ g2, g2 @ g2))


def _brute(g1, g2):
    """The min-norm point of the segment by a fine grid search."""
    g1, g2 = torch.tensor(g1, dtype=torch.float64), torch.tensor(g2, dtype=torch.float64)
    a = torch.linspace(0, 1, 100001, dtype=torch.float64)[:, None]
    return float(a[(a * g1 + (1 - a) * g2).norm(dim=1).argmin()])


# --- MGDA ----------------------------------------------------------------------------------------

def test_min_norm_interior_is_the_closed_form():
    for g1, g2 in (([1.0, 0.0], [0.0, 1.0]), ([2.0, 0.5], [-1.0, 1.0]), ([3.0, -1.0, 0.5], [-0.5, 2.0, 1.0])):
        a = _alpha(g1, g2)
        t1, t2 = torch.tensor(g1), torch.tensor(g2)
        want = float(((t2 - t1) @ t2) / (t1 - t2).pow(2).sum())
        assert 0.001 < a < 0.999 and a == pytest.approx(want, abs=1e-6) and a == pytest.approx(_brute(g1, g2), abs=1e-4)
    assert _alpha([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.5)  # orthogonal, equal norms: halfway
    assert _alpha([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.8)  # the smaller gradient weighs more


def test_min_norm_edges_are_the_authors_0999_and_0001():
    # g1 . g2 >= |g1|^2: g1 itself is the min-norm point -> 0.999 (the code never gives a task 0)
    assert _alpha([1.0, 0.0], [2.0, 1.0]) == pytest.approx(0.999)
    # g1 . g2 >= |g2|^2: g2 is -> 0.001
    assert _alpha([2.0, 1.0], [1.0, 0.0]) == pytest.approx(0.001)
    assert _alpha([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.999)  # equal gradients: no division by 0
    assert _alpha([0.0, 0.0], [0.0, 0.0]) == pytest.approx(0.999)


def test_loss_plus_normalisation_divides_by_loss_times_norm():
    """``loss+``: each gradient divided by min(L ||g||, 10) (+1e-5) before the min-norm point."""
    g1, g2 = [torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 1.0])]
    l1, l2 = torch.tensor(0.5), torch.tensor(2.0)
    n1, n2 = 0.5 * 3 + 1e-5, 2.0 * 1 + 1e-5
    want = _alpha([3.0 / n1, 0.0], [0.0, 1.0 / n2])
    assert float(mgda_scales(g1, g2, l1, l2, "loss+")) == pytest.approx(want, abs=1e-6)
    assert float(mgda_scales(g1, g2, l1, l2, "none")) == pytest.approx(_alpha([3.0, 0.0], [0.0, 1.0]), abs=1e-6)
    assert float(mgda_scales(g1, g2, l1, l2, "l2")) == pytest.approx(0.5, abs=1e-4)
    big = torch.tensor(100.0)  # L ||g|| capped at 10
    assert float(mgda_scales(g1, g2, big, big, "loss+")) == pytest.approx(_alpha([0.3, 0.0], [0.0, 0.1]), abs=1e-5)


# --- trigger and split ------------------------------------------------------------------------------

def test_trigger_is_the_authors_pattern_top_right():
    atk = Blind(INFO)
    x = torch.full((2, 3, 32, 32), 0.5)
    xt = atk.apply(x)
    assert xt.shape == x.shape and xt.dtype == x.dtype and 0 <= float(xt.min()) and float(xt.max()) <= 1
    assert torch.equal(atk.apply(x), xt)  # deterministic
    block = xt[:, :, 3:8, 23:26]
    want = torch.tensor([[1, 0, 1], [.5, 1, .5], [.5, .5, 0], [.5, 1, .5], [1, 0, 1]])
    assert torch.equal(block, want.expand_as(block))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[3:8, 23:26] = False
    assert (xt[:, :, outside] == 0.5).all()
    assert atk.rate == 1.0 and atk.target == 0 and atk.balance == "mgda" and atk.normalize == "loss+"
    small = Blind(DIGITS).apply(torch.full((1, 1, 8, 8), 0.5))  # scaled and moved inside an 8 x 8 image
    assert small.shape == (1, 1, 8, 8) and int((small != 0.5).sum()) == 9


def test_poison_leaves_the_split_clean():
    data = TensorData(torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8), torch.arange(50) % 10)
    split = Blind(INFO).poison(data, torch.Generator().manual_seed(0))
    assert len(split.poison_idx) == 0 and not split.is_poisoned.any()
    assert torch.equal(split.data.x, data.x) and torch.equal(split.data.y, data.y)


# --- objectives -----------------------------------------------------------------------------------

def test_backdoor_copy_follows_the_objective():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 32, 32, generator=g), torch.arange(40) % 10
    xb, yb, changed = Blind(INFO, target=3).backdoor_batch(x, y, g)
    assert torch.equal(xb, Blind(INFO).apply(x)) and (yb == 3).all() and torch.equal(changed, y != 3)
    a2a = Blind(INFO, mode="all-to-all")
    assert a2a.target_labels(torch.arange(10)).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    _, yb, changed = a2a.backdoor_batch(x, y, g)
    assert torch.equal(yb, (y + 1) % 10) and changed.all()
    ss = Blind(INFO, mode="source-specific", sources=[2, 5], target=0)
    _, yb, changed = ss.backdoor_batch(x, y, g)
    src = (y == 2) | (y == 5)
    assert (yb[src] == 0).all() and torch.equal(yb[~src], y[~src]) and torch.equal(changed, src)
    half = Blind(INFO, rate=0.25)  # the first quarter of the copy is triggered, the rest stays clean
    xb, yb, _ = half.backdoor_batch(x, y, g)
    assert torch.equal(xb[:10], half.apply(x[:10])) and torch.equal(xb[10:], x[10:]) and torch.equal(yb[10:], y[10:])


def test_clean_label_is_refused_with_one_line():
    with pytest.raises(BackdoorLabError, match="clean-label does not apply") as e:
        ATTACKS.build({"name": "blind", "mode": "clean-label"}, info=INFO)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("params,match", [
    ({"balance": "pcgrad"}, "balance must be"), ({"normalize": "l1"}, "normalize must be"),
    ({"scale_backdoor": -1}, "scale_backdoor"), ({"scale_normal": "x"}, "scale_normal"),
    ({"loss_threshold": 0}, "loss_threshold"), ({"history": 0}, "history"), ({"history": 1.5}, "history"),
    ({"rate": 0}, "rate"), ({"target": 10}, "target"),
])
def test_bad_values_fail_with_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "blind", **params}, info=INFO)
    assert "\n" not in str(e.value)


# --- the poisoned loss ----------------------------------------------------------------------------

def _tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 64, 10))


def _digits(n=64):
    from backdoorlab.data import load_dataset

    d = load_dataset("digits").train
    return d.float()[:n], d.y[:n]


def test_hook_returns_the_mgda_weighted_loss_and_its_gradient():
    """One step by hand: the hook's loss is alpha L_b + (1 - alpha) L_n with MGDA's alpha, and its
    gradient (built from the gradients MGDA computed) is that of the weighted sum."""
    x, y = _digits()
    atk = Blind(DIGITS, loss_threshold=None)
    model = _tiny()
    state = FitState(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                     torch.Generator().manual_seed(0), total_steps=10)
    hook = atk.train_hook()
    hook.on_fit_start(state)
    model.eval()  # BN in eval: forward passes do not move the statistics, so the reference below matches
    logits = model(x)
    loss_n = F.cross_entropy(logits, y)
    total = hook.loss(state, x, y, logits, loss_n)
    assert torch.isfinite(total)
    params = list(model.parameters())
    loss_b = F.cross_entropy(model(atk.apply(x)), torch.zeros_like(y))
    g_b = torch.autograd.grad(loss_b, params, retain_graph=True)
    g_n = torch.autograd.grad(loss_n, params, retain_graph=True)
    alpha = mgda_scales(list(g_b), list(g_n), loss_b, loss_n, "loss+")
    assert 0 < float(alpha) < 1
    torch.testing.assert_close(total, alpha * loss_b + (1 - alpha) * loss_n)
    got = torch.autograd.grad(total, params)
    want = torch.autograd.grad(alpha.detach() * loss_b + (1 - alpha.detach()) * loss_n, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hook_trains_on_digits_and_records_the_scales():
    x, y = _digits(300)
    data = TensorData(x, y)
    res = fit(_tiny(), data, TrainConfig(epochs=3, batch_size=50, lr=0.05, augment=False, channels_last=False),
              generator=torch.Generator().manual_seed(0), hooks=[Blind(DIGITS, loss_threshold=1.0).train_hook()],
              device="cpu", progress=False)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res.history)
    first, last = res.history[0], res.history[-1]
    # the code's warm-up (loss_threshold 1.0): min(1000, 18 // 10) = 1 batch of history, and the
    # main loss must fall below 1.0 first
    assert first["blind_attack_frac"] < 1 and last["blind_attack_frac"] == 1.0
    s_b, s_n = last["blind_scale_backdoor"], last["blind_scale_normal"]
    assert 0.001 <= s_b <= 0.999 and s_b + s_n == pytest.approx(1.0)
    assert 0 <= last["train_asr"] <= 1 and last["blind_loss_backdoor"] > 0


def test_fixed_balance_and_no_threshold():
    x, y = _digits(100)
    res = fit(_tiny(), TensorData(x, y), TrainConfig(epochs=1, batch_size=50, lr=0.05, augment=False,
                                                     channels_last=False),
              generator=torch.Generator().manual_seed(0),
              hooks=[Blind(DIGITS, balance="fixed", loss_threshold=None).train_hook()], device="cpu", progress=False)
    h = res.history[0]
    assert h["blind_attack_frac"] == 1.0  # no warm-up
    assert h["blind_scale_backdoor"] == pytest.approx(0.9) and h["blind_scale_normal"] == pytest.approx(1.0)
