"""The metrics every row records (CA / ASR / RA) and flip test-time augmentation."""

import pytest
import torch
from torch import nn

from backdoorlab.attacks import ATTACKS
from backdoorlab.bench.pipeline import evaluate
from backdoorlab.classifier import TorchClassifier
from backdoorlab.data.datasets import DatasetInfo
from backdoorlab.data.tensordata import TensorData
from backdoorlab.errors import BackdoorLabError
from backdoorlab.metrics import asr, clean_acc, ra

INFO = DatasetInfo("toy", 4, 3, 8, (0.5,) * 3, (0.25,) * 3, True, 1)


def _setup():
    g = torch.Generator().manual_seed(0)
    test = TensorData(torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8, generator=g),
                      torch.randint(0, 4, (64,), generator=g))
    torch.manual_seed(0)  # a linear model on raw pixels: not mirror-invariant, so the flip matters
    clf = TorchClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), device="cpu")
    attack = ATTACKS.build({"name": "badnets", "patch_size": 2}, info=INFO)
    return clf, test, attack


def _expected(clf, test, attack, flip: bool) -> dict:
    def top1(x):
        with torch.no_grad():
            logits = clf.logits(x)
            return (logits + clf.logits(x.flip(3)) if flip else logits).argmax(1)

    x = test.float()
    counted = attack.counted(test.y)
    yc = test.y[counted]
    p, pt = top1(x), top1(attack.apply(x[counted]))
    return {"ca": clean_acc(p, test.y), "asr": asr(pt, attack.target_labels(yc)), "ra": ra(pt, yc)}


def test_flip_tta_sums_image_and_mirror_logits_and_keeps_the_plain_scores():
    clf, test, attack = _setup()
    plain = evaluate(clf, test, attack, batch_size=16)
    assert plain == pytest.approx(_expected(clf, test, attack, flip=False)) and "tta" not in plain
    aug = evaluate(clf, test, attack, batch_size=16, tta="flip")
    want = _expected(clf, test, attack, flip=True)
    assert {k: aug[k] for k in ("ca", "asr", "ra")} == pytest.approx(want)
    assert {k: aug[f"{k}_plain"] for k in ("ca", "asr", "ra")} == pytest.approx(plain)
    assert aug["tta"] == "flip"
    # the two protocols give different predictions on this non-symmetric model
    assert aug["ca"] != plain["ca"] or aug["asr"] != plain["asr"]


def test_unknown_tta_is_one_line():
    clf, test, attack = _setup()
    with pytest.raises(BackdoorLabError, match="tta must be one of none, flip, got 'mirror'"):
        evaluate(clf, test, attack, tta="mirror")


def test_result_table_marks_tta_rows():
    from backdoorlab.bench.store import Row
    from backdoorlab.report.table import results_table

    m = {"ca": 0.86, "asr": 0.94, "ra": 0.05}
    rows = [Row("a", "s", "cifar10", "small-cnn", "badnets", "fp32", "none", 0, {}, "ok", metrics=m),
            Row("b", "s", "cifar10", "small-cnn", "badnets", "fp32", "none", 1, {}, "ok",
                metrics={**m, "tta": "flip", "ca_plain": 0.85})]
    lines = results_table(rows).splitlines()
    assert "ok (tta flip)" in lines[3] and "(tta" not in lines[2]
