"""BAN (Xu, Liu, Koffas, Yu, Picek, "BAN: Detecting Backdoors Activated by Adversarial Neuron
Noise", NeurIPS 2024, arXiv:2405.19928; code: github.com/xiaoyunxxy/ban, ``ban_detection.py``).

BAN makes no assumption about the trigger (patch, blend, filter, warp, sample-specific): it looks
for the backdoor in the model's neurons and features instead of the input.

1. **Feature decoupling.** On the defender's clean data, learn a mask ``m`` in [0, 1] over the
   feature maps ``z`` that the global pool reduces (the reference masks ResNet's ``layer4``
   output, ``(C, H, W)``) so that the *positive* features ``m * z`` keep the benign behaviour and
   the *negative* features ``(1 - m) * z`` lose it:

       min_m  CE(g(m * z), y) - CE(g((1 - m) * z), y) + lambda * |m|_1 / stopgrad(|m|_1)

   (``g`` is the rest of the network after the feature maps; the L1 term is divided by its own
   detached value, as in the reference, so its gradient is ``lambda * sign(m) / |m|_1``). The mask
   starts uniform in [0, 1] and is clipped to [0, 1]; Adam.
2. **Adversarial neuron noise.** As ANP (Wu & Wang, NeurIPS 2021), every BatchNorm channel is a
   neuron whose scale and shift are perturbed multiplicatively, ``gamma (1 + delta) x_hat +
   beta (1 + xi)``; the noise starts uniform in ``[-eps, eps]`` and takes ``steps`` signed-gradient
   ascent steps of size ``eps / steps`` on the clean-data loss (the whole network, no mask): the
   neurons are pushed to make the model err as much as possible. The perturbation reuses the
   project's ANP machinery (:class:`~backdoorlab.defenses.removers.neuron_pruning.NeuronMasks`,
   masks left at 1).
3. **Detection.** A backdoored model's noised predictions on clean data collapse onto the target
   label (the noise activates the backdoor neurons; the paper's Fig. 1), a clean model keeps more
   of its accuracy and spreads its errors. The reference code makes no decision: after the noise
   it prints the clean accuracy and the prediction distribution with its argmax (the suspected
   target) of the noised model, first on the whole features, then on the negative features
   ``(1 - m) * z``. Its argument parser's one decision threshold is ``--acc-threshold 0.25`` (read
   nowhere). The paper's decision rule could not be read here (only the reference code and
   summaries of the paper were at hand), so the verdict is: **backdoored if the noised model's
   clean accuracy is below ``acc_threshold``**, the target being its most predicted label.
   ``decide_on`` says which of the two printed accuracies: ``"noise"`` (default, whole features)
   or ``"noise-negative"`` (negative features). Both are always reported. Measured on GTSRB
   (``tests/defenses/test_ban.py``), ``"noise-negative"`` flags every model, the clean one
   included: step 1 maximises the negative features' loss, so they collapse onto one label for
   any model (the target for BadNets and WaNet, an arbitrary label for Blended and the clean
   model), and their accuracy is about ``1 / K`` or less whatever the model.

Defaults (``ban_detection.py``; the README's detection command ``--mask-lambda 0.75 --steps 30
--eps 0.3 --print-every 20`` overrides three parser defaults and is what the authors run):

* ``eps = 0.3`` (parser and README);
* ``steps = 30`` signed steps of size ``eps / steps`` (README; the parser default is 1);
* ``project = False``: the noise is not projected back onto ``[-eps, eps]`` (the reference's
  ``clip_noise`` call is commented out, so a random start plus 30 steps of ``eps / 30`` can reach
  ``2 eps``); the paper writes the bound as ``[-eps, eps]``, which ``project=True`` enforces (as
  the project's ANP does);
* ``mask_lambda = 0.75`` (README; the parser default is 0.25); ``mask_lr = 0.01`` (parser), Adam;
* ``mask_epochs = 20`` (hard-coded ``mepoch = 20``) of ``batches_per_epoch = 20`` mini-batches
  (README ``--print-every 20``: a ``RandomSampler`` with replacement draws ``print_every *
  batch_size`` images per epoch) of ``batch_size = 128`` (parser);
* ``acc_threshold = 0.25`` (parser ``--acc-threshold``), ``decide_on = "noise"`` (see 3.);
* clean data: the reference uses 1% of the training set (``--val-frac 0.01``, 500 CIFAR-10
  images) to optimise and a 10% split that contains it to evaluate; here the defender's holdout
  ``ctx.clean`` (``n_images`` of it, default all, to optimise; all of it to evaluate).

Deviations, and why:

* **One noise batch.** The reference loops its PGD over ``print_every`` batches but re-initialises
  the noise for each, so only the last batch's noise survives; here that one batch is drawn
  (``batch_size`` images): the same procedure at a twentieth of the cost.
* **BatchNorm statistics.** As in the reference, the BatchNorm layers run in train mode (batch
  statistics) while the noise is optimised, which also re-estimates their running statistics on
  the noised clean batches (momentum 0.1, so the last steps dominate); evaluation is in eval mode
  with those statistics, on a deep copy (the caller's model is never changed).
* **Cached features (CPU budget).** The mask is the only variable of step 1 and the model is
  frozen, so the feature maps of the optimisation images are computed once (eval mode, running
  statistics) instead of per mini-batch in train mode; each of the 400 mask steps then runs only
  the global pool and the head. The reference's training augmentation (random crop, horizontal
  flip) is not applied: the holdout is used as it is (flips change traffic signs' meaning).
* **Layer.** The mask sits on the input of the model's last global pool (``AdaptiveAvgPool2d(1)``
  / ``AdaptiveMaxPool2d(1)``), found by name; the rest of the network (pool, flatten, head) is cut
  from the model's ``torch.fx`` graph (``feature_layer`` names the pool). For ``small-cnn`` on 32x32
  inputs this is the input of ``body.21``, the last conv block's ReLU output, ``(256, 4, 4)``;
  ResNet-18's ``layer4`` output in the reference is the same place.
* **Deployed int8 models.** The gradient model is :func:`~backdoorlab.defenses.base.pick`'s: the
  artifact, or its fake-quant surrogate. The FX surrogate of ``int8-torch`` has its BatchNorms
  folded into the convolutions, so :class:`FoldedNeurons` re-creates them: each biased ``Conv2d``'s
  output ``o = gamma x_hat + beta`` is standardised (batch statistics while the noise is
  optimised, running ones after) and rescaled by its clean-data standard deviation and mean (which
  recover ``|gamma|`` and ``beta``), with the noise on both. Perturbing the folded convs' outputs
  directly instead (no re-normalisation) made every model collapse, the clean one included. The
  ONNX surrogate (``int8-ort``) replays its graph as steps without modules: BAN raises a one-line
  error there (the scan reports it as not run).
* **Budget.** The defaults cost 400 head-only mask steps and 30 forward/backward passes of 128
  images: 10-17 s per 43-class ``small-cnn`` scan on one CPU thread (int8 surrogate the slower).
  ``steps``, ``batch_size``, ``mask_epochs``, ``batches_per_epoch`` and ``n_images`` set a smaller
  one (``steps=10, batch_size=64``: ~3 s), but the noise's strength depends on ``steps`` (fewer,
  larger steps perturb harder: at ``eps=0.5, steps=10`` the clean GTSRB model was flagged once in
  two seeds).

Measured on GTSRB (small-cnn, 300 holdout images): at the defaults WaNet is detected (target 0)
and the clean model is not flagged, but BadNets and Blended are missed (their noised accuracy
0.52 / 0.38 stays above 0.25 although their errors go to label 0); at ``eps=0.5`` all three are
detected with target 0 and the clean model is not (accuracy 0.37). Figures in the test module.

Output (:class:`~backdoorlab.defenses.base.ScanResult`): ``flagged = [target]`` if the verdict is
positive, else ``[]``; ``score = 1 - acc`` of the ``decide_on`` predictions (higher = more
suspicious; the verdict is ``score > 1 - acc_threshold``); ``per_label``: the share of the holdout
predicted as each label by those predictions; ``images``: ``feature_mask`` ``(C, 1, H, W)`` in
[0, 1]. ``metrics``: ``verdict``, ``target`` (the most predicted label when the verdict is
positive, else ``None``), ``decide_on``, ``acc_threshold``, ``acc_clean`` (unperturbed), and for
``noise`` and ``noise_negative``: ``acc_*`` (the noised model's clean accuracy), ``top_label_*``
(its most predicted label), ``top_share_*`` (share of the images of other labels predicted as
it); ``loss_positive``, ``loss_negative`` (mean CE of the last mask epoch), ``mask_mean``,
``feature_layer``, ``feature_shape``, ``neurons`` (``batchnorm`` or ``folded-conv``),
``neuron_layers``, ``n_images``, ``n_eval``, ``eps``, ``steps``, ``project``, ``seconds``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...classifier import Capability, TorchClassifier
from ...compress.fakequant import FakeQuant
from ...compress.surrogate import OnnxQDQModule
from ...errors import BackdoorLabError, check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick
from ..removers.neuron_pruning import BNUnit, NeuronMasks, bn_units, check_int, check_number

WHO = "ban"
EVAL_BATCH = 256  # images per forward pass when measuring
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm2d defaults, for the BN re-created on folded convs
DECIDE_ON = ("noise", "noise-negative")  # which predictions the accuracy threshold is applied to


# --------------------------------------------------------------------------- the model's parts
def _global_pool(model: nn.Module) -> str:
    """Name of the last ``Adaptive{Avg,Max}Pool2d(1)`` module of ``model``: BAN masks its input."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and m.output_size in (1, (1, 1)):
            name = n
    if name is None:
        raise BackdoorLabError(f"{WHO}: {type(model).__name__} has no global-pool module whose input feature "
                               f"maps it could mask")
    return name


