"""SFD, symmetric feature differencing (Liu, Tao, Shen, Xu, Cheng, Ma, Zhang, "Complex Backdoor
Detection by Symmetric Feature Differencing", CVPR 2022; the method is Ex-Ray, arXiv:2103.08820):
is a reverse-engineered trigger a natural feature of its target class or an injected backdoor?

Normally trained models have natural backdoors (Tao et al., 2022): small input patterns that flip
one class to a similar one. A trigger scanner finds them too, and flags clean models. SFD takes each
trigger an upstream scanner reports (victim class ``V`` -> target ``T``) and asks whether it works
through the features that naturally tell ``V`` from ``T``. *Symmetric feature differencing* between
two paired sets of inner representations ``A`` and ``B`` is the smallest mask ``m`` such that ``A``'s
features with ``B``'s masked ones are classified as ``B``'s label **and** ``B``'s with ``A``'s masked
ones as ``A``'s label: one mask for both directions. SFD computes two such masks: the *class mask*
(``V`` images paired with ``T`` images) and the *trigger mask* (``V`` images paired with themselves
stamped with the trigger). The trigger is natural when the two masks share their features or each
does the other's job; injected otherwise. (It is not a comparison of one-sided mask sizes: one-sided
masks are the paper's ablation baselines. Measured on the tests' GTSRB models, the one-sided class
masks ``V -> T`` / ``T -> V`` are 80 / 36 features for the BadNets pair 0 <- 1 and 73 / 31 for the
same pair on the clean model: their ratio follows the classes, not the backdoor.)

Reference: the authors' ABS + Ex-Ray code (github.com/PurduePAML/Exray, commit a447005, file
``abs_pytorch1_both_batch_inner_both_with_prune.py``: ``test()`` and ``mask_prune_by_neuron_mask()``)
and the paper's appendix (``appendix.pdf`` in the same repository, sections E, G, I):

1. **Triggers** from an upstream scanner (ABS in the paper; NC and K-Arm in appendix E). Here K-Arm
   (:mod:`.k_arm`, its settings in ``k_arm``): pre-screening, then the bandit search; every arm
   whose trigger is below K-Arm's size bound (label-specific ``local``, label-agnostic ``global``)
   is judged, smallest first (``test()`` runs Ex-Ray on every trigger that flips more than 0.99 of
   its best victim class). K-Arm's own input-space symmetric check is not run: SFD takes its place.
   Victim: the arm's; for a label-agnostic arm, the class its trigger flips most often.
2. **Features**: the penultimate representation (``forward_features``, or the input of the last
   linear step of an int8 surrogate or ONNX replay; :func:`split_features_head`), so it runs on
   every deployed artifact. The authors use the ReLU'd output of the second-to-last convolution
   with one mask entry per channel (``sample_layers[-2:-1]``; appendix I, Table 11: the
   second-to-last layer works best); ``layer="body.<i>"`` gives that on an ``ImageClassifier``
   with a sequential body (small-cnn: ``body.16``, 128 channels at 8x8).
3. **A symmetric mask** (``mask_prune_by_neuron_mask``, ``loss_option = 0``): ``m = tanh(w) / 2 +
   0.5`` with ``w = 4`` at the start (every feature swapped); Adam, ``lr = 5e-2``
   (``prune_mask_lr``), mini-batches of ``batch_size = 10`` pairs (``prune_batch_size``), ``epochs =
   400`` (``prune_epochs``), pairs reshuffled every epoch. Loss per mini-batch: ``|m|_1`` plus, for
   each direction whose batch is not entirely flipped, ``weight = 10`` times minus the summed logit
   margin of the wanted label over the other (``add_loss_1``, ``add_loss_2``). The mask kept is the
   smallest ``|m|_1`` at an epoch's end whose last mini-batch flipped entirely both ways.
4. **Decision** (after the two masks; ``beta = 0.8``, ``gamma = 0.8``, appendix G; 0.4 in the
   code). ``s_class = |min(m_c, m_t)|_1 / |m_c|_1`` and ``s_trigger = |min(m_c, m_t)|_1 / |m_t|_1``;
   the cross-checks are the flip rates of the trigger mask on the class pairs (``V -> T``,
   ``T -> V``) and of the class mask on the trigger pairs (``V -> T``, stamped ``-> V``). Natural if
   ``s_class > beta``, or ``s_trigger > beta``, or ``s_class > s_trigger`` and a class-mask
   cross-check ``>= gamma``, or ``s_trigger > s_class`` and a trigger-mask cross-check ``>= gamma``,
   or three cross-checks ``>= gamma``, or all four ``>= 0.4``; injected otherwise.

Deviations:

* **Layer**: penultimate by default (above); ``layer`` selects the authors'.
* **alpha**: appendix G names alpha = 0.1, controlling "the weight changes of cross-entropy loss";
  the released code has no alpha: a fixed weight (10, or 0 once the batch is flipped) on the logit
  margin, which is followed here (``weight``).
* **Images**: the code pairs all images of the two labels and requires each mini-batch to keep the
  flip rate of the first epoch (``base_acc``, where the near-full mask gives every image its
  partner's prediction); here only the images the model classifies as their label, and the victim
  images the trigger flips, enter the pairs, so that rate is 1 by construction, and the first epoch
  updates the mask too (the code's only measures).
* **Pairing**: the code pairs the ``i``-th images of the two classes (TrojAI gives the same number
  per class); here ``max(n_V, n_T)`` pairs, the smaller set repeated, both in random order.
* **Trigger**: ABS stamps with its mask binarised (``mask**2 > 0.01``); K-Arm's soft mask is used as
  it is, ``(1 - m) * x + m * p``. :func:`symmetric_feature_differencing` also takes any stamping
  function (e.g. an attack's ``apply``).

Measured on the tests' GTSRB subset (small-cnn; ``tests/defenses/test_sfd.py``; each judgement on
the holdout plus the test images of the two classes, ~125 pairs, 2 s at the penultimate layer and
~20 s at ``body.16`` on one CPU thread). Source-specific BadNets (sources 1, 2 -> 0, 3x3 corner
patch): with the attack's own trigger, 0 <- 1 reads injected (trigger mask 38.7 of 256 features,
overlaps 0.30 / 0.64), 0 <- 2 natural (its trigger mask lies 0.86 within the class mask; injected
at ``body.16``). K-Arm's triggers for 0 <- 1 reverse-engineered on the holdout: after 40 rounds a
161-pixel central blob that flips 59% of class 1 on the clean model too reads natural; after 100
rounds (15 pixels, flips nothing on the clean model) natural, a miss; after 300 (7.8 pixels)
injected. The scanner with pre-screening cut to the arms aiming at 0: one suspect, 4.7 pixels in
the corner for victim 2, natural at the penultimate layer, injected (flagged) at ``body.16``. Clean
model: its most confused pair (speed limit 80 read as 50) has a 3.2-pixel K-Arm trigger, below
K-Arm's bound: natural (overlaps 0.93 / 0.88, every cross-check >= 0.97); pair 27 <- 18 too. With K-Arm's
default budget the scanner finds no trigger under the bound on either model (1000 rounds spread
over 118 / 125 arms) and flags nothing, like K-Arm.

Gradients: everything runs on ``pick(ctx.clf, GRAD)`` (the artifact, or an int8 artifact's
fake-quant surrogate) with its parameters frozen; the penultimate split of an FX surrogate or an
ONNX replay reproduces its logits exactly.

Output (:class:`~backdoorlab.defenses.base.ScanResult`): ``flagged`` = the targets of the triggers
judged injected (smallest trigger first); ``score`` = the largest ``bound / size`` among them (K-Arm's
evidence, ``> 1`` exactly when something is flagged; 0 otherwise); ``per_label`` the same per target;
no images. ``metrics``: ``verdict``, ``target`` (the first flagged label or ``None``), ``victims``
(its victims judged injected), ``natural`` (per trigger judged natural: ``target``, ``victim``,
``class_mask_size``, ``trigger_mask_size`` (L1 norms of the two symmetric masks), ``overlap_class``,
``overlap_trigger`` (``s_class``, ``s_trigger``), ``cross_checks``, ``rule``), ``pairs`` (every
judged trigger: the full dict of :func:`symmetric_feature_differencing` with ``evidence`` =
``bound / size``, K-Arm's; ``verdict`` ``None`` with the reason where a class had no usable image),
``trigger_type``, ``arms``, ``rounds_used``, ``bounds`` and ``seconds``.
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...classifier import Capability, Classifier, TorchClassifier
from ...errors import BackdoorLabError, check
from ..base import DEFENSES, DefenseContext, Scanner, ScanResult, pick
from ..removers.ft import check_int, check_number
from .k_arm import AGNOSTIC, SPECIFIC, KArm, _softmax, pre_screen
from .neural_cleanse import EVAL_BATCH, _gradient_model

NATURAL, INJECTED = "natural", "injected"
MASK_INIT = 4.0  # mask = np.zeros((1, C, 1, 1)) + 4 in tanh space: every feature swapped at the start
CROSS_LOW = 0.4  # np.sum(accs >= 0.4) >= 4: every cross-check at 0.4 or more also means natural


# ------------------------------------------------------------------------ features and head
class _Part(nn.Module):
    """A callable piece of a model (features or head), kept as a module for ``.to``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _fx_piece(gm: fx.GraphModule, start: fx.Node | None, end: fx.Node, who: str) -> fx.GraphModule:
    """The part of ``gm`` computing ``end``: from the graph's input (``start`` ``None``) or from
    ``start``, which becomes the piece's one input. One-line error if ``end`` needs the graph's
    input other than through ``start``."""
    need: set[fx.Node] = set()
    todo = [end]
    while todo:
        n = todo.pop()
        if n in need or n is start:
            continue
        if n.op == "placeholder" and start is not None:
            raise BackdoorLabError(f"{who}: the model's head reads the input other than through its features")
        need.add(n)
        todo += list(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = graph.placeholder("features")
    for n in gm.graph.nodes:
        if n in need:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[end])
    piece = fx.GraphModule(gm, graph)
    piece.graph.eliminate_dead_code()
    piece.recompile()
    return piece


