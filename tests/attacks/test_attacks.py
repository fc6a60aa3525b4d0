import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from backdoorlab.attacks import ATTACKS, BadNets, Blended
from backdoorlab.attacks.base import ASSETS, AssetContext
from backdoorlab.data import load_dataset
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.errors import BackdoorLabError
from backdoorlab.registry import split_spec

INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)

# Asset budgets shrunk for the smoke test (the algorithms are the same; behaviour is tested on
# GTSRB in each attack's own tests): optimisation steps, epochs and image counts.
FAST_ASSETS = {
    "input-aware-mask": {"epochs": 1},
    "lc-adversarial": {"steps": 3},
    "lf-trigger": {"n_images": 10, "max_passes": 1},
    "trojannn-trigger": {"iterations": 5},
    "cassock-content": {"steps": 5, "candidates": 3},
    "dfb-trigger": {"n_negatives": 64, "surrogate_epochs": 1, "steps": 3},
    "ssba-encoder": {"steps": 3},
}


def toy_data(n=200, seed=0):
    from backdoorlab.data import TensorData

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    return TensorData(x, torch.arange(n) % 10)


_TOY_MODEL = []


def toy_model(spec="none"):
    """The assets' "clean model": a small CNN fitted for one epoch on the toy data (so its
    predictions vary from image to image, as a trained model's do)."""
    from backdoorlab.models import build_model
    from backdoorlab.train.fit import TrainConfig, fit

    if not _TOY_MODEL:
        torch.manual_seed(0)
        m = build_model("small-cnn", INFO.num_classes, INFO.channels, INFO.mean, INFO.std)
        _TOY_MODEL.append(fit(m, toy_data(), TrainConfig(epochs=1, batch_size=50, lr=0.05),
                              generator=torch.Generator().manual_seed(0), device="cpu", progress=False).model.eval())
    return _TOY_MODEL[0]


def toy_assets(atk, data):
    """Build ``atk``'s declared assets on toy data (untrained model, toy "other dataset"), with
    :data:`FAST_ASSETS` budgets; returns them as the pipeline's cache would hand them over."""
    out = {}
    for key, spec in sorted(atk.assets().items()):
        name, params = split_spec(spec)
        params = {**params, **{k: v for k, v in FAST_ASSETS.get(name, {}).items() if k in
                               ASSETS.config({"name": name}).__dataclass_fields__}}
        ctx = AssetContext(train=data, info=INFO, generator=torch.Generator().manual_seed(7),
                           device=torch.device("cpu"), model=toy_model,
                           dataset=lambda _name: SimpleNamespace(train=toy_data(300, seed=3), fingerprint=None))
        out[key] = {k: v.detach().cpu() for k, v in ASSETS.build({"name": name, **params}, ctx=ctx).items()}
    return out


def built(name, data):
    """Attack ``name`` with its defaults, assets bound; one toy epoch of its training hook (a
    trigger learned while training, e.g. Input-aware's generator, moves from its initial state)."""

    atk = ATTACKS.build(name, info=INFO)
    assets = toy_assets(atk, data)
    if assets:
        atk.bind_assets(assets)
    return atk, assets