class _Tracer(fx.Tracer):
    """Keeps fake-quant modules whole (they hold constants, not structure)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FakeQuant) or super().is_leaf_module(m, qualname)


def _tail(model: nn.Module, pool: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The part of ``model`` after the feature maps: ``(N, C, H, W)`` features -> ``(N, K)`` logits
    (the traced graph from the global pool ``pool`` on, its input replaced by a placeholder)."""
    fail = f"{WHO}: cannot split {type(model).__name__} at its global pool {pool!r}"
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001  an untraceable model: say so in one line
        raise BackdoorLabError(f"{fail} (not traceable: {type(exc).__name__})") from None
    nodes = list(graph.nodes)
    at = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == pool]
    check(len(at) == 1 and bool(nodes[at[0]].args), f"{fail} (it is not called exactly once)")
    tail, env = fx.Graph(), {}
    env[nodes[at[0]].args[0]] = tail.placeholder("features")
    for n in nodes:  # constants may be read after the pool
        if n.op == "get_attr":
            env[n] = tail.node_copy(n, env.__getitem__)
    try:
        for n in nodes[at[0]:]:
            env[n] = tail.node_copy(n, env.__getitem__)
    except KeyError:
        raise BackdoorLabError(f"{fail} (later layers read earlier activations)") from None
    return fx.GraphModule(tracer.root, tail)


