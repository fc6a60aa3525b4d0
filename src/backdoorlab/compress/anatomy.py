"""Where does a quantization-conditioned backdoor live? An ablation of the deployed numerics.

A backdoor that wakes up on int8 deployment (Tian et al., "Stealthy Backdoors as Compression
Artifacts", IEEE TIFS 2022; Hong et al., "Qu-ANTI-zation", NeurIPS 2021) can ride on any of the
three things quantization changes:

* the **weights' rounding** (the mechanism EFRAP, Li et al. CVPR 2024, and PQBackdoor's
  half-step box, Ma et al. IEEE TDSC, are built around);
* the **activations' rounding** to the calibrated grid;
* the **activations' clipping** at the ends of the calibrated range (an input that drives a
  neuron far beyond anything the calibration images did is cut back to the range's end).

:func:`quantization_anatomy` replays an int8 artifact through its fake-quant surrogate (the
artifact's own int8 weights, scales and zero-points; :mod:`backdoorlab.compress.surrogate`) and
switches each activation quantizer between four behaviours:

``deployed``  round and clip (as the artifact does);
``clip``      clip to the quantizer's range, no rounding;
``round``     round to the grid, no clipping (the grid extended without bounds);
``none``      pass through (float activations; the weights stay int8).

A range whose bottom is exactly 0 keeps that floor in every mode: after a ReLU it changes nothing,
and where ONNX Runtime has folded a Relu into the quantizer it *is* the ReLU.

It reports CA and ASR with every quantizer in each mode (``none`` everywhere is "int8 weights,
float activations": what the weights' rounding alone does), and for each quantizer: the ASR when
it alone clips (all others pass through: is its clipping *sufficient*?), the ASR when it alone
does not clip (the others as deployed: is its clipping *necessary*?), and how far the clean and
the triggered activations reach beyond its range (largest value over the range's top, share of
values clipped). ``carriers`` lists the quantizers whose clipping alone recovers at least half of
the ASR that activation quantization adds over the int8 weights alone (:func:`carriers`), and is
empty when it adds less than :data:`MIN_GAIN` (no activation-borne backdoor to carry). That
tells a defender which repair can work: a weight-rounding repair (EFRAP) cannot touch a
backdoor carried by activation clipping.

Shapes: ``test`` holds ``(N, C, H, W)`` images (uint8 NHWC or float NCHW in [0, 1]); the
attack's ``apply`` adds its trigger. Runs on the surrogate's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..classifier import Classifier
from ..errors import check
from ..metrics import asr, clean_acc
from .fakequant import FakeQuant

MODES = ("deployed", "clip", "round", "none")
# the least ASR activation quantization must add over the int8 weights alone to have carriers
MIN_GAIN = 0.1


def _grid(fq: FakeQuant, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fq``'s scale and zero-point, shaped to broadcast against ``x``."""
    shape = [1] * x.ndim
    if fq.axis is not None:
        shape[fq.axis] = -1
    return (fq.scale.to(x.device, torch.float32).reshape(shape),
            fq.zero_point.to(x.device).float().reshape(shape))


