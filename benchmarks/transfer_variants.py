"""Transfer matrix follow-up (issue 29): the qcb model conditioned on int8-torch, deployed with the two
settings that suppressed it (ONNX Runtime's 7-bit weights, NNCF's mean-minmax ranges) switched to
the int8-torch-like choice. Prints CA/ASR/RA. Usage:
BACKDOORLAB_HOME=... python benchmarks/transfer_variants.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _helpers import GTSRB_SUBSET, GTSRB_TRAIN, QCB_INT8, Trained

from backdoorlab.bench.pipeline import Pipeline, evaluate
from backdoorlab.bench.study import Study
from backdoorlab.compress import compress

pipe = Pipeline(device="auto", progress=False)
study = Study.from_dict({"name": "bench-compression-backdoors", "datasets": [GTSRB_SUBSET], "models": ["small-cnn"],
                         "attacks": [QCB_INT8], "seeds": [0], "train": GTSRB_TRAIN})
t = Trained(pipe, study.cells()[0])
for spec in ({"name": "int8-ort", "reduce_range": False}, {"name": "int8-openvino", "activation_range": "minmax"}):
    c = compress(spec, t.model, calib=t.poisoned.holdout)
    print(spec, evaluate(c, t.bundle.test, t.attack), flush=True)
