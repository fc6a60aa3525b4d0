"""The pipeline's defense stage: which classifier ran, error rows, ground truth never leaks."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.bench.pipeline import run_study
from backdoorlab.bench.store import ResultStore
from backdoorlab.bench.study import Study
from backdoorlab.classifier import Capability
from backdoorlab.defenses import DEFENSES, Remover, Scanner, ScanResult, pick

SEEN: dict[str, object] = {}


class _GradScanner(Scanner):
    """Test scanner: flags the label most often predicted for the holdout images plus gradient noise
    (a real computation on whichever classifier ``pick`` chooses; records what it saw)."""

    name = "test-grad-scanner"
    white_box = frozenset({Capability.GRAD})

    def scan(self, ctx):
        clf, where = pick(ctx.clf, Capability.GRAD, who=self.name)
        x = ctx.clean.float()[:16].to(clf.device).requires_grad_(True)
        clf.logits(x).logsumexp(1).sum().backward()
        SEEN.update(where=where, grad_norm=float(x.grad.norm()), clean_n=len(ctx.clean),
                    train_n=len(ctx.train))
        counts = torch.bincount(ctx.clf.predict(ctx.clean.float()), minlength=ctx.num_classes).float()
        idx = (counts - counts.median()) / (counts.std() + 1e-8)
        return ScanResult(flagged=[int(counts.argmax())], score=float(idx.max()), per_label=idx.tolist())


class _NeedsTrainableSurrogate(Remover):
    name = "test-needs-trainable"
    white_box = frozenset({Capability.TRAINABLE})

    def repair(self, ctx):
        import copy

        pick(ctx.clf, Capability.TRAINABLE, who=self.name)
        return ctx.redeploy(copy.deepcopy(ctx.model)), {"repair": "identity"}


for _cls in (_GradScanner, _NeedsTrainableSurrogate):
    if _cls.name not in DEFENSES:
        DEFENSES.register(_cls.name)(_cls)


def _study(compress, defenses):
    return Study.from_dict({"name": "defense-stage", "datasets": ["digits"], "models": ["small-cnn"],
                            "attacks": ["badnets"], "compress": compress, "defenses": defenses,
                            "seeds": [0], "train": {"epochs": 2, "batch_size": 128, "lr": 0.1}})


def test_gradient_part_runs_on_the_surrogate_and_the_row_says_so(tmp_path):
    store = ResultStore(tmp_path / "r.db")
    rows = run_study(_study(["fp32", "int8-torch"], ["test-grad-scanner"]), store, log=lambda s: None)
    by = {r.compression: r for r in rows}
    assert {r.status for r in rows} == {"ok"}, [r.error for r in rows]
    assert by["fp32"].metrics["grad_on"] == "artifact" and "surrogate_agreement" not in by["fp32"].metrics
    m = by["int8-torch"].metrics
    assert m["grad_on"] == "surrogate" and m["ran_on"] == "artifact"
    assert 0.9 <= m["surrogate_agreement"] <= 1.0
    assert m["detected"] is True and isinstance(m["defense_score"], float) and len(m["per_label"]) == 10
    # badnets targets label 0: the row scores the flagged labels against that truth
    assert m["target_flagged"] is (0 in m["flagged"]) and len(m["flagged"]) == 1
    assert SEEN["where"] == "surrogate" and SEEN["grad_norm"] > 0
    # the defense saw the defender's 5% holdout and the poisoned training set, nothing else
    assert SEEN["clean_n"] == m["n_holdout"] and SEEN["train_n"] == m["n_train"]


def test_a_defense_that_cannot_run_is_an_error_row_never_not_detected(tmp_path):
    store = ResultStore(tmp_path / "r.db")
    rows = run_study(_study(["fp32", "int8-torch"], ["test-needs-trainable"]), store, log=lambda s: None)
    by = {r.compression: r for r in rows}
    ok = by["fp32"]
    assert ok.status == "ok" and ok.metrics["asr_after"] == ok.metrics["asr"]  # identity repair, redeployed
    err = by["int8-torch"]
    assert err.status == "error"
    assert "test-needs-trainable needs trainable" in err.error and "int8-torch" in err.error
    assert "detected" not in err.metrics
    stored = {r.run_id: r for r in store.rows()}
    assert stored[err.run_id].status == "error" and "detected" not in stored[err.run_id].metrics


@pytest.mark.parametrize("spec,match", [
    ({"name": "test-grad-scanner", "bogus": 1}, "no parameter 'bogus'"),
    ("neural-cleans", "unknown defense"),
])
def test_bad_defense_specs_fail_before_anything_runs(tmp_path, spec, match):
    from backdoorlab.errors import BackdoorLabError

    with pytest.raises(BackdoorLabError, match=match):
        _study(["fp32"], [spec])
