"""TeCo: its corruptions (checked against the functions the CIFAR-10-C code calls where those are
available here), its first-flip scores, and its behaviour on the GTSRB BadNets model (target 0,
3x3 white corner patch) as deployed at FP32, int8-torch and int8 ONNX Runtime, and on the clean
GTSRB model.

Cost: up to 70 forward passes per input (5 severities x 14 corruptions; an input stops at its first
flip per corruption) plus the corruptions, about 45 ms per input at FP32 and 20 ms at int8 on one
thread. The GTSRB tests fit the threshold on ``FIT`` holdout images and score ``EVAL`` clean plus
``EVAL`` triggered test inputs (the detector's defaults: the whole holdout, 1000 + 1000).
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from _helpers import defense_ctx, deploy_trained

from backdoorlab.classifier import Classifier
from backdoorlab.defenses import DEFENSES, DefenseContext
from backdoorlab.defenses.detectors import TeCo
from backdoorlab.defenses.detectors import teco as T
from backdoorlab.defenses.evaluate import Truth, run_defense
from backdoorlab.errors import BackdoorLabError

EVAL = 100  # clean and triggered test inputs scored per precision
FIT = 100  # holdout images that fit the threshold


@pytest.fixture(scope="module")
def badnets():
    from _helpers import trained_gtsrb

    return trained_gtsrb("badnets")


@pytest.fixture(scope="module")
def clean_model():
    from _helpers import trained_gtsrb

    return trained_gtsrb("none")


_ctx, _deploy = defense_ctx, deploy_trained


def _images(n=8, c=3, size=32, seed=0):
    """Smooth random images in [0, 1] on the 1/255 grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, c, size // 4, size // 4, generator=g), size=(size, size),
                                        mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


# --- the corruptions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(T.CORRUPTIONS))
def test_every_corruption_keeps_the_image_format_and_is_reproducible(name):
    for c, size in ((3, 32), (1, 32), (1, 8)):  # colour, grey (as three equal channels), digits' 8x8
        x = _images(4, c, size)
        for sev in T.SEVERITIES:
            y = T.corrupt(x, name, sev, np.random.default_rng(0))
            assert y.shape == x.shape and y.dtype == torch.float32
            assert bool(((y >= 0) & (y <= 1)).all()) and torch.equal((y * 255).round() / 255, y)
            assert torch.equal(y, T.corrupt(x, name, sev, np.random.default_rng(0)))
    # every corruption changes a colour image at its strongest severity
    x = _images(4)
    assert float((T.corrupt(x, name, 5, np.random.default_rng(1)) - x).abs().mean()) > 0.005


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur",
                                  "zoom_blur", "snow", "fog", "brightness", "contrast", "pixelate"])
def test_corruptions_grow_with_severity(name):
    x = _images(16)
    change = [float((T.corrupt(x, name, s, np.random.default_rng(s)) - x).abs().mean()) for s in T.SEVERITIES]
    assert change[-1] > change[0] and all(b >= a - 0.004 for a, b in zip(change, change[1:])), change


def test_clipped_zoom_is_scipy_zoom_as_the_cifar10c_code_calls_it():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    img = rng.random((2, 32, 32, 3)).astype(np.float32)
    for z in [*np.arange(1, 1.26, 0.01), 1.75, 2.25]:  # zoom_blur's factors and snow's
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        ref = np.stack([ndimage.zoom(im[top:top + ch, top:top + ch], (z, z, 1), order=1) for im in img])
        trim = (ref.shape[1] - 32) // 2
        np.testing.assert_allclose(T._clipped_zoom(img, float(z)), ref[:, trim:trim + 32, trim:trim + 32], atol=1e-5)


def test_brightness_is_the_hsv_value_shift():
    rng = np.random.default_rng(0)
    x = (rng.random((2, 6, 6, 3)) * 255).astype(np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 7  # black, and a grey
    for sev in T.SEVERITIES:
        c = T._BRIGHTNESS[sev - 1]
        ref = np.empty(x.shape)
        for idx in np.ndindex(x.shape[:3]):
            h, s, v = colorsys.rgb_to_hsv(*(x[idx] / 255.0))
            ref[idx] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
        ref = (np.clip(ref, 0, 1) * 255).astype(np.uint8)
        assert np.abs(T.brightness(x, sev, rng).astype(int) - ref).max() <= 1


def test_defocus_kernels_are_normalised_antialiased_disks():
    for radius, alias in T._DEFOCUS:
        k = T._disk(radius, alias)
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert k.sum() == pytest.approx(1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1])
        assert k[k.shape[0] // 2, k.shape[0] // 2] == k.max()


# --- the score ----------------------------------------------------------------------------------------

class _Constant(Classifier):
    """Predicts class 0 whatever it sees."""

    precision = "constant"

    def logits(self, x):
        return torch.zeros(len(x), 3)


def test_a_prediction_that_never_flips_scores_zero(badnets):
    det = TeCo(fit_size=4)
    det.fit(DefenseContext(clf=_Constant(), clean=badnets.poisoned.holdout, num_classes=3,
                           generator=torch.Generator().manual_seed(0)))
    x = _images(3)
    assert torch.equal(det.first_flips(_Constant(), x), torch.full((3, 14), T.NEVER))
    assert torch.equal(det.score(_Constant(), x), torch.zeros(3)) and det.threshold == 0.0


def test_teco_score_is_the_population_deviation_of_the_first_flips(badnets):
    clf = _deploy(badnets, "int8-torch")
    x = torch.cat([badnets.bundle.test.float()[:6], badnets.attack.apply(badnets.bundle.test.float()[6:12])])
    a, b = TeCo(fit_size=4), TeCo(fit_size=4)
    a.fit(_ctx(badnets, clf))
    b.fit(_ctx(badnets, clf))
    assert a.threshold == b.threshold
    first = b.first_flips(clf, x)
    assert first.shape == (12, 14) and bool(((first >= 1) & (first <= T.NEVER)).all())
    s = a.score(clf, x)  # the same seed: the same corruptions
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.from_numpy(first.numpy().std(axis=1)).float(), atol=1e-6)  # np.std
    # (which corruption flips a triggered input first moves with the model's training path: zoom blur
    # flipped these six at once on one CPU, not on another; the separation is tested on 100 + 100 below)