def _apply_mode(fq: FakeQuant, x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "deployed":
        return fq(x)
    s, z = _grid(fq, x)
    bottom, top = (fq.qmin - z) * s, (fq.qmax - z) * s
    if mode == "clip":
        return torch.minimum(torch.maximum(x, bottom), top)
    # a range that starts at exactly 0 keeps its floor: there it is the ReLU a fused quantizer stands
    # for (ONNX Runtime folds Conv -> Relu into the Relu-free QDQ graph)
    x = torch.where(bottom == 0, x.clamp_min(0), x)
    return x if mode == "none" else (torch.round(x / s + z) - z) * s  # round: the grid without its ends


def activation_quantizers(module: nn.Module) -> list[tuple[str, FakeQuant]]:
    """The activation quantizers of a surrogate in graph order (both surrogates register them as
    they walk the artifact's graph), each named by the artifact node it replays (``source``; the
    module name if the surrogate did not record one)."""
    return [(getattr(m, "source", name) or name, m) for name, m in module.named_modules()
            if isinstance(m, FakeQuant)]


@contextmanager
def _modes(quantizers: list[FakeQuant], modes: list[str]) -> Iterator[None]:
    """Run each quantizer in its mode inside the block (a forward hook replaces its output)."""
    hooks = [fq.register_forward_hook(lambda m, a, out, mode=mode: _apply_mode(m, a[0], mode))
             for fq, mode in zip(quantizers, modes) if mode != "deployed"]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def carriers(clip_alone_asr: list[float], deployed_asr: float, weights_asr: float) -> list[int]:
    """Indices of the quantizers whose clipping alone recovers at least half of the ASR that
    activation quantization adds to the int8 weights (``deployed_asr - weights_asr``); none when
    it adds less than :data:`MIN_GAIN`, so that a model without an activation-borne backdoor
    (ASR at its FP32 level everywhere) names no carrier for a few images' noise."""
    gain = deployed_asr - weights_asr
    if gain < MIN_GAIN:
        return []
    return [i for i, a in enumerate(clip_alone_asr) if a - weights_asr >= 0.5 * gain]


def quantization_anatomy(clf: Classifier, test: Any, attack: Any, batch_size: int = 512,
                         limit: int | None = None) -> dict[str, Any]:
    """Ablate the activation quantization of int8 artifact ``clf`` (``int8-torch`` or
    ``int8-ort``, through its surrogate) on ``test`` (a ``TensorData``) and ``attack``'s trigger;
    ``limit``: use the first ``limit`` test images. Returns ``{"modes": {mode: {"ca", "asr"}},
    "layers": [...], "carriers": [...], "carriers_unclipped_asr", "weights_asr", "deployed_asr",
    "agreement"}`` as described in the module docstring (``carriers_unclipped_asr``: the ASR with
    every carrier left unclipped and the rest as deployed)."""
    check(limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0),
          f"quantization anatomy: limit must be a positive integer, got {limit!r}")
    sur = getattr(clf, "surrogate", None)
    check(sur is not None, f"quantization anatomy needs an int8 artifact with a fake-quant surrogate; "
                           f"the {clf.precision} classifier has none")
    module = sur.module
    named = activation_quantizers(module)
    check(len(named) > 0, f"the {clf.precision} surrogate has no activation quantizer to ablate")
    names, fqs = [n for n, _ in named], [fq for _, fq in named]
    x = test.float()
    y = test.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    counted = attack.counted(y)
    xt = attack.apply(x[counted])
    target = attack.target_labels(y[counted])

    k = len(fqs)
    # how far clean and triggered activations reach past each quantizer's range: recorded by hooks
    # during the deployed-mode pass, which also gives that mode's CA and ASR
    reach: dict[int, dict[str, list[float]]] = {i: {"clean": [0.0, 0.0, 0.0], "trig": [0.0, 0.0, 0.0]}
                                                for i in range(k)}
    which = {"key": "clean"}

    def stat(i: int):
        def hook(m: FakeQuant, a, o):
            v = a[0].detach()
            sc, z = _grid(m, v)
            top, bottom = (m.qmax - z) * sc, (m.qmin - z) * sc
            ratio = float((v / top.clamp_min(1e-12)).max())
            r = reach[i][which["key"]]
            r[0] = max(r[0], ratio)
            # clipped: beyond the half step that rounds onto the end anyway (a 0 floor is a ReLU)
            r[1] += float(((v > top + sc / 2) | ((v < bottom - sc / 2) & (bottom != 0))).sum())
            r[2] += v.numel()
        return hook

    hooks = [fq.register_forward_hook(stat(i)) for i, fq in enumerate(fqs)]
    try:
        pred_clean = sur.predict(x, batch_size)
        which["key"] = "trig"
        pred_trig = sur.predict(xt, batch_size)
    finally:
        for h in hooks:
            h.remove()

    def run(modes: list[str], clean: bool = True) -> dict[str, float]:
        with _modes(fqs, modes):
            res = {"asr": asr(sur.predict(xt, batch_size), target)}
            if clean:
                res["ca"] = clean_acc(sur.predict(x, batch_size), y)
        return res

    modes = {"deployed": {"asr": asr(pred_trig, target), "ca": clean_acc(pred_clean, y)}}
    modes.update({m: run([m] * k) for m in MODES if m != "deployed"})
    out: dict[str, Any] = {"modes": modes, "quantizers": names}
    deployed = modes["deployed"]["asr"]
    out["deployed_asr"], out["weights_asr"] = deployed, modes["none"]["asr"]
    # the surrogate against the artifact itself, on the triggered images
    out["agreement"] = float((pred_trig == clf.predict(xt, batch_size)).float().mean()) if len(xt) else float("nan")

    layers = []
    for i, name in enumerate(names):
        alone = ["none"] * k
        alone[i] = "clip"
        spared = ["deployed"] * k
        spared[i] = "round"
        rc, rt = reach[i]["clean"], reach[i]["trig"]
        layers.append({"name": name, "clip_alone_asr": run(alone, clean=False)["asr"],
                       "unclipped_asr": run(spared, clean=False)["asr"],
                       "reach_clean": rc[0], "reach_triggered": rt[0],
                       "clipped_clean": rc[1] / max(rc[2], 1), "clipped_triggered": rt[1] / max(rt[2], 1)})
    out["layers"] = layers
    carried = carriers([ly["clip_alone_asr"] for ly in layers], deployed, out["weights_asr"])
    out["carriers"] = [names[i] for i in carried]
    # the check: every carrier unclipped, everything else as deployed
    spared = ["round" if i in carried else "deployed" for i in range(k)]
    out["carriers_unclipped_asr"] = run(spared, clean=False)["asr"] if carried else deployed
    return out


def anatomy_table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`quantization_anatomy`'s per-quantizer results."""
    m = result["modes"]
    lines = ["| activations | CA | ASR |", "|---|---|---|"]
    lines += [f"| {mode} | {m[mode]['ca']:.3f} | {m[mode]['asr']:.3f} |" for mode in MODES]
    named = ", ".join(result["carriers"]) or "none"
    lines += ["", f"Carried by the clipping of: {named} (ASR with those unclipped: "
                  f"{result['carriers_unclipped_asr']:.3f}; int8 weights with float activations: "
                  f"{result['weights_asr']:.3f})"]
    lines += ["", "| quantizer | ASR, it alone clips | ASR, all but it clip | max / range top, clean | "
                  "triggered | clipped share, clean | triggered |", "|---|---|---|---|---|---|---|"]
    for ly in result["layers"]:
        lines.append(f"| {ly['name']} | {ly['clip_alone_asr']:.3f} | {ly['unclipped_asr']:.3f} | "
                     f"{ly['reach_clean']:.2f} | {ly['reach_triggered']:.2f} | {ly['clipped_clean']:.5f} | "
                     f"{ly['clipped_triggered']:.5f} |")
    return "\n".join(lines)
