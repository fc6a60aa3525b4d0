"""SentiNet (Chou, Tramèr, Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against Deep
Learning Systems", IEEE Security and Privacy Workshops (DLS) 2020, arXiv:1812.00292; no official
code; the implementations in the Beatrix repository, github.com/wanlunsec/Beatrix
``defenses/SentiNet/SentiNet.py``, and in backdoor-toolbox, github.com/vtu81/backdoor-toolbox
``other_defenses_tool_box/sentinet.py``, were read for the details the paper leaves open).

A localized universal trigger is a small region that makes the model predict the target whatever
image it sits on. SentiNet finds the region of an input ``x`` that the prediction rests on and tests
whether it hijacks other images:

1. **Class proposal** (the paper's Algorithm 1): the predicted class ``y`` of ``x`` and the ``top_k``
   most likely other classes ``c``.
2. **Mask generation** (Algorithm 2): Grad-CAM of ``y`` on the last convolutional feature map
   (the map the model's global pooling reduces), upsampled bilinearly to the input size; the
   salient region is the top ``mask_fraction`` (15%) of its pixels. For each proposed class ``c``
   the mask of ``c`` is cut out of the mask of ``y`` (the difference mask, which keeps the region
   that speaks for ``y`` alone); the masks are the ``top_k`` difference masks and the mask of ``y``.
3. **Testing** (Algorithm 3): each mask's region of ``x`` is pasted, in place, onto each of
   ``n_overlay`` clean holdout images: ``fooled`` is the share of these images predicted as ``y``.
   The same regions filled with an inert pattern (uniform noise in [0, 1]) are pasted on the same
   images: ``avgconf`` is their mean top-1 softmax confidence. A trigger fools many images while
   noise of its size and place leaves them confidently classified; a large benign salient region
   fools some images only because it covers them, and then noise covering them lowers the
   confidence too.
4. **Decision boundary** (Algorithm 4): each clean holdout input is a point ``(avgconf, fooled)``.
   The ``avgconf`` axis is cut into bins of width ``bin_width`` (0.02); the point with the highest
   ``fooled`` of each bin is an outer point; a quadratic fitted to the outer points by least
   squares is the boundary (a line or a constant when fewer than three bins are occupied).

``score(clf, x)`` is the signed Euclidean distance of ``x``'s point to the boundary curve: positive
above it (more images fooled than benign inputs of that inert confidence fool), negative below.
Higher = more likely triggered.

Which classifier runs what: Grad-CAM needs gradients and a feature map, so it runs on
``pick(clf, GRAD)`` (the artifact, or an int8 artifact's fake-quant surrogate); the predicted and
proposed classes, the pasted images' predictions and the confidences, the black-box part, run on
the deployed artifact itself. The map is found without layer names
(:func:`~backdoorlab.defenses.feature_maps.pooled_map`).

Deviations, and why:

* class proposal: the paper classifies the regions a selective search proposes and takes the top
  classes among them; here the classes are the ``top_k`` of the artifact's own softmax on ``x`` (no
  segmentation library; on 32x32 images selective search proposes a handful of regions). The
  default ``top_k=1`` keeps the cost at four forward passes per input and overlay image;
* threshold: the paper flags points above the curve farther than the mean distance of the clean
  points (the two implementations disagree on which clean points enter that mean). Here, as for
  every backdoorlab detector, the threshold is the empirical ``1 - frr`` quantile (``frr=0.01``) of
  the scores of the clean holdout inputs the curve was fitted on (an in-sample quantile: the test FRR
  runs somewhat above ``frr``);
* the overlay images are ``n_overlay`` holdout images drawn once at :meth:`fit` (the paper's fixed
  benign set; 100 by default, as in backdoor-toolbox), disjoint from the holdout inputs that fit the
  curve (at most half the holdout when it is small);
* the inert pattern is uniform noise in [0, 1], fresh for every pasted image (as in both
  implementations; the paper describes Gaussian noise), so the images stay in the classifier's input
  range and an int8 artifact's calibrated range.

Cost per scored input: one Grad-CAM forward and ``top_k + 1`` backward passes on the gradient
classifier, and ``2 (top_k + 1) n_overlay`` forward passes on the artifact.

Measured on the tests' GTSRB small-cnn BadNets model (3x3 white corner patch, target 0), with the
tests' budget (10 overlay images, 150 holdout inputs fitting the boundary, 150 clean and 150
triggered test inputs; ``tests/defenses/test_sentinet_beatrix.py``): AUROC 0.954 at FP32 (``top_k=0``)
and 0.959 / 0.956 at int8-torch (``top_k`` 0 / 1; Grad-CAM on the surrogate, which agrees with the
artifact on all 300 holdout images); at the 1% holdout quantile FAR 0.07-0.08, test FRR 0.007-0.027.
The patch's region fools 92% of the clean images it is pasted on (clean inputs' salient regions:
23%), while noise in its place leaves them confident (mean top-1 confidence 0.87 against 0.68).
With ``top_k=1`` at FP32 (10 overlays): AUROC 0.958. On the clean GTSRB model at int8-torch (the
boundary fitted on 290 holdout inputs), 300 clean test inputs: FPR 0.013 at ``frr=0.01``, 0.033 at
``frr=0.05``. Cost on one loaded CPU thread: about 0.1 s per input at FP32 with ``top_k=0`` and 10
overlays, a tenth of that at int8 (the paper's 100 overlays cost ten times more).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...classifier import Capability, Classifier
from ...errors import BackdoorLabError, check
from ..base import DEFENSES, DefenseContext, Detector, pick
from ..feature_maps import pooled_map
from ..removers.ft import check_int, check_number


def grad_cam(clf: Classifier, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heatmaps ``(N, J, H, W)`` float32 CPU, at the input's size, of ``x`` (``(N, C, H, W)``
    in [0, 1]) for ``classes`` (``(N, J)`` long): ``ReLU(sum_k alpha_k A_k)`` with ``A`` the map the
    model's global pooling reduces and ``alpha_k`` the spatial mean of ``d logit / d A_k``, upsampled
    bilinearly. ``clf`` must have gradients."""
    x = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits, fmap = pooled_map(clf, x)
        if fmap is None:
            raise BackdoorLabError(f"sentinet: Grad-CAM needs the {clf.precision} classifier's last convolutional "
                                   "feature map, and its forward pass pools none")
        cls = classes.to(logits.device)
        cams = []
        for j in range(cls.shape[1]):
            score = logits.gather(1, cls[:, j:j + 1]).sum()
            (g,) = torch.autograd.grad(score, fmap, retain_graph=j + 1 < cls.shape[1])
            alpha = g.mean(dim=(2, 3), keepdim=True)
            cams.append(F.relu((alpha * fmap).sum(1)).detach())
    cam = torch.stack(cams, 1).float()  # (N, J, h, w)
    return F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False).cpu()