def test_teco_must_be_fitted_first(badnets):
    clf = _deploy(badnets, "fp32")
    with pytest.raises(BackdoorLabError, match="fit"):
        TeCo().score(clf, badnets.bundle.test.float()[:2])


# --- behaviour on GTSRB -------------------------------------------------------------------------------

# measured on these 100 + 100 inputs with the threshold fitted on 100 holdout images, on the pinned
# AVX2 training path of tests/conftest.py (the AVX-512 path gave 0.853, 0.873, 0.877; another CI
# machine 0.812 and 0.843: the tolerance is that spread, not the evaluation's)
MEASURED = {"fp32": 0.935, "int8-torch": 0.920, "int8-ort": 0.924}
AUROC_TOL = 0.06


@pytest.mark.parametrize("precision", ["fp32", "int8-torch", "int8-ort"])
def test_teco_scores_triggered_inputs_higher_on_gtsrb_badnets(badnets, precision):
    clf = _deploy(badnets, precision)
    truth = Truth(badnets.attack, badnets.poisoned.split.is_poisoned, badnets.bundle.test)
    m, _ = run_defense(DEFENSES.build({"name": "teco", "fit_size": FIT}), _ctx(badnets, clf), truth, eval_limit=EVAL)
    assert m["ran_on"] == "artifact" and m["defense_kind"] == "detector" and "grad_on" not in m
    assert m["n_eval_clean"] == EVAL and m["n_eval_triggered"] == EVAL
    assert m["auroc"] == pytest.approx(MEASURED[precision], abs=AUROC_TOL)
    assert m["auroc"] >= 0.78
    # the threshold targets 1% of clean inputs (measured 0.01-0.04 on the test images); clean inputs
    # that flip early under a few corruptions reach the triggered inputs' deviations, so at that
    # threshold only 8-42% of the triggered inputs are flagged (FAR 0.58-0.92 on the pinned path)
    assert m["frr"] <= 0.1, m  # measured 0.00-0.07
    assert 1.5 <= m["threshold"] <= 2.5 and m["far"] >= 0.5 and m["detected"] is False, m


def test_teco_clean_model_false_positive_rate_stays_near_the_chosen_frr(clean_model):
    """The clean model at int8-torch, threshold at frr 0.05 on 150 holdout images, 200 clean test
    inputs: measured FPR 0.07, 0.125 on another CI machine (GTSRB's holdout comes from the training
    set's tracks of the same signs, which the model classifies more robustly than test images, so
    test FPRs run a little above the holdout's)."""
    clf = _deploy(clean_model, "int8-torch")
    det = TeCo(frr=0.05, fit_size=150)
    det.fit(_ctx(clean_model, clf))
    x = clean_model.bundle.test.float()[torch.randperm(len(clean_model.bundle.test),
                                                       generator=torch.Generator().manual_seed(0))[:200]]
    fpr = float((det.score(clf, x) > det.threshold).float().mean())
    assert fpr <= 0.16


@pytest.mark.parametrize("spec", [
    {"name": "teco", "corruptions": ["fog"]}, {"name": "teco", "corruptions": ["fog", "fog"]},
    {"name": "teco", "corruptions": ["fog", "frost"]}, {"name": "teco", "corruptions": ["fog", "blur"]},
    {"name": "teco", "corruptions": "fog"}, {"name": "teco", "corruptions": ["fog", 3]},
    {"name": "teco", "frr": 0}, {"name": "teco", "frr": 1}, {"name": "teco", "frr": "0.01"},
    {"name": "teco", "fit_size": 1}, {"name": "teco", "batch_size": 0}, {"name": "teco", "batch_size": 2.5},
    {"name": "teco", "eval_limit": 9}, {"name": "teco", "severity": 3},
])
def test_bad_teco_parameters_are_one_line_errors(spec):
    with pytest.raises(BackdoorLabError) as exc:
        DEFENSES.validate(spec)
    msg = str(exc.value)
    assert "\n" not in msg
    field = next(k for k in spec if k != "name")
    assert field in msg
    if "frost" in str(spec.get("corruptions")):
        assert "frost photographs" in msg
