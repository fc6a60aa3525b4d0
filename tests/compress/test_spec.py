"""Compression specs: names, aliases, chains, and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.compress import COMPRESSIONS, compress, parse_chain, validate_compression
from backdoorlab.data import TensorData
from backdoorlab.errors import BackdoorLabError

ISSUE_NAMES = ["fp32", "fp16", "bf16", "int8-dynamic", "int8-torch", "int8-ort", "fp32-ort", "int4-w", "w4a8",
               "prune-l1", "prune-channel", "prune-l1-30", "prune-l1-50", "prune-l1-70"]


def test_every_precision_of_the_issue_is_registered():
    assert set(ISSUE_NAMES) <= set(COMPRESSIONS.names())


@pytest.mark.parametrize("spec", ["prune-l1-50+int8-torch", ["prune-l1-50", "int8-ort"],
                                  [{"name": "prune-l1", "sparsity": 0.3, "scope": "global"}, "int8-torch"],
                                  {"name": "int8-ort", "calibration": "entropy", "calib_size": 64},
                                  {"name": "int4-w", "group_size": 32}, "prune-channel-30+prune-l1-30+w4a8"])
def test_valid_specs_validate(spec):
    validate_compression(spec)
    COMPRESSIONS.validate(spec)


@pytest.mark.parametrize("spec, message", [
    ({"name": "prune-l1", "sparsity": 1.5}, "sparsity must be a number in [0, 1)"),
    ({"name": "prune-l1", "sparsity": -0.1}, "sparsity must be a number in [0, 1)"),
    ({"name": "prune-channel", "sparsity": 1.0}, "sparsity must be a number in [0, 1)"),
    ({"name": "prune-l1", "sparsity": "half"}, "sparsity must be a number"),
    ({"name": "prune-l1-50", "sparsity": 0.3}, "fixes sparsity=0.5"),
    ({"name": "int8-ort", "calibration": "kl"}, "calibration must be one of minmax, entropy, percentile"),
    ({"name": "int8-ort", "calibraton": "entropy"}, "did you mean 'calibration'"),
    ({"name": "int8-torch", "calib_size": 0}, "calib_size must be a positive integer"),
    ({"name": "int8-ort", "opset": 13}, "opset must be an integer in [17, 23]"),
    ({"name": "int4-w", "group_size": 0}, "group_size must be a positive integer"),
    ("int8-trch", "did you mean 'int8-torch'"),
    ("int8-torch+prune-l1-50", "must be the last step"),
    ("prune-l1-50+", "empty step"),
    ({"name": "prune-l1-50+int8-torch", "calib_size": 8}, "give parameters per step"),
    (42, "must be a name, a mapping or a list"),
])
def test_bad_specs_fail_with_one_line(spec, message):
    with pytest.raises(BackdoorLabError) as err:
        COMPRESSIONS.validate(spec)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_study_validation_catches_bad_values():
    from backdoorlab.bench.study import Study

    raw = {"datasets": ["digits"], "models": ["small-cnn"], "attacks": ["none"],
           "compress": ["fp32", {"name": "prune-l1", "sparsity": 1.5}]}
    with pytest.raises(BackdoorLabError, match=r"sparsity must be a number in \[0, 1\)"):
        Study.from_dict(raw)
    raw["compress"] = ["fp32", "int8-dynamic", "int8-torch", "int8-ort", "int4-w", "prune-l1-50",
                       "prune-l1-50+int8-torch"]
    assert len(Study.from_dict(raw).cells()) == 7


def test_parse_chain():
    assert parse_chain("prune-l1-50 + int8-torch") == ["prune-l1-50", "int8-torch"]
    assert parse_chain(["a+b", {"name": "c"}]) == ["a", "b", {"name": "c"}]


def test_chain_precision_and_order(tiny):
    clf = compress("prune-l1-50+int8-torch", tiny.model, calib=tiny.calib, device="cpu")
    assert clf.precision == "prune-l1-50+int8-torch"
    assert clf.surrogate.precision == "prune-l1-50+int8-torch/surrogate"
    assert [s["precision"] for s in clf.info["steps"]] == ["prune-l1-50", "int8-torch"]
    q = clf.module.inner
    w = [m.weight() for m in q.modules() if type(m).__name__ in ("ConvReLU2d", "Conv2d", "Linear")]
    zeros = sum(int((t.int_repr() == 0).sum()) for t in w) / sum(t.numel() for t in w)
    assert zeros >= 0.5  # the pruned zeros survive BN folding and int8 quantization


def test_empty_or_missing_calibration_is_one_line(tiny):
    empty = TensorData(torch.zeros(0, 16, 16, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    for spec in ("int8-torch", "int8-ort", "w4a8"):
        with pytest.raises(BackdoorLabError, match="calibration set is empty") as err:
            compress(spec, tiny.model, calib=empty, device="cpu")
        assert "\n" not in str(err.value)
    with pytest.raises(BackdoorLabError, match="needs calibration images"):
        compress("int8-torch", tiny.model, calib=None, device="cpu")


class _DataDependent(torch.nn.Module):
    """Control flow on tensor values: neither torch.export nor torch.fx can capture it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = model.head

    def forward_features(self, x):
        f = self.model.forward_features(x)
        return f if f.sum() > 0 else -f

    def forward(self, x):
        return self.head(self.forward_features(x))


@pytest.mark.parametrize("spec, message", [("fp32-ort", "cannot be exported to ONNX"),
                                           ("int8-ort", "cannot be exported to ONNX"),
                                           ("int8-torch", "cannot be traced by torch.fx")])
def test_unexportable_model_is_one_line(tiny, spec, message):
    with pytest.raises(BackdoorLabError, match=message) as err:
        compress(spec, _DataDependent(tiny.model), calib=tiny.calib, device="cpu")
    assert "\n" not in str(err.value)


def test_import_loads_neither_onnxruntime_nor_onnx():
    import subprocess
    import sys

    code = ("import sys, backdoorlab.compress as c; c.COMPRESSIONS.validate('prune-l1-50+int8-ort'); "
            "print(any(m.split('.')[0] in ('onnxruntime', 'onnx', 'onnxscript') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
