"""VIF and AIF with Filtering-then-Contrasting (Do, Harikumar, Le, Nguyen, Tran, Rana, Nguyen,
Susilo, Venkatesh, "Towards Effective and Robust Neural Trojan Defenses via Input Filtering",
ECCV 2022; arXiv 2202.12154).

Both defenses put a learned *input filter* ``F`` in front of the frozen classifier ``C``: ``F`` is
an image-to-image network trained on the defender's small clean set so that ``C(F(x))`` keeps
``C``'s prediction on clean images while anything ``F`` never needed to reproduce on clean images
(a trigger) is lost on the way through. Neither makes an assumption about the number, form or
input dependence of triggers, nor about the number of target classes.

* **VIF** (variational input filtering): ``F`` is a variational auto-encoder: an encoder gives a
  Gaussian posterior ``q(z | x) = N(mu(x), diag sigma(x)^2)`` over a latent map ``z``, a decoder
  maps a sample ``z`` back to an image ``x° = F(x)`` in [0, 1]. The loss over the clean set is

      ``L_VIF = E[ CE(C(x°), y_hat(x)) + lambda_rec * ||x° - x||^2 + lambda_kl * KL(q(z|x) || N(0, I)) ]``

  with ``y_hat(x) = argmax C(x)`` (the classifier's own label: no ground truth is needed; the
  holdout's labels agree with it on ~98% of the images here). The KL term is a variational
  information bottleneck: it charges every nat the latent code carries about ``x``, so the code
  keeps only what the reconstruction and the classifier need on clean data, and a trigger, absent
  from that data, is not transmitted. ``||.||^2`` is summed over pixels and the KL over latent
  units (the VAE's evidence bound with a Gaussian decoder), both averaged over the batch.
* **AIF** (adversarial input filtering): the filter is trained against a trigger generator ``G``
  that synthesises triggers to fool ``C`` through ``F``. ``G(eps, k)`` maps noise
  ``eps ~ N(0, I)`` and a target class ``k`` to a mask ``m`` in [0, 1]^(1 x H x W) and a pattern
  ``p`` in [0, 1]^(C x H x W); the triggered image is ``x~ = (1 - m) * x + m * p`` (the trigger
  family of Neural Cleanse and of the input-aware attack). The min-max game alternates, per batch:

      ``L_G = CE(C(F(x~)), k) + lambda_mask * relu(mean(m) - mask_bound)``  (``G`` minimises)
      ``L_F = L_VIF(x) + lambda_adv * [ CE(C(F(x~)), y_hat(x)) + lambda_rec * ||F(x~) - x||^2 ]``

  ``G`` looks for small triggers (mask density up to ``mask_bound``) that survive the filter and
  flip ``C`` to ``k``; ``F`` learns to map triggered images back to their clean source. ``F`` keeps
  VIF's variational bottleneck (AIF = VIF + the adversarial terms).
* **Filtering-then-Contrasting** (FtC): filtering alone costs clean accuracy (``F`` is lossy). FtC
  contrasts ``C(x)`` with ``C(F(x))``: where they differ, ``x`` is flagged as triggered (and, in
  the paper, rejected); where they agree, ``C(x)`` is kept. Note that the label FtC hands on is
  ``C(F(x))`` in both cases (it equals ``C(x)`` where they agree), so the "CA and ASR of the
  filtered classifier" (``ca_filtered``, ``asr_filtered`` in the row, :meth:`InputFilter.
  extra_metrics`) are those of ``C o F``; FtC's own gain is the rejection: ``ftc_flag_clean`` (clean
  inputs rejected), ``ftc_flag_triggered`` (triggered inputs rejected), ``asr_ftc`` (triggered inputs
  accepted *and* predicted as the target) and ``ca_ftc_accepted`` (accuracy on the accepted clean
  inputs).

As a backdoorlab :class:`~backdoorlab.defenses.base.Detector`, ``score(clf, x)`` is continuous:
the KL divergence ``KL(p_C(.|x) || p_C(.|F(x)))`` (nats, ``>= 0``) between the deployed
classifier's softmax outputs on ``x`` and on ``F(x)`` (``score="kl"``, the default), or
``1 - p_C(y_hat(x) | F(x))`` (``score="drop"``), or FtC's verdict itself as 0/1
(``score="flip"``). The threshold is the empirical ``1 - frr`` quantile of the scores of the
defender's clean images (``frr=0.01``, the rule the other backdoorlab detectors share). By default
``calib_fraction=0.2`` of the holdout is kept out of the filter's training and used for this
quantile only: the filter fits its training images better than unseen ones, so a quantile over the
training images would sit too low.

Which classifier runs which part: training ``F`` (and ``G``) back-propagates through ``C``, which
needs gradients (``white_box = {GRAD}``): it runs on the artifact where it has them and on its
fake-quant surrogate otherwise (:func:`~backdoorlab.defenses.base.pick`); the classifier's weights
are never updated (gradients are taken with respect to the filter's parameters only). Scoring and
FtC use the deployed artifact's own predictions.

Defaults, and where they come from. No reference code for the paper was found in the indexed public
repositories, and the paper's text (its appendix with the hyper-parameters) could not be read from
this machine; what is fixed by the paper's method section is the structure above (VAE filter with
a classification, a reconstruction and a KL term; generator of mask-and-pattern triggers; FtC's
contrast). The numbers are backdoorlab's choices, set on the tests' GTSRB models: ``lambda_rec =
0.01`` and ``lambda_kl = 0.003`` per pixel / per latent unit (relative to the classification
cross-entropy, weight 1), a 4x down-sampling conv VAE with a ``latent_channels=16`` map (the paper
uses a larger U-Net-like auto-encoder for 32x32 images; skip connections would carry a trigger past
the bottleneck, so there are none here), Adam at ``lr=1e-3``, ``batch_size=64`` and ``epochs=200``
over the holdout (a few hundred images), ``lambda_adv=1``, ``mask_bound=0.05`` and
``lambda_mask=10`` for AIF, with a 64-dimensional noise.

Shapes: inputs ``(N, C, H, W)`` float in [0, 1] (any ``H``, ``W``; the filter pads to a multiple of
4 and crops back); ``F(x)`` the same shape in [0, 1]; scores ``(N,)`` float32.

Measured: see ``tests/defenses/test_input_filtering.py`` (numbers in its docstring and in
``MEASURED`` below the imports).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import Capability, Classifier
from ...errors import check
from ..base import DEFENSES, DefenseContext, Detector, pick
from ..removers.ft import check_int, check_number

SCORES = ("kl", "drop", "flip")


# --- networks -----------------------------------------------------------------------------

class FilterVAE(nn.Module):
    """The input filter ``F``: a convolutional VAE with a ``(latent_channels, H/4, W/4)`` latent
    map. ``forward(x, sample)`` returns ``(x°, mu, logvar)``; ``x°`` is in [0, 1] and has ``x``'s
    shape. ``sample=False`` decodes the posterior mean (deterministic; used at test time)."""

    def __init__(self, channels: int, width: int = 32, latent_channels: int = 16):
        super().__init__()
        w = width
        act = nn.LeakyReLU(0.2)
        self.enc = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), act,
            nn.Conv2d(w, 2 * w, 4, 2, 1), act,
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), act,
            nn.Conv2d(4 * w, 2 * latent_channels, 1))
        self.dec = nn.Sequential(
            nn.Conv2d(latent_channels, 4 * w, 1), act,
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), act,
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), act,
            nn.Conv2d(w, channels, 3, 1, 1))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        mu, logvar = self.enc(xp).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        out = torch.sigmoid(self.dec(z))[..., :h, :w]
        return out, mu, logvar


class TriggerGenerator(nn.Module):
    """AIF's ``G(eps, k)``: noise ``(B, noise_dim)`` and target classes ``(B,)`` -> mask
    ``(B, 1, H, W)`` and pattern ``(B, C, H, W)``, both in [0, 1]."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int, noise_dim: int = 64,
                 hidden: int = 256):
        super().__init__()
        self.shape = (channels, height, width)
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, (channels + 1) * height * width))

    def forward(self, eps: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        out = self.net(torch.cat([eps, F.one_hot(k, self.num_classes).float()], 1)).view(-1, c + 1, h, w)
        return torch.sigmoid(out[:, :1]), torch.sigmoid(out[:, 1:])


def _augment(x: torch.Tensor, g: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``shift`` pixels (edges replicated) and brightness factors in
    [0.8, 1.2], per image: ``(B, C, H, W)`` in [0, 1] -> the same shape in [0, 1]."""
    b, _, h, w = x.shape
    xp = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    d = torch.randint(0, 2 * shift + 1, (b, 2), generator=g)
    out = torch.stack([xp[i, :, d[i, 0]:d[i, 0] + h, d[i, 1]:d[i, 1] + w] for i in range(b)])
    scale = (0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)).to(x.device)
    return (out * scale).clamp(0, 1)


def _kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, e^logvar) || N(0, 1))`` summed over the latent units: ``(B,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


# --- the detectors ------------------------------------------------------------------------

class InputFilter(Detector):
    """Shared by VIF and AIF: the filter, its training on the clean holdout, the scores and FtC.

    ``epochs``, ``batch_size``, ``lr``: Adam over the holdout's training part. ``lambda_rec``,
    ``lambda_kl``: weights of the reconstruction (per pixel, squared error) and KL (per latent unit)
    terms against the classification cross-entropy (weight 1). ``width``, ``latent_channels``: the
    filter's size. ``score``: ``"kl"`` (KL between the softmax outputs on ``x`` and ``F(x)``),
    ``"drop"`` (``1 - p(y_hat(x) | F(x))``) or ``"flip"`` (FtC's verdict, 0/1). ``frr``: share of
    clean inputs the threshold rejects (its ``1 - frr`` quantile over the calibration images).
    ``calib_fraction``: share of the holdout kept out of training for the threshold (0: calibrate
    on the training images). ``batch_size_eval``: images per forward pass when scoring.
    ``eval_limit``: when backdoorlab scores the detector, at most this many clean and this many
    triggered test inputs (an evaluation budget, not part of the method).

    After :meth:`fit`: ``filter`` (the trained :class:`FilterVAE`, eval mode), ``threshold``,
    ``grad_on`` (``"artifact"`` or ``"surrogate"``), ``history`` (the last epoch's mean losses) and
    ``calib_flip_rate`` (FtC's flag rate on the calibration images).
    """

    name = "input-filter"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, epochs: int = 200, batch_size: int = 64, lr: float = 1e-3, lambda_rec: float = 0.01,
                 lambda_kl: float = 0.003, width: int = 32, latent_channels: int = 16, score: str = "kl",
                 frr: float = 0.01, calib_fraction: float = 0.2, augment: bool = True, batch_size_eval: int = 512,
                 eval_limit: int = 1000):
        who = self.name
        check(isinstance(augment, bool), f"{who}: augment must be true or false, got {augment!r}")
        check_int(who, "epochs", epochs, 1)
        check_int(who, "batch_size", batch_size, 1)
        check_number(who, "lr", lr, 0, lo_open=True)
        check_number(who, "lambda_rec", lambda_rec, 0)
        check_number(who, "lambda_kl", lambda_kl, 0)
        check_int(who, "width", width, 1)
        check_int(who, "latent_channels", latent_channels, 1)
        check(score in SCORES, f"{who}: score must be one of {', '.join(SCORES)}, got {score!r}")
        check_number(who, "frr", frr, 0, 1, lo_open=True)
        check_number(who, "calib_fraction", calib_fraction, 0, 1)
        check_int(who, "batch_size_eval", batch_size_eval, 1)
        check_int(who, "eval_limit", eval_limit, 10)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = float(lr)
        self.lambda_rec = float(lambda_rec)
        self.lambda_kl = float(lambda_kl)
        self.width = width
        self.latent_channels = latent_channels
        self.score_kind = score
        self.frr = float(frr)
        self.calib_fraction = float(calib_fraction)
        self.augment = augment
        self.batch_size_eval = batch_size_eval
        self.eval_limit = eval_limit
        self.threshold = float("nan")
        self.filter: FilterVAE | None = None
        self.grad_on = ""
        self.history: dict[str, float] = {}
        self.calib_flip_rate = float("nan")
        self._device = torch.device("cpu")

    # --- training -----------------------------------------------------------------------

    def fit(self, ctx: DefenseContext) -> None:
        """Train the filter on the holdout (less its calibration part) through ``pick(ctx.clf,
        GRAD)``, then set the threshold from the calibration part's scores on ``ctx.clf``."""
        clean = ctx.clean.float()
        m = len(clean)
        check(m >= 2, f"{self.name} needs at least 2 clean holdout images, got {m}")
        grad_clf, self.grad_on = pick(ctx.clf, Capability.GRAD, who=self.name)
        self._device = ctx.device
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))
        order = torch.randperm(m, generator=g)
        n_cal = int(round(self.calib_fraction * m))
        n_cal = min(max(n_cal, 1), m - 1) if self.calib_fraction > 0 else 0
        cal, tr = clean[order[:n_cal]], clean[order[n_cal:]]
        with torch.no_grad():
            y_hat = self._logits(ctx.clf, tr).argmax(1)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))  # the filter's init and noise
        try:
            # channels_last, as the classifiers train (fit): 12% faster on CPU than mixing formats
            self.filter = FilterVAE(tr.shape[1], self.width, self.latent_channels).to(self._device).to(
                memory_format=torch.channels_last)
            self._train(grad_clf, tr, y_hat, ctx, g)
        finally:
            torch.random.set_rng_state(torch_state)
        self.filter.eval()
        calib = cal if n_cal > 0 else tr
        s, flip = self._scores(ctx.clf, calib)
        self.threshold = float(torch.quantile(s.double(), 1 - self.frr))
        self.calib_flip_rate = float(flip.float().mean())

    def _train(self, grad_clf: Classifier, x: torch.Tensor, y_hat: torch.Tensor, ctx: DefenseContext,
               g: torch.Generator) -> None:
        assert self.filter is not None
        params = list(self.filter.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        n = len(x)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=g)
            sums: dict[str, float] = {}
            for s in range(0, n, self.batch_size):
                idx = perm[s:s + self.batch_size]
                xb, yb = x[idx].to(self._device), y_hat[idx].to(self._device)
                if self.augment:
                    xb = _augment(xb, g)
                xb = xb.contiguous(memory_format=torch.channels_last)
                if self.augment:
                    with torch.no_grad():
                        yb = self._logits(grad_clf, xb).argmax(1)
                self.filter.train()
                loss, parts = self._filter_loss(grad_clf, xb, yb, ctx, g)
                grads = torch.autograd.grad(loss, params)  # the classifier's weights get no gradient
                for p, gr in zip(params, grads):
                    p.grad = gr
                opt.step()
                opt.zero_grad(set_to_none=True)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
            self.history = {k: v / n for k, v in sums.items()}

    def _vif_loss(self, grad_clf: Classifier, xb: torch.Tensor, yb: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.filter is not None
        out, mu, logvar = self.filter(xb, sample=True)
        ce = F.cross_entropy(self._logits(grad_clf, out), yb)
        rec = (out - xb).pow(2).flatten(1).sum(1).mean()
        kl = _kl_normal(mu, logvar).mean()
        loss = ce + self.lambda_rec * rec + self.lambda_kl * kl
        return loss, {"ce": ce.item(), "rec": rec.item(), "kl": kl.item()}

    def _filter_loss(self, grad_clf: Classifier, xb: torch.Tensor, yb: torch.Tensor, ctx: DefenseContext,
                     g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self._vif_loss(grad_clf, xb, yb)

    def _logits(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        return clf.logits(x).float().to(x.device)

    # --- filtering, scores, FtC ---------------------------------------------------------------

    @torch.no_grad()
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """``F(x)``: ``(N, C, H, W)`` float in [0, 1] -> the same shape, float in [0, 1] (CPU), with
        the posterior mean decoded (deterministic)."""
        check(self.filter is not None, f"{self.name}: call fit(ctx) before filtering")
        assert self.filter is not None
        self.filter.eval()
        out = [self.filter(x[s:s + self.batch_size_eval].float().to(self._device), sample=False)[0].cpu()
               for s in range(0, len(x), self.batch_size_eval)]
        return torch.cat(out) if out else x.float().cpu().clone()

    @torch.no_grad()
    def contrast(self, clf: Classifier, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """FtC on the deployed ``clf``: ``(p_x, p_fx, pred_x, pred_fx)``: the softmax outputs
        ``(N, K)`` on ``x`` and on ``F(x)`` and their labels ``(N,)`` (CPU)."""
        x = x.float().cpu()
        fx = self.purify(x)
        px, pf = [], []
        for s in range(0, len(x), self.batch_size_eval):
            px.append(torch.softmax(clf.logits(x[s:s + self.batch_size_eval]).float(), 1).cpu())
            pf.append(torch.softmax(clf.logits(fx[s:s + self.batch_size_eval]).float(), 1).cpu())
        if not px:
            e = torch.empty(0, 0)
            return e, e, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        p_x, p_f = torch.cat(px), torch.cat(pf)
        return p_x, p_f, p_x.argmax(1), p_f.argmax(1)

    def flags(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """FtC's verdict: ``(N,)`` bool, true where ``C(x) != C(F(x))`` (the input is flagged as
        triggered and, in the paper, rejected)."""
        _, _, a, b = self.contrast(clf, x)
        return a != b

    def predict(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """The FtC-purified labels ``(N,)``: ``C(F(x))`` where FtC flags ``x``, else ``C(x)`` (the
        two agree there, so this is ``C(F(x))``)."""
        _, _, a, b = self.contrast(clf, x)
        return torch.where(a != b, b, a)

    def score(self, clf: Classifier, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, C, H, W)`` float in [0, 1] -> ``(N,)`` float32 (see ``score``)."""
        check(self.filter is not None, f"{self.name}: call fit(ctx) before score()")
        return self._scores(clf, x)[0]

    def _scores(self, clf: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_x, p_f, a, b = self.contrast(clf, x)
        flip = a != b
        if len(a) == 0:
            return torch.empty(0), flip
        if self.score_kind == "kl":
            lp_x, lp_f = p_x.clamp_min(1e-12).log(), p_f.clamp_min(1e-12).log()
            s = (p_x * (lp_x - lp_f)).sum(1).clamp_min(0)
        elif self.score_kind == "drop":
            s = 1 - p_f.gather(1, a[:, None])[:, 0]
        else:
            s = flip.float()
        return s.float(), flip

    def extra_metrics(self, clf: Classifier, x_clean: torch.Tensor, y_clean: torch.Tensor,
                      x_triggered: torch.Tensor, y_target: torch.Tensor) -> dict[str, Any]:
        """The row's filtering and FtC numbers (called by backdoorlab's detector scoring):
        ``ca_filtered`` / ``asr_filtered``: CA and ASR of ``C o F`` (= FtC's labels);
        ``ca_unfiltered`` / ``asr_unfiltered``: the same inputs through ``C`` alone;
        ``ftc_flag_clean`` / ``ftc_flag_triggered``: shares flagged by FtC's contrast;
        ``asr_ftc``: triggered inputs accepted and predicted as the target; ``ca_ftc_accepted``:
        accuracy on the accepted clean inputs. ASR fields are ``None`` without triggered inputs."""
        _, _, a, b = self.contrast(clf, x_clean)
        y = y_clean.cpu().long()
        flag = a != b
        out: dict[str, Any] = {
            "ca_filtered": float((b == y).float().mean()) if len(y) else None,
            "ca_unfiltered": float((a == y).float().mean()) if len(y) else None,
            "ftc_flag_clean": float(flag.float().mean()) if len(y) else None,
            "ca_ftc_accepted": float((a[~flag] == y[~flag]).float().mean()) if bool((~flag).any()) else None,
        }
        if len(x_triggered):
            _, _, at, bt = self.contrast(clf, x_triggered)
            t = y_target.cpu().long()
            ft = at != bt
            out.update(asr_filtered=float((bt == t).float().mean()), asr_unfiltered=float((at == t).float().mean()),
                       ftc_flag_triggered=float(ft.float().mean()), asr_ftc=float(((at == t) & ~ft).float().mean()))
        else:
            out.update(asr_filtered=None, asr_unfiltered=None, ftc_flag_triggered=None, asr_ftc=None)
        return out


@DEFENSES.register("vif")
class VIF(InputFilter):
    """Variational Input Filtering with Filtering-then-Contrasting (Do et al., ECCV 2022); see the
    module docstring and :class:`InputFilter` for the parameters."""

    name = "vif"


@DEFENSES.register("aif")
class AIF(InputFilter):
    """Adversarial Input Filtering with Filtering-then-Contrasting (Do et al., ECCV 2022).

    Besides :class:`InputFilter`'s parameters: ``lambda_adv`` (weight of the filter's adversarial
    terms), ``mask_bound`` (the generator's mask density allowed without penalty, in (0, 1]),
    ``lambda_mask`` (weight of the penalty above it), ``noise_dim``, ``g_lr`` (the generator's Adam
    learning rate). After :meth:`fit`, ``generator`` holds ``G`` and ``history`` also the
    generator's losses (``g_ce``, ``mask``: the mean mask density) and the filter's adversarial
    cross-entropy (``adv_ce``).
    """

    name = "aif"

    def __init__(self, epochs: int = 200, batch_size: int = 64, lr: float = 1e-3, lambda_rec: float = 0.01,
                 lambda_kl: float = 0.003, width: int = 32, latent_channels: int = 16, score: str = "kl",
                 frr: float = 0.01, calib_fraction: float = 0.2, augment: bool = True, batch_size_eval: int = 512,
                 eval_limit: int = 1000, lambda_adv: float = 1.0, mask_bound: float = 0.05,
                 lambda_mask: float = 10.0, noise_dim: int = 64, g_lr: float = 1e-3):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, lambda_rec=lambda_rec, lambda_kl=lambda_kl,
                         width=width, latent_channels=latent_channels, score=score, frr=frr,
                         calib_fraction=calib_fraction, augment=augment, batch_size_eval=batch_size_eval,
                         eval_limit=eval_limit)
        who = self.name
        check_number(who, "lambda_adv", lambda_adv, 0)
        check_number(who, "mask_bound", mask_bound, 0, 1, lo_open=True, hi_open=False)
        check_number(who, "lambda_mask", lambda_mask, 0)
        check_int(who, "noise_dim", noise_dim, 1)
        check_number(who, "g_lr", g_lr, 0, lo_open=True)
        self.lambda_adv = float(lambda_adv)
        self.mask_bound = float(mask_bound)
        self.lambda_mask = float(lambda_mask)
        self.noise_dim = noise_dim
        self.g_lr = float(g_lr)
        self.generator: TriggerGenerator | None = None
        self._g_opt: torch.optim.Optimizer | None = None
        self._num_classes = 0

    def _train(self, grad_clf: Classifier, x: torch.Tensor, y_hat: torch.Tensor, ctx: DefenseContext,
               g: torch.Generator) -> None:
        _, c, h, w = x.shape
        self._num_classes = ctx.num_classes
        self.generator = TriggerGenerator(c, h, w, ctx.num_classes, self.noise_dim).to(self._device)
        self._g_opt = torch.optim.Adam(self.generator.parameters(), lr=self.g_lr)
        super()._train(grad_clf, x, y_hat, ctx, g)

    def _triggered(self, xb: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x~, m, k)``: ``xb`` with a generated trigger for random targets ``k``."""
        assert self.generator is not None
        b = len(xb)
        eps = torch.randn(b, self.noise_dim, generator=g).to(self._device)
        k = torch.randint(0, self._num_classes, (b,), generator=g).to(self._device)
        m, p = self.generator(eps, k)
        return (1 - m) * xb + m * p, m, k

    def _filter_loss(self, grad_clf: Classifier, xb: torch.Tensor, yb: torch.Tensor, ctx: DefenseContext,
                     g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.filter is not None and self.generator is not None and self._g_opt is not None
        # the generator's step: triggers that survive F and flip C to k, with a bounded mask
        self.filter.eval()
        for p in self.filter.parameters():
            p.requires_grad_(False)
        try:
            xt, m, k = self._triggered(xb, g)
            out_t, _, _ = self.filter(xt, sample=True)
            g_ce = F.cross_entropy(self._logits(grad_clf, out_t), k)
            density = m.flatten(1).mean(1)
            g_loss = g_ce + self.lambda_mask * F.relu(density - self.mask_bound).mean()
            g_params = list(self.generator.parameters())
            for p, gr in zip(g_params, torch.autograd.grad(g_loss, g_params)):
                p.grad = gr
            self._g_opt.step()
            self._g_opt.zero_grad(set_to_none=True)
        finally:
            for p in self.filter.parameters():
                p.requires_grad_(True)
        self.filter.train()
        # the filter's step: VIF on clean images, and triggered images mapped back to their source
        loss, parts = self._vif_loss(grad_clf, xb, yb)
        with torch.no_grad():
            xt, _, _ = self._triggered(xb, g)
        out_t, _, _ = self.filter(xt, sample=True)
        adv_ce = F.cross_entropy(self._logits(grad_clf, out_t), yb)
        adv_rec = (out_t - xb).pow(2).flatten(1).sum(1).mean()
        loss = loss + self.lambda_adv * (adv_ce + self.lambda_rec * adv_rec)
        parts.update(adv_ce=adv_ce.item(), g_ce=g_ce.item(), mask=density.mean().item())
        return loss, parts


__all__ = ["AIF", "VIF", "FilterVAE", "InputFilter", "TriggerGenerator"]
