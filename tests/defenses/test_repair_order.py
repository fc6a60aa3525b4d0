"""The two orders of repair and deployment (issue 26 §2), and the dormant-backdoor measurement
(BEC and re-activation, issue 26 §3) on real data."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.bench.pipeline import run_study
from backdoorlab.bench.store import ResultStore
from backdoorlab.bench.study import Study
from backdoorlab.classifier import TorchClassifier, agreement
from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses.dormant import linear_cka
from backdoorlab.errors import BackdoorLabError


def _study(compress, defenses):
    return Study.from_dict({"name": "repair-order", "datasets": ["digits"], "models": ["small-cnn"],
                            "attacks": ["badnets"], "compress": compress, "defenses": defenses, "seeds": [0],
                            "train": {"epochs": 6, "batch_size": 64, "lr": 0.05}})


def test_order_is_checked_before_anything_runs():
    DEFENSES.validate({"name": "fine-pruning", "order": "deploy-first"})
    with pytest.raises(BackdoorLabError, match="order must be one of fp32-first, deploy-first"):
        DEFENSES.validate({"name": "fine-pruning", "order": "later"})
    with pytest.raises(BackdoorLabError, match="order applies to removers only"):
        DEFENSES.validate({"name": "strip", "order": "deploy-first"})
    assert DEFENSES.build("fine-pruning").order == "fp32-first"
    assert DEFENSES.build({"name": "fine-pruning", "order": "deploy-first"}).order == "deploy-first"


def test_shipped_weights_of_an_fx_int8_artifact_reproduce_it():
    """deploy-first starts from the artifact's own weights: the BN-folded float model holds the FX
    artifact's dequantised int8 weights (each within half an int8 step of the folded FP32 weight,
    never equal to all of them), and predicts as the artifact does but for activation rounding."""
    from backdoorlab.compress import compress
    from backdoorlab.compress.layers import fold_batchnorm
    from backdoorlab.data import load_dataset
    from backdoorlab.defenses.order import shipped_model
    from backdoorlab.models import build_model
    from backdoorlab.train.fit import TrainConfig, fit

    b = load_dataset("digits")
    torch.manual_seed(0)
    m = build_model("small-cnn", 10, 1, b.info.mean, b.info.std)
    m = fit(m, b.train, TrainConfig(epochs=3, batch_size=64, lr=0.05), generator=torch.Generator().manual_seed(0),
            device="cpu").model.eval()
    clf = compress("int8-torch", m, calib=b.train)
    shipped = shipped_model(clf, m)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in shipped.modules())
    folded = fold_batchnorm(m)
    for name, mod in shipped.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            w, w32 = mod.weight.detach(), dict(folded.named_modules())[name].weight.detach()
            step = w32.abs().flatten(1).amax(1) / 127  # per-channel symmetric int8
            err = (w - w32).abs().flatten(1).amax(1)
            assert (err <= step / 2 + 1e-6).all() and err.max() > 0, name
    assert agreement(clf, TorchClassifier(shipped, device="cpu"), b.test.float()) >= 0.9  # measured 0.95
    assert shipped is not m and all(p.requires_grad for p in shipped.parameters())


def test_both_orders_run_and_the_row_says_which(tmp_path):
    """fp32-first works at every precision; deploy-first repairs the shipped weights: the pruned
    model's at prune-l1-50, while at int4-w (BatchNorm folded into the convolutions) Fine-Pruning
    finds no BatchNorm to prune and its row is an error that says so, never a "not removed"."""
    store = ResultStore(tmp_path / "r.db")
    fp = {"name": "fine-pruning", "epochs": 2, "dormancy": False}
    rows = run_study(_study(["prune-l1-50", "int4-w"], [fp, {**fp, "order": "deploy-first"}]), store,
                     log=lambda s: None)
    by = {(r.compression, r.config["defense"].get("order", "fp32-first")): r for r in rows}
    for comp in ("prune-l1-50", "int4-w"):
        r = by[(comp, "fp32-first")]
        assert r.status == "ok" and r.metrics["repair_order"] == "fp32-first", r.error
    ok = by[("prune-l1-50", "deploy-first")]
    assert ok.status == "ok" and ok.metrics["repair_order"] == "deploy-first", ok.error
    assert ok.metrics["repaired_precision"] == "prune-l1-50"
    err = by[("int4-w", "deploy-first")]
    assert err.status == "error" and "fine-pruning" in err.error and "BatchNorm" in err.error


def test_linear_cka_is_one_for_equivalent_representations_and_low_for_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)  # rotation and scale
    assert linear_cka(x, torch.randn(200, 30, generator=g)) < 0.25


def test_a_fine_tuned_backdoor_is_dormant_and_re_activates_on_gtsrb():
    """Issue 26 §3 on the GTSRB BadNets model, repaired by NAD (fine-tuning with attention
    distillation; ASR 0.94 -> 0.47 here). Its backdoor neurons still answer the trigger as the
    backdoored model's do (BEC 0.70, a clean model 0 by construction), and a 0.05 universal
    perturbation added to the trigger brings its ASR back to 0.84 (white-box; black-box 0.61,
    transfer 0.83), beyond what the same perturbation does to a clean model (0.49).
    Measured beside it (BENCHMARKS.md): the repairs that remove BadNets here (Fine-Pruning, RNP,
    FT-SAM) keep a high BEC (0.86-1.0) but re-activate below the clean model's 0.49 (0.22, 0, 0):
    a high BEC alone does not mean a re-activatable backdoor on this model."""
    import _helpers

    from backdoorlab.defenses.dormant import Dormancy

    m = _helpers.repair_gtsrb("nad", "fp32", dormant=Dormancy(n_craft=300, n_eval=500, wb_steps=100, queries=300,
                                                              ft_epochs=5))
    assert m["bec"] > 0.4 and m["bec_cka_repaired"] > m["bec_cka_clean"] + 0.1, m
    # "well above its post-repair value": the perturbation closes at least half of the gap to 1
    # (NAD's post-repair ASR moves with the seed and the CPU, 0.47-0.74, BENCHMARKS.md)
    after = m["asr_after_eval_half"]
    assert m["reactivated_asr_whitebox"] >= after + 0.5 * (1 - after), m
    assert m["reactivated_asr_transfer"] >= after + 0.3 * (1 - after), m
    assert m["reactivated_asr_whitebox"] > m["reactivated_asr_clean_model"] + 0.15, m


def test_an_artifact_without_gradients_still_gets_the_black_box_re_activation():
    """No gradient and no surrogate: the white-box re-activation is left out and says why; BEC,
    the black-box and transfer attacks still run (the row is not lost)."""
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.classifier import Capability
    from backdoorlab.data import load_dataset
    from backdoorlab.defenses.dormant import Dormancy, dormancy
    from backdoorlab.models import build_model

    b = load_dataset("digits")
    attack = ATTACKS.build("badnets", info=b.info)
    torch.manual_seed(0)
    a, r, c = (build_model("small-cnn", 10, 1, b.info.mean, b.info.std).eval() for _ in range(3))
    blind = TorchClassifier(r, device="cpu", capabilities=frozenset({Capability.FEATURES}))
    m = dormancy(backdoored=a, repaired=r, clean=c, deployed=blind, attack=attack, test=b.test,
                 settings=Dormancy(n_craft=32, n_eval=32, wb_steps=2, queries=3, bb_batch=8, ft_epochs=1))
    assert m["reactivated_asr_whitebox"] is None and "grad" in m["reactivation_note"]
    assert 0 <= m["reactivated_asr_blackbox"] <= 1 and 0 <= m["reactivated_asr_transfer"] <= 1
    assert m["bec"] is None or isinstance(m["bec"], float)