def _fx_split(gm: fx.GraphModule, who: str) -> tuple[nn.Module, nn.Module]:
    """Split a traced graph at the input of its last linear step (a module holding an
    ``nn.Linear``, or ``F.linear`` / matmul / ``addmm``)."""
    linear_fns = {F.linear, torch.matmul, torch.addmm, operator.matmul}
    last = None
    for n in gm.graph.nodes:
        if n.op == "call_module" and any(isinstance(m, nn.Linear) for m in gm.get_submodule(n.target).modules()):
            last = n
        elif n.op == "call_function" and n.target in linear_fns:
            last = n
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    logits = out[0] if isinstance(out, (tuple, list)) else out
    check(last is not None and isinstance(logits, fx.Node), f"{who}: no linear last layer found in the traced model")
    feat = last.args[1] if last.target is torch.addmm else last.args[0]
    check(isinstance(feat, fx.Node), f"{who}: the last linear layer has no traced input")
    return _fx_piece(gm, None, feat, who), _fx_piece(gm, feat, logits, who)


def _onnx_split(mod: nn.Module, who: str) -> tuple[nn.Module, nn.Module]:
    """Split an ONNX replay (:class:`~backdoorlab.compress.surrogate.OnnxQDQModule`) at the
    first input of its last Gemm / MatMul step: its steps up to that tensor, and the steps from
    it to the first output (the logits)."""
    from ...compress.surrogate import _ONNX_OPS

    steps = mod.steps
    idx = [i for i, s in enumerate(steps) if s[0] in ("Gemm", "MatMul")]
    check(bool(idx), f"{who}: the ONNX graph has no Gemm or MatMul step to split at")
    cut = steps[idx[-1]][1][0]
    made = {o: i for i, s in enumerate(steps) for o in s[2]}
    check(cut in made, f"{who}: the last Gemm / MatMul reads a constant, not features")
    head: set[int] = set()
    todo = [mod.outputs[0]]
    while todo:
        name = todo.pop()
        if name == mod.inputs[0]:
            raise BackdoorLabError(f"{who}: the model's head reads the input other than through its features")
        if name == cut or name in mod._names or name not in made:  # features, constants, optional ""
            continue
        i = made[name]
        if i not in head:
            head.add(i)
            todo += list(steps[i][1])
    head_steps = sorted(head)
    check(min(head_steps) > made[cut], f"{who}: the ONNX graph's logits do not follow its last Gemm / MatMul")

    def run(env: dict[str, Any], which: Sequence[int]) -> None:
        for k, b in mod._names.items():
            env[k] = getattr(mod, b)
        for i in which:
            op, ins, outs, a = steps[i]
            args = [env.get(n) for n in ins]
            res = getattr(mod, a["module"])(args[0]) if op == "FakeQuant" else _ONNX_OPS[op](args, a)
            for o, r in zip(outs, res if isinstance(res, tuple) else (res,)):
                env[o] = r

    def features(x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {"": None, mod.inputs[0]: x}
        run(env, range(made[cut] + 1))
        return env[cut]

    def logits(f: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {"": None, cut: f}
        run(env, head_steps)
        return env[mod.outputs[0]]

    return _Part(features, mod), _Part(logits, mod)


def split_features_head(module: nn.Module, who: str = "sfd",
                        layer: str = "penultimate") -> tuple[nn.Module, nn.Module]:
    """``(features, head)`` with ``head(features(x)) == module(x)`` (the logits).

    ``layer="penultimate"``: ``features`` the penultimate representation ``(N, D)``, from

    * an :class:`~backdoorlab.models.common.ImageClassifier` (``forward_features`` and ``head``);
    * a wrapper with an ``inner`` module (``DualOutput`` of the int8 surrogates, the scan's
      ``_Logits`` of an ONNX replay) around a traced ``fx.GraphModule`` (split at the input of
      its last linear step) or an ``OnnxQDQModule`` (split at the first input of its last Gemm /
      MatMul step);
    * anything else: a one-line :class:`~backdoorlab.errors.BackdoorLabError`.

    ``layer="body.<i>"``: an ``ImageClassifier`` with an ``nn.Sequential`` body split after its
    ``i``-th module (``features`` ``(N, C, H, W)`` maps there; the authors' layer is the output
    of the second-to-last convolution).
    """
    from ...compress.surrogate import OnnxQDQModule
    from ...models.common import ImageClassifier

    if layer != "penultimate":
        parts = layer.split(".")
        ok = (isinstance(module, ImageClassifier) and isinstance(module.body, nn.Sequential) and len(parts) == 2
              and parts[0] == "body" and parts[1].isdigit() and int(parts[1]) < len(module.body) - 1)
        check(ok, f"{who}: layer must be 'penultimate' or 'body.<i>' inside an ImageClassifier's sequential body, "
                  f"got {layer!r}")
        i = int(parts[1])
        front, back = nn.Sequential(module.normalize, *module.body[:i + 1]), nn.Sequential(*module.body[i + 1:])
        return front, nn.Sequential(back, module.head)
    head = getattr(module, "head", None)
    if callable(getattr(module, "forward_features", None)) and isinstance(head, nn.Module):
        return _Part(module.forward_features, module), head
    inner = getattr(module, "inner", module)
    if isinstance(inner, OnnxQDQModule):
        return _onnx_split(inner, who)
    if isinstance(inner, fx.GraphModule):
        return _fx_split(inner, who)
    raise BackdoorLabError(f"{who} needs the penultimate features and the last layer, which a "
                           f"{type(module).__name__} does not expose")


# ------------------------------------------------------------------- symmetric differencing
@dataclass(frozen=True)
class _Hyper:
    epochs: int
    lr: float
    batch_size: int
    weight: float


@dataclass
class FeatureMask:
    """One symmetric feature mask between paired feature sets ``a`` (label ``la``) and ``b``
    (label ``lb``): ``mask`` ``(D,)`` in [0, 1], ``size`` its L1 norm, ``reached`` whether any
    mask smaller than the initial one kept every pair flipped both ways, ``epochs`` run."""

    mask: torch.Tensor
    size: float
    reached: bool
    epochs: int


def _mix(mask: torch.Tensor, into: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``into``'s features with the masked ones taken from ``source`` (``mask`` ``(D,)``, or
    ``(C, 1, 1)`` for ``(N, C, H, W)`` feature maps)."""
    if mask.ndim == 1 and into.ndim > 2:
        mask = mask.view(-1, *([1] * (into.ndim - 2)))
    return mask * source + (1 - mask) * into


@torch.no_grad()
def _flip_rate(head: nn.Module, mask: torch.Tensor, into: torch.Tensor, source: torch.Tensor, label: int) -> float:
    if len(into) == 0:
        return float("nan")
    out = torch.cat([head(_mix(mask, into[i:i + EVAL_BATCH], source[i:i + EVAL_BATCH]))
                     for i in range(0, len(into), EVAL_BATCH)])
    return float((out.argmax(1) == label).float().mean())


def symmetric_mask(head: nn.Module, fa: torch.Tensor, fb: torch.Tensor, la: int, lb: int, hp: _Hyper,
                   generator: torch.Generator) -> FeatureMask:
    """The smallest mask ``m`` such that ``a``'s features with ``b``'s masked ones go to ``lb``
    and ``b``'s with ``a``'s masked ones go to ``la``, for every pair ``(fa[i], fb[i])``
    (``abs_pytorch1_both_batch_inner_both_with_prune.py``, ``mask_prune_by_neuron_mask``, loss
    option 0). Loss per mini-batch: ``|m|_1`` plus, for each direction whose batch is not fully
    flipped, ``weight`` times minus the summed logit margin of the wanted label over the other."""
    dev = fa.device
    shape = (fa.shape[1],) + (1,) * (fa.ndim - 2)  # one entry per feature, or per channel of a feature map
    w = torch.full(shape, MASK_INIT, device=dev, requires_grad=True)
    opt = torch.optim.Adam([w], lr=hp.lr)
    with torch.no_grad():
        best = torch.tanh(w) / 2 + 0.5
    best_size, reached, n = float(best.sum()), False, len(fa)
    for _ in range(hp.epochs):
        order = torch.randperm(n, generator=generator).to(dev)
        for i in range(0, n, hp.batch_size):
            idx = order[i:i + hp.batch_size]
            a, b = fa[idx], fb[idx]
            m = torch.tanh(w) / 2 + 0.5
            o1, o2 = head(_mix(m, a, b)), head(_mix(m, b, a))
            loss = m.sum()
            ok = []
            for out, want, other in ((o1, lb, la), (o2, la, lb)):
                ok.append(bool((out.argmax(1) == want).all()))
                if not ok[-1]:
                    loss = loss - hp.weight * (out[:, want] - out[:, other]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # the authors' check: the epoch's last mini-batch, with the mask it was run with
        size = float(m.detach().sum())
        if all(ok) and size < best_size:
            best, best_size, reached = m.detach().clone(), size, True
    return FeatureMask(best.flatten(), best_size, reached, hp.epochs)


@torch.no_grad()
def _features(model: TorchClassifier, feat: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features ``(N, D)`` (or ``(N, C, H, W)`` maps) as float32, the input prepared as
    ``model.logits`` prepares it (device, dtype, memory format: a fake-quant surrogate's rounding
    depends on the latter)."""
    if len(x) == 0:
        return torch.zeros(0, 0, device=model.device)
    return torch.cat([feat(model._input(x[i:i + EVAL_BATCH])).float() for i in range(0, len(x), EVAL_BATCH)])


@torch.no_grad()
def _argmax(head: nn.Module, f: torch.Tensor) -> torch.Tensor:
    if len(f) == 0:
        return torch.zeros(0, dtype=torch.long, device=f.device)
    return torch.cat([head(f[i:i + EVAL_BATCH]).argmax(1) for i in range(0, len(f), EVAL_BATCH)])


def _pairs(n_a: int, n_b: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs over two sets of different sizes: ``max(n_a, n_b)`` pairs, each set's images
    in a random order, the smaller set repeated cyclically."""
    n = max(n_a, n_b)
    ia, ib = torch.randperm(n_a, generator=generator), torch.randperm(n_b, generator=generator)
    k = torch.arange(n)
    return ia[k % n_a], ib[k % n_b]


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) * x + m * p`` (Neural Cleanse's and K-Arm's trigger)."""
    return (1 - mask) * x + mask * pattern


def decide(class_mask: torch.Tensor, trigger_mask: torch.Tensor, cross: Sequence[float], beta: float,
           gamma: float) -> tuple[str, str]:
    """The decision of ``mask_prune_by_neuron_mask`` (after the optimisation): ``(verdict, rule)``.

    ``cross`` = ``(trigger mask on class data: victim -> target, target -> victim; class mask on
    trigger data: victim -> target, stamped -> victim)``, the flip rates of the cross-checks.
    """
    inter = float(torch.minimum(class_mask, trigger_mask).sum())
    s_class = inter / max(float(class_mask.sum()), 1e-12)
    s_trig = inter / max(float(trigger_mask.sum()), 1e-12)
    t_on_c, c_on_t = cross[:2], cross[2:]
    ok = [c >= gamma for c in cross]
    if s_class > beta:
        return NATURAL, "class features within the trigger's"
    if s_class > s_trig and any(c >= gamma for c in c_on_t):
        return NATURAL, "class mask smaller and it flips the stamped images"
    if s_trig > beta:
        return NATURAL, "trigger features within the class's"
    if s_trig > s_class and any(c >= gamma for c in t_on_c):
        return NATURAL, "trigger mask smaller and it flips the class images"
    if sum(ok) >= 3:
        return NATURAL, "three cross-checks pass"
    if all(c >= CROSS_LOW for c in cross):
        return NATURAL, "every cross-check at 0.4 or more"
    return INJECTED, "trigger features differ from the class features"


def _upstream(k_arm: dict[str, Any] | None, who: str) -> KArm:
    check(k_arm is None or isinstance(k_arm, dict), f"{who}: k_arm must be a mapping of K-Arm settings, got {k_arm!r}")
    try:
        return DEFENSES.build({"name": "k-arm", **(k_arm or {})})
    except BackdoorLabError as exc:
        raise BackdoorLabError(f"{who}: k_arm: {exc}") from None


def _check_mask_settings(who: str, epochs: Any, batch_size: Any, lr: Any, weight: Any, beta: Any,
                         gamma: Any) -> None:
    """The mask optimisation's and the decision's settings, one line naming a bad one."""
    for key, val in (("epochs", epochs), ("batch_size", batch_size)):
        check_int(who, key, val, 1)
    for key, val in (("lr", lr), ("weight", weight)):
        check_number(who, key, val, 0, lo_open=True)
    for key, val in (("beta", beta), ("gamma", gamma)):
        check_number(who, key, val, 0, 1, hi_open=False)


def symmetric_feature_differencing(
        clf: Classifier, x: torch.Tensor, y: torch.Tensor, target: int, victim: int,
        trigger: tuple[torch.Tensor, torch.Tensor] | Callable[[torch.Tensor], torch.Tensor] | None = None, *,
        epochs: int = 400, lr: float = 5e-2, batch_size: int = 10, weight: float = 10.0, beta: float = 0.8,
        gamma: float = 0.8, layer: str = "penultimate", k_arm: dict[str, Any] | None = None,
        generator: torch.Generator | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Natural or injected? SFD's test of one trigger that sends ``victim`` images to ``target``.

    ``clf``: a classifier with GRAD whose module splits into features and head at ``layer``
    (:func:`split_features_head`; the masks have one entry per feature, or per channel of a
    feature map). ``x`` ``(N, C, H, W)`` clean images in [0, 1], ``y`` their
    labels. ``trigger``: ``(mask (1, H, W), pattern (C, H, W))`` in [0, 1], applied as
    ``(1 - m) * x + m * p``; ``None``: reverse-engineered here by K-Arm's label-specific arm
    ``target <- victim`` (settings ``k_arm``, K-Arm's defaults otherwise). See the module
    docstring for the algorithm and the defaults.

    Returns a dict: ``target``, ``victim``, ``verdict`` (``"natural"`` or ``"injected"``),
    ``rule`` (the decision's clause), ``class_mask_size`` / ``trigger_mask_size`` (L1 norms of
    the symmetric masks victim <-> target and victim <-> victim+trigger, out of ``n_features``
    mask entries),
    ``class_reached`` / ``trigger_reached``, ``overlap_class`` / ``overlap_trigger`` (their
    shared L1 over each mask's own), ``cross_checks`` (the four flip rates, see :func:`decide`),
    ``trigger_success`` (share of correctly classified victim images the trigger sends to the
    target), ``n_victim``, ``n_target``, ``n_stamped`` (the images each set of pairs drew on),
    ``own_checks`` (each mask's flip rates on its own pairs, both ways), ``trigger_l1`` (the
    stamping mask's L1 norm; ``None`` for a stamping function), ``trigger_rounds`` (K-Arm rounds, 0
    for a given trigger) and ``seconds``.
    """
    t0 = time.perf_counter()
    who = "sfd"
    check(target != victim, f"{who}: target and victim must differ, got {target} twice")
    _check_mask_settings(who, epochs, batch_size, lr, weight, beta, gamma)
    clf.require(Capability.GRAD, who=who)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x, y = x.float(), y.long().cpu()
    rounds = 0
    if trigger is None:
        arms, rounds = _upstream(k_arm, who).optimise(clf, x, y, [(target, victim)], SPECIFIC, gen, device=device)
        check(bool(arms), f"{who}: no clean image of the victim class {victim}")
        trigger = arms[0].trigger()
    size: float | None = None
    if callable(trigger):
        apply = trigger
    else:
        mask, pattern = (t.detach().float().cpu() for t in trigger)
        size = float(mask.abs().sum())

        def apply(images: torch.Tensor) -> torch.Tensor:
            return stamp(images, mask, pattern)
    with _gradient_model(clf, device if device is not None else clf.device) as model:
        check(isinstance(model, TorchClassifier), f"{who} needs a PyTorch model, got {type(model).__name__}")
        feat, head = split_features_head(model.module, who, layer)
        dev = model.device
        xv, xt = x[y == victim], x[y == target]
        fv, ft = _features(model, feat, xv), _features(model, feat, xt)
        pv, pt = _argmax(head, fv).cpu(), _argmax(head, ft).cpu()
        keep_v = pv == victim
        fv, ft, xv = fv[keep_v.to(dev)], ft[(pt == target).to(dev)], xv[keep_v]
        check(len(fv) > 0 and len(ft) > 0, f"{who}: needs clean images the model classifies as {victim} and as "
                                           f"{target}; has {len(fv)} and {len(ft)}")
        fs = _features(model, feat, apply(xv))
        flipped = (_argmax(head, fs) == target)
        success = float(flipped.float().mean())
        check(bool(flipped.any()), f"{who}: the trigger sends none of the {len(fv)} victim images to {target}")
        hp = _Hyper(epochs, float(lr), batch_size, float(weight))
        ia, ib = _pairs(len(fv), len(ft), gen)
        cv, ct = fv[ia.to(dev)], ft[ib.to(dev)]  # class data: victim <-> target
        sv, ss = fv[flipped], fs[flipped]  # trigger data: victim <-> victim + trigger
        m_class = symmetric_mask(head, cv, ct, victim, target, hp, gen)
        m_trig = symmetric_mask(head, sv, ss, victim, target, hp, gen)
        cross = [_flip_rate(head, m_trig.mask, cv, ct, target), _flip_rate(head, m_trig.mask, ct, cv, victim),
                 _flip_rate(head, m_class.mask, sv, ss, target), _flip_rate(head, m_class.mask, ss, sv, victim)]
        own = [_flip_rate(head, m_class.mask, cv, ct, target), _flip_rate(head, m_class.mask, ct, cv, victim),
               _flip_rate(head, m_trig.mask, sv, ss, target), _flip_rate(head, m_trig.mask, ss, sv, victim)]
    verdict, rule = decide(m_class.mask, m_trig.mask, cross, beta, gamma)
    inter = float(torch.minimum(m_class.mask, m_trig.mask).sum())
    return {
        "target": int(target), "victim": int(victim), "verdict": verdict, "rule": rule,
        "class_mask_size": m_class.size, "trigger_mask_size": m_trig.size, "n_features": int(fv.shape[1]),
        "class_reached": m_class.reached, "trigger_reached": m_trig.reached,
        "overlap_class": inter / max(m_class.size, 1e-12), "overlap_trigger": inter / max(m_trig.size, 1e-12),
        "cross_checks": cross, "own_checks": own, "trigger_success": success, "n_victim": len(fv), "n_target": len(ft),
        "n_stamped": int(flipped.sum()), "trigger_l1": size, "trigger_rounds": rounds,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------ scanner
@DEFENSES.register("sfd")
class SFD(Scanner):
    """SFD / Ex-Ray (Liu et al., CVPR 2022): K-Arm's triggers, each tested for being a natural
    feature of its target class by symmetric feature differencing; a model is flagged for the
    targets of the triggers judged injected. See the module docstring for the algorithm, the
    defaults (the authors' code and appendix) and the deviations.

    ``epochs``, ``lr``, ``batch_size``, ``weight``: the mask optimisation; ``beta``: the mask
    overlap above which a trigger is natural; ``gamma``: the cross-checks' flip rate; ``k_arm``:
    the upstream K-Arm's settings (its defaults otherwise).
    """

    name = "sfd"
    white_box = frozenset({Capability.GRAD})

    def __init__(self, epochs: int = 400, lr: float = 5e-2, batch_size: int = 10, weight: float = 10.0,
                 beta: float = 0.8, gamma: float = 0.8, layer: str = "penultimate",
                 k_arm: dict[str, Any] | None = None):
        who = "sfd"
        check(layer == "penultimate" or re.fullmatch(r"body\.\d+", layer) is not None,
              f"{who}: layer must be 'penultimate' or 'body.<i>', got {layer!r}")
        _check_mask_settings(who, epochs, batch_size, lr, weight, beta, gamma)
        self.karm = _upstream(k_arm, who)
        self.k_arm = dict(k_arm or {})
        self.epochs, self.lr, self.batch_size, self.weight = epochs, float(lr), batch_size, float(weight)
        self.beta, self.gamma, self.layer = float(beta), float(gamma), layer

    def _victim(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor, arm: Any) -> int | None:
        """A label-agnostic trigger's victim: the class (not the target) whose clean images it
        flips most often; ties to the class with more images, then the smaller label."""
        m, p = arm.trigger()
        best: tuple[float, int, int] | None = None
        for v in torch.unique(y).tolist():
            if v == arm.target:
                continue
            xs = x[y == v]
            rate = float((clf.predict(stamp(xs, m, p), EVAL_BATCH) == arm.target).float().mean())
            key = (rate, len(xs), -v)
            if best is None or key > best:
                best = key
        return None if best is None or best[0] == 0 else -best[2]

    def scan(self, ctx: DefenseContext) -> ScanResult:
        t0 = time.perf_counter()
        who = self.name
        check(len(ctx.clean) > 0, f"{who} needs clean holdout images")
        grad_clf, _ = pick(ctx.clf, Capability.GRAD, who=who)
        check(isinstance(grad_clf, TorchClassifier), f"{who} needs a PyTorch model for its gradients")
        split_features_head(grad_clf.module, who, self.layer)  # fails early, before K-Arm runs
        x, y = ctx.clean.float(), ctx.clean.y.long().cpu()
        h, w = x.shape[2:]
        _, bounds, _ = self.karm.scaled(h, w)
        cand = pre_screen(_softmax(ctx.clf, x), self.karm.gamma, self.karm.global_theta, self.karm.local_theta)
        arms, used = [], 0
        if cand.trigger_type is not None:
            arms, used = self.karm.optimise(grad_clf, x, y, cand.arms, cand.trigger_type, ctx.generator,
                                            device=ctx.device)
        bound = bounds["global" if cand.trigger_type == AGNOSTIC else "local"]
        suspects = sorted((a for a in arms if a.best_reg < bound), key=lambda a: a.best_reg)
        pairs: list[dict[str, Any]] = []
        for a in suspects:
            victim = a.victim if a.victim is not None else self._victim(grad_clf, x, y, a)
            if victim is None:
                continue
            try:
                res = symmetric_feature_differencing(
                    grad_clf, x, y, a.target, victim, a.trigger(), epochs=self.epochs, lr=self.lr,
                    batch_size=self.batch_size, weight=self.weight, beta=self.beta, gamma=self.gamma,
                    layer=self.layer, generator=ctx.generator, device=ctx.device)
            except BackdoorLabError as exc:  # too few images of either class to tell: not judged
                pairs.append({"target": a.target, "victim": victim, "verdict": None, "rule": str(exc)})
                continue
            res["evidence"] = bound / a.best_reg
            pairs.append(res)
        injected = [p for p in pairs if p["verdict"] == INJECTED]
        flagged = list(dict.fromkeys(p["target"] for p in injected))
        per_label = [0.0] * ctx.num_classes
        for p in injected:
            per_label[p["target"]] = max(per_label[p["target"]], p["evidence"])
        target = flagged[0] if flagged else None
        keys = ("target", "victim", "class_mask_size", "trigger_mask_size", "overlap_class", "overlap_trigger",
                "cross_checks", "rule")
        metrics = {
            "verdict": bool(flagged), "target": target,
            "victims": [p["victim"] for p in injected if p["target"] == target],
            "natural": [{k: p[k] for k in keys} for p in pairs if p["verdict"] == NATURAL],
            "pairs": pairs, "trigger_type": cand.trigger_type, "arms": len(arms), "rounds_used": used,
            "bounds": bounds, "seconds": time.perf_counter() - t0,
        }
        score = max((p["evidence"] for p in injected), default=0.0)
        return ScanResult(flagged=flagged, score=float(score), per_label=per_label, metrics=metrics)


__all__ = ["SFD", "FeatureMask", "decide", "split_features_head", "stamp", "symmetric_feature_differencing",
           "symmetric_mask"]
