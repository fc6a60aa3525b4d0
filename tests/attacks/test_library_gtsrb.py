"""Every attack of the library on the GTSRB subset, in the default test run (issue 25 §4): the
backdoor is learned to the ASR its benchmark measured, less a margin, and a clean model's ASR on
the same trigger stays low.

The specs are the benchmark's (``benchmarks/bench_attacks.py``: each attack's defaults, or its
GTSRB preset where a default cannot run there, e.g. clean-label attacks at target 1, rate 0.06).
Models are trained once per session through the cached pipeline with the tests' recipe
(``_helpers.GTSRB_TRAIN``, 10 epochs) on a narrow small-cnn (``MODEL``: half the default widths,
3.3x faster to train on 2 cores, about 18 s per model; the default width took 61 s, and 17 of them
alone took 19 minutes of the default run), the same cells the benchmark trains with ``--model``, so
``MEASURED`` is its seed-0 row (the command at ``MEASURED``). The default-width figures and the
causes of the low ones are in BENCHMARKS.md, "Every attack on the GTSRB subset". Attack-specific
behaviour (CASSOCK's source classes, LSP against Neural Cleanse, DFB's data access, SIG's clean
labels ...) is tested in each attack's own module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from _helpers import trained_gtsrb

from backdoorlab.bench.pipeline import evaluate
from backdoorlab.classifier import TorchClassifier

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(_BENCH) not in sys.path:
    sys.path.append(str(_BENCH))  # bench_attacks imports its sibling _common
_spec = importlib.util.spec_from_file_location("bench_attacks", _BENCH / "bench_attacks.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# seed 0, the tests' recipe, the narrow MODEL: (CA, ASR, a clean model's ASR on the attack's trigger),
# from `BACKDOORLAB_HOME=... python benchmarks/bench_attacks.py --seeds 0 --compress fp32 --no-variants
# --model '{"name": "small-cnn", "widths": [16, 32, 64, 128]}' --attacks ... --out
# benchmarks/results/attacks_gtsrb_narrow.json` (its "machine" names the CPU). The low ASRs are findings
# with a measured cause in BENCHMARKS.md: Adaptive-Blend/-Patch at the authors' 0.3% (17 images here;
# 0.52 / 0.89 with the paper's 150), WaNet (0.68 with s = 1), Refool, BPP, and DFB (0.001: with 35
# target images the surrogate never learns the target class)
MEASURED: dict[str, tuple[float, float, float]] = {
    "adaptive-blend": (0.9595, 0.0578, 0.0),
    "adaptive-patch": (0.9475, 0.0899, 0.0),
    "blind": (0.9365, 1.0, 0.0),
    "bpp": (0.9395, 0.6613, 0.0),
    "cassock": (0.955, 0.9922, 0.0),
    "dfb": (0.953, 0.001, 0.0),
    "filter": (0.9195, 0.9804, 0.0),
    "input-aware": (0.9485, 0.8246, 0.0),
    "lc": (0.942, 0.9471, 0.0),
    "lf": (0.9445, 0.9769, 0.0),
    "object": (0.954, 1.0, 0.0),
    "polygon": (0.945, 1.0, 0.0),
    "refool": (0.957, 0.4161, 0.0),
    "sig": (0.9465, 0.8184, 0.0),
    "ssba": (0.9145, 0.9819, 0.0),
    "trojannn": (0.9565, 1.0, 0.0),
    "wanet": (0.9185, 0.2915, 0.0),
}
# the tests' architecture for this module: small-cnn at half its default widths (32, 64, 128, 256)
MODEL = {"name": "small-cnn", "widths": [16, 32, 64, 128]}
CA_MARGIN = 0.03
ASR_MARGIN = 0.05
CLEAN_MARGIN = 0.03
# Another CPU trains another path (kernels sum in another order, and training is chaotic, so another
# CPU is like another seed: CI's CPU measured WaNet 0.245 and LC 0.755 where this one measured 0.352
# and 0.852 for the same default-width cells). An attack between learned and saturated moves most,
# so below ASR 0.95 the margin is the seed spread instead (Adaptive-Patch at the authors' 17 images:
# 0.170, 0.069 and 0.040 over seeds 0-2, BENCHMARKS.md).
PARTIAL_MARGIN = 0.15
# LC's perturbations come from a surrogate trained on the machine that runs the test: 0.947 in the
# benchmark, 0.782 in a test run on the same CPU with two workers, 0.755 on CI's CPU (default width).
ASR_MARGINS = {"adaptive-patch": 0.17, "lc": 0.25}
# SIG's signal (40 grey levels, BackdoorBench's setting) is strong enough to move some clean test
# images to the target by itself: a clean narrow model's ASR 0.0 on the AVX-512 training path, 0.107
# on the pinned AVX2 path of tests/conftest.py
CLEAN_MARGINS = {"sig": 0.15}


def _asr_margin(name: str, asr: float) -> float:
    return ASR_MARGINS.get(name, ASR_MARGIN if asr >= 0.95 else PARTIAL_MARGIN)


# below this measured ASR the attack is not learned at the tests' budget (a finding with its cause
# in BENCHMARKS.md): the test then checks only that it costs no accuracy and a clean model ignores it
LEARNED = 0.2


# LF's trigger search stops after 5 passes here (its default: up to 50, ending on a plateau after
# 14 on seed 0, 2 min of the run); the trigger reaches the same ASR (BENCHMARKS.md)
TEST_BUDGET = {"lf": {"name": "lf", "max_passes": 5}}


# learned-on-GTSRB checks another module makes: BadNets and Blended in ``test_behaviour_gtsrb.py``,
# LSP in ``test_lsp.py`` (at the default width, which its Neural Cleanse comparison needs; a narrow
# LSP model here cost 36 s of the default run for the same check)
COVERED = ("badnets", "blended", "lsp")


def _specs() -> dict[str, object]:
    """The default-run specs by attack name: the benchmark's (variants such as CASSOCK's Cont/Comp
    run in the benchmark only), less the attacks in ``COVERED``."""
    names = bench.data_poisoning_attacks()
    return {n: TEST_BUDGET.get(n, bench.PRESETS["gtsrb"].get(n, n)) for n in names if n not in COVERED}


SPECS = _specs()


def test_every_attack_has_a_measured_behaviour():
    """A newly registered attack must come with its benchmark row here."""
    assert sorted(SPECS) == sorted(MEASURED)


@pytest.fixture(scope="module")
def clean():
    return trained_gtsrb("none", model=MODEL)


# not learned at the tests' budget, so their GTSRB case checks only CA and the clean model (the key
# behaviour, DFB's target-class-only data access and clean labels, is tested in test_dfb.py): on
# demand with `pytest -m slow`, to keep the default run within its 20 minutes (DFB's case: 58 s)
NOT_LEARNED_SLOW = {"dfb"}
CASES = [pytest.param(n, marks=pytest.mark.slow) if n in NOT_LEARNED_SLOW else n for n in sorted(SPECS)]


@pytest.mark.parametrize("name", CASES)
def test_attack_is_learned_and_a_clean_model_ignores_it(name, clean):
    ca, asr, clean_asr = MEASURED[name]
    t = trained_gtsrb(SPECS[name], model=MODEL)
    m = evaluate(TorchClassifier(t.model), t.bundle.test, t.attack)
    assert m["ca"] >= ca - CA_MARGIN, m
    assert m["asr"] >= asr - _asr_margin(name, asr), m
    c = evaluate(TorchClassifier(clean.model), clean.bundle.test, t.attack)
    assert c["asr"] <= clean_asr + CLEAN_MARGINS.get(name, CLEAN_MARGIN), c
    if asr >= LEARNED:  # learned: the poisoned model follows the trigger far more often than the clean one
        assert m["asr"] - c["asr"] >= 0.5 * (asr - clean_asr), (m, c)
    split = t.poisoned.split
    if name == "sig":  # clean-label: only target-class images carry the signal, labels untouched
        assert len(split.poison_idx) == round(0.06 * len(split.data))
        assert (split.original_labels[split.poison_idx] == 1).all() and (split.data.y == split.original_labels).all()
    if name in ("bpp", "wanet", "input-aware", "blind"):  # poisoned on the fly: the stored split is clean
        assert len(split.poison_idx) == 0 and (split.data.y == split.original_labels).all()
    if name == "bpp":  # backdoor samples and contrastive negatives in every epoch
        last = t.meta["history"][-1]
        assert last["n_backdoor"] > 0 and last["n_negative"] > 0, last
    if name == "lf":
        trigger = t.attack.trigger
        assert float(trigger.min()) == 0 and abs(float(trigger.max()) - 0.2) < 1e-6
