"""NeuronInspect (Huang, Alzantot, Srivastava, "NeuronInspect: Detecting Backdoors in Neural Networks
via Output Explanations", arXiv:1911.07399, 2019).

For every output label ``k`` the defender explains the label on clean images with a saliency
heatmap and measures three attributes of those heatmaps. A backdoor's target label is explained by
its trigger, whatever the image, so its heatmaps are *sparse* (a few pixels), *smooth* (one
compact blob) and *persistent* (the same pixels in every image). The three features are combined
into one number per label, and the MAD outlier test (Neural Cleanse's) flags labels whose number is
abnormally small. Only clean images and input gradients are used: no trigger is reconstructed.

There is no official code. The paper gives the three features, their weighted sum and the MAD
test; where its text leaves a choice open, this module takes the following (each a choice, named
so a reader can change it):

* heatmap (the paper: a backpropagation saliency map of the output layer, Simonyan et al. 2014):
  ``E = max_c |d z_k / d x_c|``, the gradient of label ``k``'s logit ``z_k`` (before the softmax)
  with respect to the input, absolute value, maximum over colour channels (Simonyan et al.'s
  definition), then scaled to [0, 1] per image by its minimum and maximum (so the features
  measure the heatmap's shape, not the gradient's scale; as TrojanZoo's ``saliency_map``, the one
  public implementation, ``trojanvision/models/imagemodel.py``). A map with a constant gradient
  is all zeros;
* sparseness: the L1 norm of ``E``, ``sum |E|``;
* smoothness: the L1 norm of the discrete Laplacian of ``E`` (3x3 kernel ``[[0, 1, 0], [1, -4, 1],
  [0, 1, 0]]``, no padding; TrojanZoo's ``neuron_inspect.py``);
* per label, each of these is the median over the images (TrojanZoo takes the median over images);
* persistence: each heatmap is binarised at a threshold, the ``persistence_quantile`` quantile of
  all of the label's heatmap values (0.5: the median, as TrojanZoo), and the persistence feature
  is the mean Hamming distance (pixel-wise XOR count) between the binarised heatmaps of two
  different images, ``sum_pixels 2 c (N - c) / (N (N - 1))`` with ``c`` the number of the ``N``
  images in which the pixel is on. (TrojanZoo chains the XOR over all images, which yields the
  parity of ``c``, a number that depends on whether ``N`` is odd rather than on how persistent the
  maps are; the pairwise XOR keeps the paper's comparison of binarised maps and measures it.)
  Small = the same pixels light up in every image;
* combined feature: ``f_k = lambda_sp sp_k / med(sp) + lambda_sm sm_k / med(sm) + lambda_pe pe_k /
  med(pe)``, each feature divided by its median over the labels so that the three, which live on
  different scales (a sum of pixel values, a sum of second differences, a pixel count), weigh as
  the ``lambda`` say; ``lambda_sp = lambda_sm = lambda_pe = 1``. (TrojanZoo sums the raw features
  with weights 1e-5, 1e-5 and 1, which leaves the persistence count alone in practice.)
* outlier test: :func:`~.neural_cleanse.mad_anomaly` on ``f``: anomaly index ``|f_k - median| /
  (1.4826 MAD)``, labels below the median with index ``> anomaly_threshold = 2`` are flagged
  (Neural Cleanse's rule, which the paper applies).
* images: ``n_images`` clean holdout images (default all of ``ctx.clean``; a random subset from
  ``ctx.generator`` when smaller), of every class, the same images for every label.

Gradients run on ``pick(ctx.clf, GRAD)``: the artifact, or for an int8 artifact its fake-quant
surrogate; its parameters are frozen while it runs (``requires_grad`` restored after).

Measured on the tests' GTSRB small-cnn (BadNets, 3x3 corner patch, target 0; 300 holdout images):
no detection, at 100 images (seeds 0-2) or all 300; the target ranks 8th-25th of 43 by the combined
feature and the largest anomaly index is 0.96-1.47 (the clean model: 1.29-1.62). On clean images
the target's heatmaps show the sign, not the trigger corner: small-cnn ends in a global max-pool,
so its patch detector has no fixed place and is silent without the patch
(``tests/defenses/test_neuron_inspect.py`` has the figures).

Output (:class:`~backdoorlab.defenses.base.ScanResult`): ``flagged`` (smallest combined feature
first); ``score`` = the largest anomaly index below the median (0 if none); ``per_label`` = the
anomaly index of every label; ``images``: ``heatmap`` ``(K, 1, H, W)``, each label's mean
normalised heatmap, in [0, 1]; ``metrics``: ``verdict``, ``target`` (the first flagged label, or
``None``), ``sparseness``, ``smoothness``, ``persistence``, ``combined`` (per label),
``mad_median``, ``mad``, ``threshold`` (the MAD cut), ``n_images``, ``seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...classifier import Capability, Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick
from ..removers.ft import check_int, check_number
from .neural_cleanse import _gradient_model, mad_anomaly

LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
MAX_MAP_ELEMENTS = 2**25  # heatmap values held at once (128 MiB of float32): labels run in chunks below it


@dataclass
class Features:
    """Per label ``(K,)``: ``sparseness``, ``smoothness``, ``persistence``; ``mean_map`` ``(K, H, W)``."""

    sparseness: torch.Tensor
    smoothness: torch.Tensor
    persistence: torch.Tensor
    mean_map: torch.Tensor


def saliency_maps(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: Sequence[int],
                  batch_size: int) -> torch.Tensor:
    """``(len(labels), N, H, W)`` heatmaps on the CPU: ``max_c |d z_k / d x_c|`` per image, scaled to
    [0, 1] by its own minimum and maximum. ``x``: ``(N, C, H, W)`` in [0, 1] on the model's device;
    one forward pass per batch, one backward pass per label."""
    n, _, h, w = x.shape
    out = torch.empty(len(labels), n, h, w)
    for b0 in range(0, n, batch_size):
        xb = x[b0:b0 + batch_size].clone().requires_grad_(True)
        z = logits(xb)
        for i, k in enumerate(labels):
            (g,) = torch.autograd.grad(z[:, k].sum(), xb, retain_graph=i < len(labels) - 1)
            e = g.detach().abs().amax(1)  # (B, H, W)
            lo = e.amin(dim=(1, 2), keepdim=True)
            span = e.amax(dim=(1, 2), keepdim=True) - lo
            out[i, b0:b0 + len(xb)] = torch.where(span > 0, (e - lo) / span.clamp_min(1e-30), 0.0).cpu()
    return out


def heatmap_features(maps: torch.Tensor, quantile: float) -> tuple[float, float, float]:
    """``maps`` ``(N, H, W)`` in [0, 1], one label's: (median L1 norm, median Laplacian L1 norm, mean
    pairwise XOR count of the maps binarised at the ``quantile`` of all their values)."""
    n = maps.shape[0]
    sparse = maps.flatten(1).abs().sum(1)
    kernel = torch.tensor(LAPLACIAN, dtype=maps.dtype).view(1, 1, 3, 3)
    smooth = F.conv2d(maps.unsqueeze(1), kernel).flatten(1).abs().sum(1)
    flat = maps.flatten()
    thr = flat.kthvalue(int(quantile * (flat.numel() - 1)) + 1).values  # lower quantile (torch.median's)
    c = (maps > thr).sum(0).double()  # (H, W): images in which each pixel is on
    pe = float((2 * c * (n - c)).sum() / (n * (n - 1))) if n > 1 else 0.0
    return float(sparse.median()), float(smooth.median()), pe


def explanation_features(clf: Classifier, x: torch.Tensor, num_classes: int, quantile: float, batch_size: int,
                         device: torch.device | None = None) -> Features:
    """The three features of every label's heatmaps over the clean images ``x`` ``(N, C, H, W)``
    on ``clf`` (which must have GRAD); labels run in chunks of at most ``MAX_MAP_ELEMENTS`` values."""
    clf.require(Capability.GRAD, who="neuron-inspect")
    n, _, h, w = x.shape
    per = max(1, MAX_MAP_ELEMENTS // (n * h * w))
    feats: list[tuple[float, float, float]] = []
    means = []
    with _gradient_model(clf, device if device is not None else clf.device) as model:
        xd = x.to(model.device)
        for c0 in range(0, num_classes, per):
            labels = list(range(c0, min(num_classes, c0 + per)))
            maps = saliency_maps(model.logits, xd, labels, batch_size)
            for m in maps:
                feats.append(heatmap_features(m, quantile))
                means.append(m.mean(0))
    sp, sm, pe = (torch.tensor(v, dtype=torch.float64) for v in zip(*feats))
    return Features(sp, sm, pe, torch.stack(means))


def combine(f: Features, lambda_sp: float, lambda_sm: float, lambda_pe: float) -> torch.Tensor:
    """``sum_i lambda_i f_i / median(f_i)`` per label ``(K,)``."""
    out = torch.zeros_like(f.sparseness)
    for lam, v in ((lambda_sp, f.sparseness), (lambda_sm, f.smoothness), (lambda_pe, f.persistence)):
        if lam:
            out += lam * v / v.median().clamp_min(1e-12)
    return out


@DEFENSES.register("neuron-inspect")
class NeuronInspect(Scanner):
    """NeuronInspect (Huang et al., arXiv:1911.07399): sparseness, smoothness and persistence of each
    label's saliency heatmaps on clean images, MAD outlier test on their weighted sum. See the module
    docstring for the definitions and the choices made where the paper leaves them open.

    ``n_images``: clean images explained (``None``: all of ``ctx.clean``); ``batch_size``: images per
    forward pass; ``lambda_sp``, ``lambda_sm``, ``lambda_pe``: weights of the median-normalised
    features (1 each); ``persistence_quantile``: binarisation threshold of the persistence feature,
    as a quantile of the label's heatmap values (0.5); ``anomaly_threshold``: the MAD cut (2).
    """

    name = "neuron-inspect"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, n_images: int | None = None, batch_size: int = 64, lambda_sp: float = 1.0,
                 lambda_sm: float = 1.0, lambda_pe: float = 1.0, persistence_quantile: float = 0.5,
                 anomaly_threshold: float = 2.0):
        who = "neuron-inspect"
        check(n_images is None or (isinstance(n_images, int) and not isinstance(n_images, bool) and n_images >= 2),
              f"{who}: n_images must be None or an integer >= 2, got {n_images!r}")
        check_int(who, "batch_size", batch_size, 1)
        for key, val in (("lambda_sp", lambda_sp), ("lambda_sm", lambda_sm), ("lambda_pe", lambda_pe)):
            check_number(who, key, val, 0)
        check(lambda_sp + lambda_sm + lambda_pe > 0, f"{who}: at least one of lambda_sp, lambda_sm, lambda_pe "
              "must be > 0")
        check_number(who, "persistence_quantile", persistence_quantile, 0, 1, lo_open=True, hi_open=True)
        check_number(who, "anomaly_threshold", anomaly_threshold, 0, lo_open=True)
        self.n_images, self.batch_size = n_images, batch_size
        self.lambdas = (float(lambda_sp), float(lambda_sm), float(lambda_pe))
        self.persistence_quantile = float(persistence_quantile)
        self.anomaly_threshold = float(anomaly_threshold)

    def scan(self, ctx: DefenseContext) -> ScanResult:
        t0 = time.perf_counter()
        check(ctx.clean is not None and len(ctx.clean) >= 2, "neuron-inspect needs at least 2 clean holdout images")
        grad_clf, _ = pick(ctx.clf, Capability.GRAD, who=self.name)
        clean = ctx.clean
        if self.n_images is not None and self.n_images < len(clean):
            clean = clean.subset(torch.randperm(len(clean), generator=ctx.generator)[:self.n_images])
        x = clean.float()
        f = explanation_features(grad_clf, x, ctx.num_classes, self.persistence_quantile, self.batch_size,
                                 ctx.device)
        combined = combine(f, *self.lambdas)
        mad = mad_anomaly(combined, self.anomaly_threshold)
        verdict = bool(mad.flagged)
        metrics: dict[str, Any] = {
            "verdict": verdict, "target": mad.flagged[0] if verdict else None,
            "sparseness": f.sparseness.tolist(), "smoothness": f.smoothness.tolist(),
            "persistence": f.persistence.tolist(), "combined": combined.tolist(), "mad_median": mad.median,
            "mad": mad.mad, "threshold": self.anomaly_threshold, "n_images": len(x),
            "seconds": time.perf_counter() - t0}
        return ScanResult(flagged=mad.flagged, score=mad.score, per_label=mad.index,
                          images={"heatmap": f.mean_map.unsqueeze(1).float()}, metrics=metrics)


__all__ = ["Features", "NeuronInspect", "combine", "explanation_features", "heatmap_features", "saliency_maps"]