def top_masks(cam: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(N, J, H, W)`` heatmaps -> bool masks of the pixels above each map's ``k``-th largest value,
    ``k = max(1, int(fraction * H * W))`` (strictly above, as both implementations: a flat map gives
    an empty mask)."""
    flat = cam.flatten(2)
    k = max(1, int(fraction * flat.shape[-1]))
    kth = flat.topk(k, dim=-1).values[..., -1:]
    return (flat > kth).view_as(cam)


def fit_boundary(conf: np.ndarray, fooled: np.ndarray, bin_width: float) -> np.ndarray:
    """The paper's Algorithm 4: coefficients (highest degree first) of the least-squares quadratic
    through the highest-``fooled`` point of each ``bin_width`` bin of ``conf``; of lower degree when
    fewer than three bins are occupied."""
    lo = float(conf.min())
    bins = np.floor((conf - lo) / bin_width).astype(np.int64)
    xs, ys = [], []
    for b in np.unique(bins):
        idx = np.flatnonzero(bins == b)
        top = idx[np.argmax(fooled[idx])]
        xs.append(conf[top])
        ys.append(fooled[top])
    deg = min(2, len(xs) - 1)
    coef = np.polyfit(np.asarray(xs), np.asarray(ys), deg) if deg > 0 else np.asarray([ys[0]])
    return np.concatenate([np.zeros(3 - len(coef)), coef])


def signed_distance(coef: np.ndarray, conf: np.ndarray, fooled: np.ndarray) -> np.ndarray:
    """Euclidean distance of each point ``(conf, fooled)`` to the curve ``polyval(coef, t)``, positive
    above the curve and negative below; the nearest curve point is searched on ``t`` in
    ``[-0.5, 1.5]`` at steps of 1e-3 (the confidences lie in [0, 1])."""
    t = np.linspace(-0.5, 1.5, 2001)
    ft = np.polyval(coef, t)
    out = np.empty(len(conf))
    for s in range(0, len(conf), 256):
        c, f = conf[s:s + 256, None], fooled[s:s + 256, None]
        out[s:s + 256] = np.sqrt(((t[None] - c) ** 2 + (ft[None] - f) ** 2).min(1))
    above = fooled > np.polyval(coef, conf)
    return np.where(above, out, -out)


@DEFENSES.register("sentinet")
class SentiNet(Detector):
    """SentiNet input detector.

    ``n_overlay``: clean holdout images each salient region is pasted onto (backdoor-toolbox: 100).
    ``top_k``: other classes proposed per input, each giving a difference mask (0: the predicted
    class's mask only). ``mask_fraction``: share of the pixels the salient region keeps (both
    implementations: the top 15% of the Grad-CAM heatmap). ``bin_width``: width of the ``avgconf``
    bins whose top points fit the boundary (backdoor-toolbox: 0.02). ``frr``: share of clean inputs
    the threshold rejects. ``fit_size``: at most this many holdout inputs fit the boundary and the
    threshold. ``batch_size``: images per forward pass. ``eval_limit``: when backdoorlab scores the
    detector, at most this many clean and this many triggered test inputs (an evaluation budget,
    not part of the method).

    After :meth:`fit`: ``coef`` (the boundary quadratic, highest degree first), ``threshold``, and
    ``grad_on`` (``"artifact"`` or ``"surrogate"``: where Grad-CAM ran). :meth:`points` gives the
    ``(avgconf, fooled)`` points of inputs.
    """

    name = "sentinet"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, n_overlay: int = 100, top_k: int = 1, mask_fraction: float = 0.15,
                 bin_width: float = 0.02, frr: float = 0.01, fit_size: int = 2000, batch_size: int = 1024,
                 eval_limit: int = 1000):
        who = "sentinet"
        check_int(who, "n_overlay", n_overlay, 1)
        check_int(who, "top_k", top_k, 0)
        check_number(who, "mask_fraction", mask_fraction, 0, 1, lo_open=True)
        check_number(who, "bin_width", bin_width, 0, 1, lo_open=True)
        check_number(who, "frr", frr, 0, 1, lo_open=True)
        check_int(who, "fit_size", fit_size, 3)
        check_int(who, "batch_size", batch_size, 1)
        check_int(who, "eval_limit", eval_limit, 10)
        self.n_overlay = n_overlay
        self.top_k = top_k
        self.mask_fraction = float(mask_fraction)
        self.bin_width = float(bin_width)
        self.frr = float(frr)
        self.fit_size = fit_size
        self.batch_size = batch_size
        self.eval_limit = eval_limit
        self.threshold = float("nan")
        self.coef: np.ndarray | None = None
        self.grad_on = ""
        self._overlays: torch.Tensor | None = None
        self._g: torch.Generator | None = None

    # --- the method ---------------------------------------------------------------------

    def fit(self, ctx: DefenseContext) -> None:
        """Draw the overlay images, compute the points of up to ``fit_size`` other holdout inputs,
        fit the boundary to them and set the threshold at the ``1 - frr`` quantile of their scores."""
        clean = ctx.clean.float()
        m = len(clean)
        check(m >= 4, f"sentinet needs at least 4 clean holdout images, got {m}")
        num = ctx.num_classes
        check(self.top_k < num, f"sentinet: top_k must be below the number of classes ({num}), got {self.top_k}")
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator))
        self._g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(m, generator=self._g)
        n_ov = min(self.n_overlay, m // 2)
        self._overlays = clean[perm[:n_ov]]
        fit_idx = perm[n_ov:][:self.fit_size]
        conf, fooled = self.points(ctx.clf, clean[fit_idx])
        self.coef = fit_boundary(conf.numpy(), fooled.numpy(), self.bin_width)
        s = torch.from_numpy(signed_distance(self.coef, conf.double().numpy(), fooled.double().numpy()))
        self.threshold = float(torch.quantile(s, 1 - self.frr))

    def score(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)`` float in [0, 1] -> ``(N,)`` float32, the signed distance of each
        input's ``(avgconf, fooled)`` point to the boundary (positive above)."""
        check(self.coef is not None, "sentinet: call fit(ctx) before score()")
        assert self.coef is not None
        conf, fooled = self.points(clf, x)
        return torch.from_numpy(signed_distance(self.coef, conf.double().numpy(),
                                                fooled.double().numpy())).float()

    def points(self, clf: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(avgconf, fooled)``, each ``(N,)`` float64 in [0, 1], of the inputs ``x``: Grad-CAM on
        ``pick(clf, GRAD)``, the pasted images classified by ``clf`` itself."""
        check(self._overlays is not None and self._g is not None, "sentinet: call fit(ctx) before scoring")
        assert self._overlays is not None and self._g is not None
        grad_clf, self.grad_on = pick(clf, Capability.GRAD, who=self.name)
        x = x.float().cpu()
        n_masks = self.top_k + 1
        n_ov = len(self._overlays)
        chunk = max(1, self.batch_size // (2 * n_masks * n_ov))
        confs, fooleds = [], []
        for s in range(0, len(x), chunk):
            xb = x[s:s + chunk]
            with torch.no_grad():
                probs = torch.softmax(clf.logits(xb).float(), 1).cpu()
            order = probs.argsort(1, descending=True)[:, :n_masks]  # y, then the proposed classes
            y = order[:, 0]
            masks = self._masks(grad_clf, xb, order)  # (b, n_masks, 1, H, W)
            c, f = self._test(clf, xb, y, masks)
            confs.append(c)
            fooleds.append(f)
        if not confs:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        return torch.cat(confs), torch.cat(fooleds)

    def _masks(self, grad_clf: Classifier, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Algorithm 2: ``(b, top_k + 1, 1, H, W)`` float masks: the difference masks ``m_y & ~m_c``
        of the proposed classes, then ``m_y``."""
        m = top_masks(grad_cam(grad_clf, x, classes), self.mask_fraction)  # (b, J, H, W)
        m_y = m[:, :1]
        diff = m_y & ~m[:, 1:]
        return torch.cat([diff, m_y], 1).unsqueeze(2).float()

    @torch.no_grad()
    def _test(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 3: each mask's region of ``x`` (and uniform noise in its place) pasted on every
        overlay image; ``(avgconf, fooled)`` per input, ``(b,)`` float64."""
        assert self._overlays is not None and self._g is not None
        b, j = masks.shape[:2]
        over = self._overlays[None, None]  # (1, 1, n, C, H, W)
        mk = masks[:, :, None]  # (b, J, 1, 1, H, W)
        pasted = over * (1 - mk) + x[:, None, None] * mk
        noise = torch.rand((b, j, *self._overlays.shape), generator=self._g)
        inert = over * (1 - mk) + noise * mk
        imgs = torch.cat([pasted.flatten(0, 2), inert.flatten(0, 2)])
        logits = torch.cat([clf.logits(imgs[i:i + self.batch_size]).float().cpu()
                            for i in range(0, len(imgs), self.batch_size)])
        half = len(logits) // 2
        pred = logits[:half].argmax(1).view(b, -1)
        fooled = (pred == y[:, None]).double().mean(1)
        conf = torch.softmax(logits[half:], 1).amax(1).double().view(b, -1).mean(1)
        return conf, fooled


__all__ = ["SentiNet", "fit_boundary", "grad_cam", "signed_distance", "top_masks"]