def _neurons(model: nn.Module) -> tuple[list[BNUnit], str]:
    """The neuron layers: every affine BatchNorm2d (the paper's), or, where BatchNorm was folded
    into the convolutions (the int8-torch surrogate), every Conv2d with a bias."""
    if any(isinstance(m, nn.BatchNorm2d) and m.affine for m in model.modules()):
        return bn_units(model, WHO), "batchnorm"
    convs = [BNUnit(bn=n, channels=m.out_channels) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.bias is not None]
    check(bool(convs), f"{WHO}: {type(model).__name__} has no BatchNorm2d or biased Conv2d layer whose "
                       f"neurons it could perturb")
    return convs, "folded-conv"


class FoldedNeurons:
    """BAN's noisy BatchNorm on convolutions whose BatchNorm was folded into them.

    A folded conv outputs ``o = gamma * x_hat + beta`` (``x_hat`` the normalised pre-BN value), so
    its clean-data per-channel mean and standard deviation recover ``beta`` and ``|gamma|``.
    While ``perturbed``, each conv's output becomes ``std (1 + delta) * standardise(o) + mean (1 + xi)``,
    standardised by the batch statistics while ``training`` (which also update running ones,
    momentum 0.1, as a BatchNorm in train mode does) and by the running ones otherwise: the BN
    layer of the paper, re-created on the folded graph. Same interface as
    :class:`~backdoorlab.defenses.removers.neuron_pruning.NeuronMasks` (``noise_w``, ``noise_b``,
    ``perturbed``, :meth:`remove`). ``x``: clean images ``(N, C, H, W)`` for the statistics.
    """

    def __init__(self, model: nn.Module, units: list[BNUnit], x: torch.Tensor):
        mods = dict(model.named_modules())
        dev = x.device
        self.perturbed = self.training = False
        self.noise_w = [torch.zeros(u.channels, device=dev) for u in units]
        self.noise_b = [torch.zeros(u.channels, device=dev) for u in units]
        sums = [torch.zeros(3, u.channels, dtype=torch.float64, device=dev) for u in units]
        self._calib: list[torch.Tensor] | None = sums
        self._handles = [mods[u.bn].register_forward_hook(self._hook(i)) for i, u in enumerate(units)]
        with torch.no_grad():
            for i in range(0, len(x), EVAL_BATCH):
                model(x[i:i + EVAL_BATCH])
        self._calib = None
        mean = [t[1] / t[0] for t in sums]
        var = [(t[2] / t[0] - m * m).clamp_min(0) for t, m in zip(sums, mean)]
        self.shift = [m.float() for m in mean]
        self.scale = [v.sqrt().float() for v in var]
        self.run_mean = [m.float().clone() for m in mean]
        self.run_var = [v.float().clone() for v in var]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._calib is not None:
                o = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
                self._calib[i] += torch.stack([torch.full_like(o[:, 0], o.shape[1]), o.sum(1), (o * o).sum(1)])
                return None
            if not self.perturbed:
                return None
            if self.training:
                mu, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)
                with torch.no_grad():
                    n = out.numel() / out.shape[1]
                    self.run_mean[i].mul_(1 - BN_MOMENTUM).add_(BN_MOMENTUM * mu.detach())
                    self.run_var[i].mul_(1 - BN_MOMENTUM).add_(BN_MOMENTUM * var.detach() * n / max(n - 1, 1))
            else:
                mu, var = self.run_mean[i], self.run_var[i]
            z = (out - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + BN_EPS)
            return (self.scale[i] * (1 + self.noise_w[i])).view(1, -1, 1, 1) * z + \
                (self.shift[i] * (1 + self.noise_b[i])).view(1, -1, 1, 1)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _grad_module(ctx: DefenseContext) -> nn.Module:
    """A float32 deep copy of the gradient model's module on ``ctx.device``, parameters frozen."""
    clf, _ = pick(ctx.clf, Capability.GRAD, who=WHO)
    if not isinstance(clf, TorchClassifier):
        raise BackdoorLabError(f"{WHO} perturbs a PyTorch module's neurons; the {clf.precision} "
                               f"gradient model is not one")
    inner = getattr(clf.module, "inner", None)
    if isinstance(clf.module, OnnxQDQModule) or isinstance(inner, OnnxQDQModule):
        raise BackdoorLabError(f"{WHO} cannot run on the ONNX surrogate ({clf.precision}): it replays the "
                               f"graph as steps without modules, so it has no neuron layers to perturb")
    model = copy.deepcopy(clf.module).float().to(ctx.device).eval()
    return model.requires_grad_(False)