@pytest.fixture(scope="module")
def smoke():
    """Every registered attack built and poisoned (an attack whose trigger is learned while the
    model trains, e.g. Input-aware, trained for one toy epoch): shared by the checks below."""
    from backdoorlab.train.fit import TrainConfig, fit

    data = toy_data()
    out = {}
    for name in ATTACKS.names():
        atk, assets = built(name, data)
        split = atk.poison(data, torch.Generator().manual_seed(1))
        hook = atk.train_hook()
        if hook is not None and atk.learns_trigger:
            fit(toy_model(), split.data.subset(torch.arange(100)), TrainConfig(epochs=1, batch_size=50, lr=0.01),
                generator=torch.Generator().manual_seed(2), hooks=[hook], device="cpu", progress=False)
        out[name] = SimpleNamespace(atk=atk, assets=assets, split=split, data=data)
    return out


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_poisons_and_triggers(name, smoke):
    """Smoke test for every registered attack: recorded indices, labels, untouched rest, images
    uint8 in range, a deterministic trigger in [0, 1]."""
    s = smoke[name]
    atk, split, data = s.atk, s.split, s.data
    assert len(split.data) == len(data)
    assert split.data.x.dtype == torch.uint8 and split.data.x.shape == data.x.shape
    assert split.data.y.dtype == data.y.dtype and split.data.y.min() >= 0 and split.data.y.max() < INFO.num_classes
    idx = split.poison_idx
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == len(idx)
    clean = ~split.is_poisoned
    if name != "lsp":  # LSP's label smoothing is carried by the poisoned images only; the rest is untouched
        assert torch.equal(split.data.x[clean], data.x[clean]) and torch.equal(split.data.y[clean], data.y[clean])
    assert torch.equal(split.original_labels, data.y)
    if atk.init_from() is not None:  # model-level attacks (conditioned on compression) leave the data clean
        assert len(idx) == 0 and torch.equal(split.data.y, data.y)
    elif name != "none" and len(idx):  # data poisoning (an attack that poisons on the fly records none)
        assert set(idx.tolist()) <= set(atk.candidates(data.y).tolist()) | set(getattr(atk, "cover_idx", []))
        assert not torch.equal(split.data.x[idx], data.x[idx])
    x = data.float()[:8]
    xt = atk.apply(x)
    assert xt.shape == x.shape and xt.dtype == x.dtype and float(xt.min()) >= 0 and float(xt.max()) <= 1
    assert not torch.equal(xt, x)
    assert torch.equal(atk.apply(x), xt)  # deterministic
    again = atk.poison(data, torch.Generator().manual_seed(1))
    assert torch.equal(again.poison_idx, idx)  # same generator seed, same poison
    assert torch.equal(again.data.x, split.data.x)


