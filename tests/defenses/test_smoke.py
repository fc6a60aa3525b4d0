"""Every registered defense runs through the pipeline on a deployed model (house rule 8), at FP32
and at FX int8, on a small digits BadNets model, with its budget shrunk where its defaults would
take minutes (the algorithms are the same; each method's behaviour on GTSRB is tested in its own
module). The row has the fields of its kind, and a remover's row says whether the backdoor is
gone or dormant (BEC and re-activated ASR, :mod:`backdoorlab.defenses.dormant`)."""

from __future__ import annotations

import math

import pytest

from backdoorlab.defenses import DEFENSES, Detector, Filter, Remover, Scanner
from backdoorlab.defenses.evaluate import ASR_BACKDOORED

# budgets for the smoke test only: optimisation steps, epochs, images
FAST: dict[str, dict] = {
    "neural-cleanse": {"steps": 3, "batches_per_step": 2},
    "k-arm": {"steps": 4},
    "mm-bd": {"restarts": 2, "steps": 5},
    "neuron-inspect": {"n_images": 16},
    "ban": {"steps": 2, "mask_epochs": 2, "batches_per_epoch": 2, "batch_size": 32},
    "sfd": {"epochs": 5, "k_arm": {"steps": 4}},
    "strip": {"n": 8, "fit_size": 100},
    "scale-up": {"fit_size": 100, "eval_limit": 50},
    "teco": {"fit_size": 30, "eval_limit": 20},
    "sentinet": {"n_overlay": 8, "fit_size": 40, "eval_limit": 30},
    "beatrix": {"orders": 3},
    "vif": {"epochs": 2, "eval_limit": 30},
    "aif": {"epochs": 2, "eval_limit": 30},
    "efrap": {"iters": 20, "calib_size": 64},
    "fine-pruning": {"epochs": 1},
    "anp": {"iterations": 20},
    "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1},
    "i-bau": {"n_rounds": 1, "K": 2},
    "sau": {"n_rounds": 1},
    "nad": {"teacher_epochs": 1, "epochs": 1},
    "ft": {"epochs": 1},
    "strategic-retraining": {"seeds_per_class": 1, "top_n_neurons": 2, "re_steps": 5, "max_iterations": 1,
                             "epochs": 1},
    "ft-sam": {"epochs": 1},
    "abl-isolation": {"epochs": 1},
    "abl": {"isolation_epochs": 1, "finetune_epochs": 1, "unlearning_epochs": 1},
    "neural-polarizer": {"epochs": 1, "warm_epochs": 1},
    "cetf": {"population": 6, "generations": 2, "fit_size": 30, "eval_limit": 20},
    "cetf-repair": {"scan_size": 40, "epochs": 1, "detector": {"population": 6, "generations": 2, "fit_size": 30}},
    "pivotal-tuning": {"steps": 2},
    "calibrated-trigger-inversion": {"steps_per_class": 2, "pt_steps": 2, "targets": [0, 1]},
}
KIND_FIELDS = {
    "scanner": {"flagged", "anomaly_index"},
    "detector": {"auroc", "far", "frr", "threshold", "tpr_at_1fpr", "tpr_at_5fpr"},
    "filter": {"n_removed", "auroc", "removal_recall", "tpr_at_1fpr", "tpr_at_5fpr"},
    "remover": {"ca_after", "asr_after", "ra_after", "der", "repaired_precision", "repair_wall"},
}
DORMANT_FIELDS = {"bec", "reactivated_asr_whitebox",
                  "reactivated_asr_blackbox", "reactivated_asr_transfer", "reactivated_asr_clean_model"}
# the library's own defenses (other test modules register toy ones in the same registry)
NAMES = [n for n in DEFENSES.names() if n != "none" and DEFENSES.get(n).__module__.startswith("backdoorlab.")]
# where a defense is defined for some deployments only (EFRAP repairs a quantized model's rounding)
PRECISIONS = {"efrap": ("int8-torch", "int4-w")}
CASES = [(n, p) for n in NAMES for p in PRECISIONS.get(n, ("fp32", "int8-torch"))]


# the dormant-backdoor measurement at a smoke budget (every remover's option)
FAST_DORMANCY = {"n_craft": 64, "n_eval": 128, "wb_steps": 10, "queries": 20, "bb_batch": 32, "ft_epochs": 1}


def spec_of(name: str) -> dict:
    """``name`` with the smoke budget (only the parameters the defense takes)."""
    import inspect

    cls = DEFENSES.get(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    spec = {"name": name, **{k: v for k, v in FAST.get(name, {}).items() if k in accepted}}
    if isinstance(cls, type) and issubclass(cls, Remover):
        spec["dormancy"] = FAST_DORMANCY
    return spec


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import os

    from backdoorlab.bench.pipeline import Pipeline

    home = tmp_path_factory.mktemp("smoke-home")
    old = os.environ.get("BACKDOORLAB_HOME")
    os.environ["BACKDOORLAB_HOME"] = str(home)
    try:
        yield Pipeline(device="cpu", progress=False)
    finally:
        if old is None:
            os.environ.pop("BACKDOORLAB_HOME", None)
        else:
            os.environ["BACKDOORLAB_HOME"] = old


def _cell(pipe, name, precision):
    from backdoorlab.bench.study import Study

    study = Study.from_dict({"name": "defense-smoke", "datasets": ["digits"], "models": ["small-cnn"],
                             "attacks": ["badnets"], "compress": [precision], "defenses": [spec_of(name)],
                             "train": {"epochs": 6, "batch_size": 64, "lr": 0.05}})
    study.validate()
    (cell,) = pipe.bind(study.cells())
    return cell


def test_every_budget_names_a_registered_defense():
    import inspect

    for name, params in FAST.items():
        if name in DEFENSES.names():
            accepted = set(inspect.signature(DEFENSES.get(name).__init__).parameters)
            assert set(params) <= accepted, (name, set(params) - accepted)


@pytest.mark.parametrize("name,precision", CASES)
def test_every_defense_runs_on_the_deployed_model(pipe, name, precision):
    m = pipe.run_cell(_cell(pipe, name, precision))["metrics"]
    defense = DEFENSES.build(spec_of(name))
    kind = next(k for k, c in (("scanner", Scanner), ("detector", Detector), ("filter", Filter),
                               ("remover", Remover)) if isinstance(defense, c))
    assert m["defense_kind"] == kind
    missing = {f for f in KIND_FIELDS[kind] if f not in m}
    if kind == "scanner":  # scanners name their score field themselves
        missing -= {"anomaly_index"}
    assert not missing, missing
    assert m["asr"] >= ASR_BACKDOORED  # the digits BadNets model is backdoored
    assert m["detected"] in (True, False, None)
    score = m["defense_score"]
    assert score is None or (isinstance(score, float) and not math.isnan(score))
    if kind == "remover":
        assert m["repaired_precision"] == precision and 0 <= m["asr_after"] <= 1
        assert DORMANT_FIELDS <= set(m), DORMANT_FIELDS - set(m)
        if (name, precision) == ("efrap", "int8-torch"):  # it hands over a rebuilt int8 module: no layers
            assert m["bec"] is None and "share one architecture" in m["bec_note"]
        else:
            assert -1.5 <= m["bec"] <= 1.5 and len(m["bec_layers"]) == 6  # small-cnn's six convs
        for k in ("reactivated_asr_whitebox", "reactivated_asr_blackbox", "reactivated_asr_transfer"):
            assert 0 <= m[k] <= 1
        assert m["reactivation_grad_on"] == ("surrogate" if precision.startswith("int8") else "artifact")