def _set_train(model: nn.Module, nm: NeuronMasks | FoldedNeurons, on: bool) -> None:
    """BatchNorm layers (real or re-created on folded convs) to batch statistics (``on``) or back."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(on)
    if isinstance(nm, FoldedNeurons):
        nm.training = on


class _Features:
    """The input of ``model``'s module ``pool`` on every forward pass (a pre-hook)."""

    def __init__(self, model: nn.Module, pool: str):
        self.value: torch.Tensor | None = None
        self._h = dict(model.named_modules())[pool].register_forward_pre_hook(self._grab)

    def _grab(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self._h.remove()


@torch.no_grad()
def _feature_maps(model: nn.Module, grab: _Features, x: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(0, len(x), EVAL_BATCH):
        model(x[i:i + EVAL_BATCH])
        out.append(grab.value)
    return torch.cat(out)


@torch.no_grad()
def _predict(tail: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, mask: torch.Tensor | None
             ) -> torch.Tensor:
    out = [tail(z[i:i + EVAL_BATCH] if mask is None else z[i:i + EVAL_BATCH] * mask).argmax(1)
           for i in range(0, len(z), EVAL_BATCH)]
    return torch.cat(out)


# ------------------------------------------------------------------------------------ scanner
@DEFENSES.register("ban")
class BAN(Scanner):
    """BAN (Xu et al., NeurIPS 2024): adversarial neuron noise plus a feature mask that decouples
    benign from backdoor features; see the module docstring for the algorithm and defaults.

    ``eps``: bound of the multiplicative neuron noise; ``steps``: signed-gradient steps of size
    ``eps / steps`` on one batch of ``batch_size`` clean images; ``mask_lambda``, ``mask_lr``:
    the mask's L1 weight and Adam learning rate; ``mask_epochs`` x ``batches_per_epoch``
    mini-batches of ``batch_size`` (drawn with replacement) optimise the mask; ``n_images``: the
    holdout images used to optimise (``None``: all); ``acc_threshold``: backdoored if the noised
    model's clean accuracy is below it, on the whole features (``decide_on="noise"``) or on the
    negative ones (``"noise-negative"``); ``project``: keep the noise in ``[-eps, eps]`` (the
    paper's bound; the reference code does not).
    """

    name = "ban"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, eps: float = 0.3, steps: int = 30, mask_lambda: float = 0.75, mask_lr: float = 0.01,
                 mask_epochs: int = 20, batches_per_epoch: int = 20, batch_size: int = 128,
                 n_images: int | None = None, acc_threshold: float = 0.25, project: bool = False,
                 decide_on: str = "noise"):
        check_number(WHO, "eps", eps, 0, 1, lo_open=True)
        check_int(WHO, "steps", steps, 1)
        check_number(WHO, "mask_lambda", mask_lambda, 0)
        check_number(WHO, "mask_lr", mask_lr, 0, lo_open=True)
        check_int(WHO, "mask_epochs", mask_epochs, 1)
        check_int(WHO, "batches_per_epoch", batches_per_epoch, 1)
        check_int(WHO, "batch_size", batch_size, 2)
        check(n_images is None or (isinstance(n_images, int) and not isinstance(n_images, bool) and n_images >= 2),
              f"{WHO}: n_images must be None or an integer >= 2, got {n_images!r}")
        check_number(WHO, "acc_threshold", acc_threshold, 0, 1, lo_open=True, hi_open=True)
        check(isinstance(project, bool), f"{WHO}: project must be true or false, got {project!r}")
        check(decide_on in DECIDE_ON, f"{WHO}: decide_on must be one of {', '.join(DECIDE_ON)}, got {decide_on!r}")
        self.eps, self.steps = float(eps), steps
        self.mask_lambda, self.mask_lr = float(mask_lambda), float(mask_lr)
        self.mask_epochs, self.batches_per_epoch, self.batch_size = mask_epochs, batches_per_epoch, batch_size
        self.n_images = n_images
        self.acc_threshold = float(acc_threshold)
        self.project, self.decide_on = project, decide_on

    # step 1
    def learn_mask(self, tail: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, y: torch.Tensor,
                   g: torch.Generator) -> tuple[torch.Tensor, float, float]:
        """The feature mask ``(C, H, W)`` in [0, 1] from cached clean feature maps ``z`` ``(N, C, H, W)``
        and labels ``y``, with the last epoch's mean positive and negative losses."""
        mask = torch.rand(z.shape[1:], generator=g).to(z.device).requires_grad_(True)
        opt = torch.optim.Adam([mask], lr=self.mask_lr)
        pos = neg = 0.0
        for _ in range(self.mask_epochs):
            pos = neg = 0.0
            for _ in range(self.batches_per_epoch):
                idx = torch.randint(len(z), (self.batch_size,), generator=g).to(z.device)
                zb, yb = z[idx], y[idx]
                loss_pos = F.cross_entropy(tail(zb * mask), yb)
                loss_neg = F.cross_entropy(tail(zb * (1 - mask)), yb)
                norm = mask.abs().sum()
                loss = loss_pos - loss_neg + self.mask_lambda * norm / norm.detach().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0.0, 1.0)
                pos, neg = pos + float(loss_pos.detach()), neg + float(loss_neg.detach())
        return mask.detach(), pos / self.batches_per_epoch, neg / self.batches_per_epoch

    # step 2
    def perturb(self, model: nn.Module, nm: NeuronMasks | FoldedNeurons, x: torch.Tensor, y: torch.Tensor,
                g: torch.Generator) -> None:
        """Adversarial neuron noise in ``nm`` (left switched on) from one batch of ``x``, ``y``."""
        idx = torch.randint(len(x), (self.batch_size,), generator=g).to(x.device)
        xb, yb = x[idx], y[idx]
        noise = nm.noise_w + nm.noise_b
        with torch.no_grad():
            for t in noise:
                t.copy_((torch.rand(t.shape, generator=g) * (2 * self.eps) - self.eps).to(t.device))
        nm.perturbed = True
        step = self.eps / self.steps
        _set_train(model, nm, True)  # batch statistics, running ones re-estimated (the reference's model.train())
        try:
            for _ in range(self.steps):
                for t in noise:
                    t.requires_grad_(True)
                grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), noise)
                with torch.no_grad():
                    for t, gr in zip(noise, grads):
                        t.add_(step * gr.sign())
                        if self.project:
                            t.clamp_(-self.eps, self.eps)
                for t in noise:
                    t.requires_grad_(False)
        finally:
            _set_train(model, nm, False)

    def scan(self, ctx: DefenseContext) -> ScanResult:
        t0 = time.perf_counter()
        check(len(ctx.clean) >= 2, f"{WHO} needs at least 2 clean holdout images, got {len(ctx.clean)}")
        model = _grad_module(ctx)
        pool = _global_pool(model)
        tail = _tail(model, pool)
        units, kind = _neurons(model)
        dev = ctx.device
        x = ctx.clean.float().to(dev)
        y = ctx.clean.y.long().to(dev)
        g = ctx.generator
        n_opt = len(x) if self.n_images is None else min(self.n_images, len(x))
        opt_idx = torch.randperm(len(x), generator=g)[:n_opt].to(dev)
        grab = _Features(model, pool)
        nm = NeuronMasks(model, units, dev) if kind == "batchnorm" else FoldedNeurons(model, units, x[opt_idx])
        try:
            z_clean = _feature_maps(model, grab, x)  # unperturbed, eval mode
            acc_clean = float((_predict(tail, z_clean, None) == y).float().mean())
            mask, l_pos, l_neg = self.learn_mask(tail, z_clean[opt_idx], y[opt_idx], g)
            self.perturb(model, nm, x[opt_idx], y[opt_idx], g)
            z_noise = _feature_maps(model, grab, x)  # noised, eval mode
        finally:
            nm.remove()
            grab.remove()
        preds = {"noise": _predict(tail, z_noise, None), "noise-negative": _predict(tail, z_noise, 1 - mask)}
        stats = {k: _distribution(p, y, ctx.num_classes) for k, p in preds.items()}
        acc, top, _, dist = stats[self.decide_on]
        verdict = acc < self.acc_threshold
        metrics: dict[str, Any] = {
            "verdict": verdict, "target": top if verdict else None, "decide_on": self.decide_on,
            "acc_threshold": self.acc_threshold, "acc_clean": acc_clean}
        for k, key in (("noise", "noise"), ("noise-negative", "noise_negative")):
            metrics.update({f"acc_{key}": stats[k][0], f"top_label_{key}": stats[k][1],
                            f"top_share_{key}": stats[k][2]})
        metrics.update({
            "loss_positive": l_pos, "loss_negative": l_neg, "mask_mean": float(mask.mean()),
            "feature_layer": pool, "feature_shape": list(mask.shape), "neurons": kind, "neuron_layers": len(units),
            "n_images": n_opt, "n_eval": len(x), "eps": self.eps, "steps": self.steps, "project": self.project,
            "seconds": time.perf_counter() - t0})
        images = {"feature_mask": mask.float().cpu()[:, None]} if mask.ndim == 3 else {}
        return ScanResult(flagged=[top] if verdict else [], score=1.0 - acc, per_label=dist, images=images,
                          metrics=metrics)


def _distribution(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[float, int, float, list[float]]:
    """``(accuracy, most predicted label, share of the images of other labels predicted as it,
    share of all images predicted as each label)`` of predictions ``pred`` against labels ``y``."""
    pred, y = pred.cpu(), y.cpu()
    counts = torch.bincount(pred, minlength=num_classes)[:num_classes].float()
    top = int(counts.argmax())
    others = y != top
    share = float((pred[others] == top).float().mean()) if bool(others.any()) else float("nan")
    return float((pred == y).float().mean()), top, share, (counts / max(len(y), 1)).tolist()


__all__ = ["BAN", "FoldedNeurons"]