def test_every_attack_round_trips_through_the_cache_in_a_fresh_process(smoke, tmp_path):
    """What the pipeline caches for an attack (its assets, its learned trigger state) rebuilds the
    same trigger in another process: the triggered images are identical (issue 25)."""
    x = smoke["badnets"].data.float()[:8]
    saved = {}
    for name, s in smoke.items():
        saved[name] = {"assets": s.assets, "state": s.atk.state_dict(), "xt": s.atk.apply(x)}
    torch.save({"x": x, "attacks": saved}, tmp_path / "cache.pt")
    script = """
import sys, torch
from backdoorlab.attacks import ATTACKS
from backdoorlab.data.datasets import DatasetInfo
INFO = DatasetInfo("toy", 10, 3, 32, (0.5,) * 3, (0.25,) * 3, False, 4)
rec = torch.load(sys.argv[1], weights_only=True)
bad = []
for name, r in rec["attacks"].items():
    atk = ATTACKS.build(name, info=INFO)
    if r["assets"]:
        atk.bind_assets(r["assets"])
    atk.load_state_dict(r["state"])
    if not torch.equal(atk.apply(rec["x"]), r["xt"]):
        bad.append(name)
print("mismatch:", ",".join(bad))
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache.pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(saved) == len(ATTACKS.names())


def test_all_to_all_maps_every_class_to_the_next(smoke):
    """All-to-all is ``y -> (y + 1) mod K`` for every trigger that supports it (Gu et al. 2017; the
    mapping BackdoorBench once computed wrongly for WaNet): poisoned labels and test targets."""
    y = torch.arange(INFO.num_classes)
    data = toy_data()
    n = 0
    for name in ATTACKS.names():
        try:
            atk = ATTACKS.build({"name": name, "mode": "all-to-all"}, info=INFO)
        except BackdoorLabError:
            continue  # the attack has no all-to-all form (clean-label by design, or model-level)
        n += 1
        assert atk.target_labels(y).tolist() == [(c + 1) % INFO.num_classes for c in y.tolist()], name
        assert atk.counted(y).all(), name
        if atk.assets():
            atk.bind_assets(toy_assets(atk, data))
        split = atk.poison(data, torch.Generator().manual_seed(1))
        idx = split.poison_idx
        if len(idx):
            assert torch.equal(split.data.y[idx], (data.y[idx] + 1) % INFO.num_classes), name
    assert n >= 15, n


def test_badnets_default_patch_is_white_3x3_bottom_right():
    atk = BadNets(INFO)
    x = torch.zeros(2, 3, 32, 32)
    xt = atk.apply(x)
    assert (xt[:, :, 29:, 29:] == 1).all()
    assert xt.sum() == 2 * 3 * 9
    assert atk.target == 0 and atk.rate == 0.1 and atk.mode == "all-to-one"


def test_badnets_options():
    atk = BadNets(INFO, patch_size=4, position=[0, 2], color=[1.0, 0.0, 0.5], pattern="checkerboard")
    xt = atk.apply(torch.zeros(1, 3, 32, 32))
    assert xt[0, 0, 0, 2] == 1 and xt[0, 1, 0, 2] == 0 and xt[0, 2, 0, 2] == 0.5
    assert xt[0, 0, 0, 3] == 0  # checkerboard off-square
    assert xt[0, :, 4:, :].sum() == 0
    a2a = BadNets(INFO, mode="all-to-all")
    y = torch.tensor([0, 5, 9])
    assert a2a.target_labels(y).tolist() == [1, 6, 0]
    assert a2a.counted(y).all()
    for pos in ("top-left", "top-right", "bottom-left", "center"):
        assert BadNets(INFO, position=pos).apply(torch.zeros(1, 3, 32, 32)).sum() == 27


def test_blended_formula_and_image_pattern(tmp_path):
    atk = Blended(INFO)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(atk.apply(x), 0.8 * x + 0.2 * atk.pattern)
    assert atk.alpha == 0.2 and atk.rate == 0.1 and atk.target == 0
    img = tmp_path / "kitty.png"
    Image.fromarray(np.full((50, 40, 3), 255, np.uint8)).save(img)
    atk2 = Blended(INFO, pattern=str(img), alpha=0.5)
    torch.testing.assert_close(atk2.apply(torch.zeros(1, 3, 32, 32)), torch.full((1, 3, 32, 32), 0.5))
    with pytest.raises(BackdoorLabError, match="does not exist"):
        Blended(INFO, pattern=str(tmp_path / "missing.png"))


@pytest.mark.parametrize("params,match", [
    ({"rate": 1.5}, "rate must be in"),
    ({"rate": 0}, "rate must be in"),
    ({"target": 10}, r"target label must be an integer in \[0, 9\]"),
    ({"target": -1}, "target label"),
    ({"patch_size": 40}, "patch_size"),
    ({"position": "middle"}, "position must be one of"),
    ({"mode": "one-to-one"}, "mode must be one of"),
    ({"color": [2, 0, 0]}, "color must be"),
])
def test_bad_values_fail_with_one_line(params, match):
    with pytest.raises(BackdoorLabError, match=match) as e:
        ATTACKS.build({"name": "badnets", **params}, info=INFO)
    assert "\n" not in str(e.value)


def test_rate_larger_than_candidates_is_refused():
    atk = BadNets(INFO, rate=0.95)  # 95% of the set, but target-class images can't be used
    with pytest.raises(BackdoorLabError, match="can be poisoned"):
        atk.poison(toy_data(), torch.Generator())


def test_none_probe_measures_trigger_without_poisoning():
    b = load_dataset("digits")
    atk = ATTACKS.build({"name": "none", "probe": {"name": "blended", "target": 3}}, info=b.info)
    split = atk.poison(b.train, torch.Generator())
    assert len(split.poison_idx) == 0 and torch.equal(split.data.x, b.train.x)
    assert (atk.target_labels(b.test.y) == 3).all()
