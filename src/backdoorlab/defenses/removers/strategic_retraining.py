"""Strategic retraining (Dhonthi, Hahn & Hashemi, "Backdoor Mitigation in Deep Neural Networks via
Strategic Retraining", Formal Methods (FM 2023), LNCS 14000, pp. 635-647; arXiv:2212.07278).

The backdoor-removal method for automotive classifiers (traffic signs) that needs no prior knowledge
of the trigger's shape or distribution, for intentional (poisoned) and unintentional backdoors alike.
It alternates two steps until the network has no trojan neuron left:

1. **Find the backdoor** with ABS (Liu, Lee, Tao, Ma, Aafer, Zhang, "ABS: Scanning Neural Networks
   for Back-doors by Artificial Brain Stimulation", CCS 2019; the authors' code
   ``github.com/naiyeleo/ABS``):

   * *Stimulation analysis.* For each inner neuron (a channel of a sampled layer) and each seed
     image, the channel is set to ``n_samples`` levels ``samp_k * maxv * i / n_samples``
     (``i = 0 .. n_samples-1``, ``maxv`` the layer's largest activation on the seeds) and the rest
     of the network is run on the result. The label whose logit the stimulation raises most (over
     its value at level 0) must be the same label on at least 90% of the seeds; the neuron's score is
     the smallest margin of that rise over the runner-up's, over the seeds of other labels. The
     ``top_n_neurons`` best-scoring neurons are the candidates.
   * *Trigger reverse engineering.* For each candidate a mask ``m`` ``(1, H, W)`` and a pattern
     ``p`` ``(C, H, W)`` (both ``tanh(.)/2 + 1/2`` of free parameters, so in [0, 1]) are optimised
     with Adam (``re_lr``) so that the stamped seeds ``(1 - m) x + m p`` drive the candidate's
     activation up (minus its mean, plus ``1e-4`` times the mean of the layer's other channels);
     once more than ``max_troj_size`` of the image's pixels have mask values above 0.01 the mask's
     sum is penalised with weight ``re_mask_weight`` (twice that above 1.2 times the bound).
   * *Trojan neurons.* The trigger is stamped on the defender's clean holdout: its REASR is the
     share of the images of other labels that go to the label most stamped images go to. A
     candidate is a trojan neuron when its REASR reaches ``reasr_bound``.

2. **Strategic retraining.** For each trojan neuron's trigger, the classes it affects most (the
   ``top_p`` share of the other classes with the highest flip rate to its label when stamped) are
   chosen; their holdout images, stamped with the trigger and keeping their **correct** labels, are
   added to the clean holdout, and the network is fine-tuned on the union. Then ABS runs again on
   the retrained network; the loop stops when ABS finds zero trojan neurons, or after
   ``max_iterations`` rounds of retraining.

**What is grounded and what is inferred.** The paper's full text could not be read from this
machine (no network; the stored summaries give its abstract and an outline: "ABS-based backdoor
identification", "trojan masks", "retraining focused on the most affected classes (top_p)",
"unlearns poisoned patterns while preserving benign accuracy", "zero Trojan neurons within a few
iterations", evaluated on GTSRB against Neural Cleanse). Grounded: the two-step loop, ABS as the
detector (its defaults below are the authors' ``config.json`` and ``abs.py``), stamped images with
correct labels, the focus on the ``top_p`` most affected classes, the stopping rule. Inferred, not
from the paper: the meaning of ``top_p`` as a share of the classes ranked by flip rate (default
0.5), the fine-tuning recipe (SGD, momentum 0.9, ``lr=0.01`` cosine, ``epochs=10`` per round,
``batch_size=64``, weight decay 5e-4, on holdout plus stamped images, random-crop augmentation as
:func:`~backdoorlab.train.fit.fit` does), and ``max_iterations=5``.

**ABS here** (the authors' Keras ``abs.py`` / ``config.json`` unless said): ``samp_k=8``,
``n_samples=5``, ``top_n_neurons=20``, ``max_troj_size`` 64 pixels of a 32x32 image (given here as
the share ``1/16`` of the image, so it scales with the input), ``re_mask_weight=500``,
``re_lr=0.1``, ``re_steps=1000`` full-batch Adam steps, ``reasr_bound=0.8``, seed images 5 per class
(their ``cifar_seed_50``). Departures: the sampled layers are the outputs of the last
``n_layers=2`` stages of the model (their PyTorch TrojAI version samples the last two layers; the
stages are :func:`~backdoorlab.defenses.removers.nad.attention_layers`'); the candidate rule is the
TrojAI version's (label agreed on 90% of the seeds) and takes the best ``top_n_neurons`` overall
(the Keras code caps three per layer first); the mask starts as a square of ``max_troj_size``
pixels at the centre (TrojAI; Keras: top-left corner); reverse engineering batches all candidates
of a layer in one forward pass and draws ``re_batch_size`` seeds per step (all seeds when ``None``,
the Keras default); the REASR label is the mode of the stamped predictions (TrojAI's
``Troj_Label2``) and the REASR is measured on the whole clean holdout.

Everything runs on the FP32 model ``ctx.model`` (a copy; the caller's is never changed); the
repaired model is deployed as the cell deploys (``ctx.redeploy``). Images: ``(N, C, H, W)`` float
in [0, 1]; masks ``(K, 1, H, W)``, patterns ``(K, C, H, W)`` in [0, 1].

Measured on the tests' GTSRB BadNets model (small-cnn, target label 0, 300-image holdout, 43
classes, 2 shared CPU cores) at the test's budget (``seeds_per_class=1``, ``top_n_neurons=5``,
``re_steps=100``, ``re_batch_size=16``, ``max_iterations=1``; 69 s; a scan takes about 23 s of it,
6 s of stimulation): the first scan's 5 candidates (stimulated labels 12, 13, 39, 38, 25) all
reverse to 6x6 triggers that send the stamped holdout to label 0, REASR 0.41-0.90, one above the
0.8 bound (small-cnn pools globally, so a patch at the centre fires the corner trigger's
detectors); one round of retraining on 300 clean + 105 stamped images takes ASR 0.939 -> 0.000 at
FP32 (0.940 -> 0.000 at int8-torch) at a clean-accuracy cost of 4.2 points (0.961 -> 0.919; int8
0.960 -> 0.915), and the second scan finds zero trojan neurons (largest REASR 0.60). The defaults
(20 candidates, 1000 steps, up to 5 rounds) were not run on the CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...classifier import Classifier
from ...data.tensordata import TensorData
from ...errors import BackdoorLabError
from ...train.fit import TrainConfig, fit
from ..base import DEFENSES, DefenseContext, Remover
from ..scanners.sfd import stamp  # (1 - m) x + m p, the trigger Neural Cleanse, K-Arm and ABS share
from .ft import check_int, check_number, check_sgd, start_model
from .nad import attention_layers

WHO = "strategic-retraining"
MASK_EPS = 0.01  # ABS's mask_epsilon: a mask pixel above it counts towards the trigger's size
OTHER_WEIGHT = 1e-4  # ABS's weight on the other channels' activation in the RE loss
AGREE = 0.9  # a candidate raises the same label on this share of the seeds (ABS TrojAI)


class _Split:
    """``model`` cut after the top-level body module ``idx``: ``head_part(x)`` -> activations
    ``(N, C, h, w)``, ``tail_part(a)`` -> logits."""

    def __init__(self, model: nn.Module, idx: int):
        self.model, self.children = model, list(model.body.children())
        self.idx = idx

    def head_part(self, x: torch.Tensor) -> torch.Tensor:
        a = self.model.normalize(x)
        for m in self.children[: self.idx + 1]:
            a = m(a)
        return a

    def tail_part(self, a: torch.Tensor) -> torch.Tensor:
        for m in self.children[self.idx + 1:]:
            a = m(a)
        return self.model.head(a)


def sampled_layers(model: nn.Module, k: int) -> list[int]:
    """Indices (in ``model.body``) of the outputs of the last ``k`` conv stages."""
    try:
        names = attention_layers(model, k)
    except BackdoorLabError as e:
        raise BackdoorLabError(f"{WHO}: {str(e).removeprefix('nad: ')}") from None
    return [int(n.split(".")[1]) for n in names]


def seed_indices(y: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``per_class`` indices of each label in ``y``, drawn with ``generator``."""
    perm = torch.randperm(len(y), generator=generator)
    out, seen = [], {}
    for i in perm.tolist():
        c = int(y[i])
        if seen.get(c, 0) < per_class:
            seen[c] = seen.get(c, 0) + 1
            out.append(i)
    return torch.tensor(sorted(out), dtype=torch.long)


@torch.no_grad()
def stimulate(split: _Split, seeds: torch.Tensor, labels: torch.Tensor, samp_k: float, n_samples: int,
              budget: float = 2e7) -> tuple[torch.Tensor, torch.Tensor]:
    """ABS's stimulation analysis of every channel of one layer on ``seeds`` ``(N, C, H, W)``.

    Returns ``(label, score)``, each ``(channels,)``: the label the channel's stimulation raises on
    most seeds and ABS's score (the smallest margin over the runner-up label, among the seeds of
    other labels that agree; ``-inf`` where fewer than ``AGREE`` of the seeds agree)."""
    a = split.head_part(seeds)
    n, ch = a.shape[:2]
    chunk = max(1, int(budget // (n_samples * a.numel())))  # channels per batch: ~budget floats
    levels = samp_k * float(a.max()) * torch.arange(n_samples, dtype=a.dtype, device=a.device) / n_samples
    top, margin = [], []
    for c0 in range(0, ch, chunk):
        cs = list(range(c0, min(ch, c0 + chunk)))
        h = a.unsqueeze(0).unsqueeze(0).repeat(len(cs), n_samples, 1, 1, 1, 1)  # (k, L, N, C, h, w)
        for j, c in enumerate(cs):
            h[j, :, :, c] = levels.view(-1, 1, 1, 1)
        logits = split.tail_part(h.flatten(0, 2)).view(len(cs), n_samples, n, -1).float()
        rise = logits[:, 1:].amax(1) - logits[:, 0]  # (k, N, classes)
        best = rise.topk(2, dim=-1)
        top.append(best.indices[..., 0])
        margin.append(best.values[..., 0] - best.values[..., 1])
    top_t, margin_t = torch.cat(top), torch.cat(margin)  # (channels, N)
    label = top_t.mode(dim=1).values
    agree = top_t == label[:, None]
    score = torch.where(agree & (labels[None, :] != label[:, None]), margin_t, torch.full_like(margin_t, math.inf))
    score = score.amin(1)
    score = torch.where(score.isinf(), torch.zeros_like(score), score)  # ABS: 0 when no such seed
    score = torch.where(agree.float().mean(1) >= AGREE, score, torch.full_like(score, -math.inf))
    return label, score


@DEFENSES.register("strategic-retraining")
class StrategicRetraining(Remover):
    """Strategic retraining (Dhonthi, Hahn & Hashemi, FM 2023): ABS finds trojan neurons and
    reverses their triggers; the network is fine-tuned on the holdout plus the most affected
    classes' images stamped with those triggers under their correct labels; repeat until ABS finds
    none.

    ABS: ``seeds_per_class`` (seed images per label from the holdout), ``n_layers`` (last conv
    stages sampled), ``samp_k``, ``n_samples`` (stimulation levels), ``top_n_neurons`` (candidates
    reversed), ``max_troj_size`` (share of the image's pixels a trigger may cover, (0, 1]),
    ``re_steps``, ``re_lr``, ``re_mask_weight``, ``re_batch_size`` (seeds per step; ``None``: all),
    ``reasr_bound`` (REASR that makes a candidate a trojan neuron, (0, 1]).
    Retraining: ``top_p`` (share of the other classes stamped per trigger, (0, 1]),
    ``max_iterations``, and the SGD settings ``epochs``, ``lr``, ``batch_size``, ``weight_decay``,
    ``momentum`` of each round's fine-tuning (cosine schedule).
    """

    name = WHO

    def __init__(self, seeds_per_class: int = 5, n_layers: int = 2, samp_k: float = 8.0, n_samples: int = 5,
                 top_n_neurons: int = 20, max_troj_size: float = 0.0625, re_steps: int = 1000, re_lr: float = 0.1,
                 re_mask_weight: float = 500.0, re_batch_size: int | None = None, reasr_bound: float = 0.8,
                 top_p: float = 0.5, max_iterations: int = 5, epochs: int = 10, lr: float = 0.01,
                 batch_size: int = 64, weight_decay: float = 5e-4, momentum: float = 0.9):
        check_int(WHO, "seeds_per_class", seeds_per_class, 1)
        check_int(WHO, "n_layers", n_layers, 1)
        check_number(WHO, "samp_k", samp_k, 0, lo_open=True)
        check_int(WHO, "n_samples", n_samples, 2)
        check_int(WHO, "top_n_neurons", top_n_neurons, 1)
        check_number(WHO, "max_troj_size", max_troj_size, 0, 1, lo_open=True, hi_open=False)
        check_int(WHO, "re_steps", re_steps, 1)
        check_number(WHO, "re_lr", re_lr, 0, lo_open=True)
        check_number(WHO, "re_mask_weight", re_mask_weight, 0)
        if re_batch_size is not None:
            check_int(WHO, "re_batch_size", re_batch_size, 1)
        check_number(WHO, "reasr_bound", reasr_bound, 0, 1, lo_open=True, hi_open=False)
        check_number(WHO, "top_p", top_p, 0, 1, lo_open=True, hi_open=False)
        check_int(WHO, "max_iterations", max_iterations, 1)
        check_sgd(WHO, epochs, lr, batch_size, weight_decay, momentum)
        self.seeds_per_class, self.n_layers = seeds_per_class, n_layers
        self.samp_k, self.n_samples = float(samp_k), n_samples
        self.top_n_neurons, self.max_troj_size, self.re_steps = top_n_neurons, float(max_troj_size), re_steps
        self.re_lr, self.re_mask_weight, self.re_batch_size = float(re_lr), float(re_mask_weight), re_batch_size
        self.reasr_bound, self.top_p, self.max_iterations = float(reasr_bound), float(top_p), max_iterations
        self.epochs, self.lr, self.batch_size = epochs, float(lr), batch_size
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)

    # -- ABS -------------------------------------------------------------------------------------

    def candidates(self, model: nn.Module, seeds: torch.Tensor,
                   labels: torch.Tensor) -> list[tuple[int, int, int, float]]:
        """The ``top_n_neurons`` best ``(layer index, channel, label, score)`` of the stimulation
        analysis, best first."""
        found = []
        for idx in sampled_layers(model, self.n_layers):
            label, score = stimulate(_Split(model, idx), seeds, labels, self.samp_k, self.n_samples)
            found += [(idx, c, int(label[c]), float(score[c])) for c in range(len(score)) if score[c] > -math.inf]
        found.sort(key=lambda t: -t[3])
        return found[: self.top_n_neurons]

    def reverse(self, model: nn.Module, idx: int, channels: list[int], seeds: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ABS's trigger reverse engineering for ``channels`` of layer ``idx``: masks ``(K, 1, H, W)``
        and patterns ``(K, C, H, W)`` in [0, 1]."""
        split = _Split(model, idx)
        k, (n, c, h, w) = len(channels), seeds.shape
        size = self.max_troj_size * h * w
        side = max(1, int(math.sqrt(size) * 0.8))  # the TrojAI version's initial square
        init = torch.full((1, h, w), -4.0)
        top, left = (h - side) // 2, (w - side) // 2
        init[:, top:top + side, left:left + side] = 2.0
        mask_p = init.repeat(k, 1, 1, 1).to(seeds.device).requires_grad_(True)
        pat_p = torch.randn(k, c, h, w, generator=generator).to(seeds.device).requires_grad_(True)
        opt = torch.optim.Adam([mask_p, pat_p], lr=self.re_lr)
        sel = torch.tensor(channels, device=seeds.device)
        bs = n if self.re_batch_size is None else min(n, self.re_batch_size)
        for _ in range(self.re_steps):
            xb = seeds if bs == n else seeds[torch.randperm(n, generator=generator)[:bs].to(seeds.device)]
            m, p = torch.tanh(mask_p) / 2 + 0.5, torch.tanh(pat_p) / 2 + 0.5
            x = (1 - m[:, None]) * xb[None] + m[:, None] * p[:, None]  # (K, B, C, H, W)
            a = split.head_part(x.flatten(0, 1)).float()
            a = a.reshape(k, bs, *a.shape[1:]).mean((1, 3, 4))  # (K, channels): mean activation per channel
            target = a.gather(1, sel[:, None]).squeeze(1)
            others = (a.sum(1) - target) / max(1, a.shape[1] - 1)
            nz = (m > MASK_EPS).flatten(1).sum(1).float()
            msum = m.flatten(1).sum(1)
            weight = torch.where(nz > 1.2 * size, 2 * self.re_mask_weight,
                                 torch.where(nz > size, self.re_mask_weight, 0.0))
            loss = (-target + OTHER_WEIGHT * others + weight * msum).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return torch.tanh(mask_p) / 2 + 0.5, torch.tanh(pat_p) / 2 + 0.5

    @torch.no_grad()
    def _predict(self, model: nn.Module, x: torch.Tensor, bs: int = 512) -> torch.Tensor:
        return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])

    def scan(self, model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
             generator: torch.Generator) -> list[dict[str, Any]]:
        """ABS on ``model`` (eval mode): every candidate with its reversed trigger, label and REASR
        on the holdout, and the per-class flip rates ``(classes,)`` (NaN where a class has no image)."""
        model.eval()
        for q in model.parameters():
            q.requires_grad_(False)
        idx = seed_indices(clean_y, self.seeds_per_class, generator).to(clean_x.device)
        seeds, labels = clean_x[idx], clean_y[idx]
        cands = self.candidates(model, seeds, labels)
        out: list[dict[str, Any]] = []
        by_layer: dict[int, list[tuple[int, int, int, float]]] = {}
        for cand in cands:
            by_layer.setdefault(cand[0], []).append(cand)
        classes = int(clean_y.max()) + 1
        for layer, group in by_layer.items():
            masks, patterns = self.reverse(model, layer, [g[1] for g in group], seeds, generator)
            for (li, ch, lab, score), m, p in zip(group, masks, patterns):
                pred = self._predict(model, stamp(clean_x, m, p))
                target = int(pred.mode().values)
                other = clean_y != target
                reasr = float((pred[other] == target).float().mean()) if other.any() else 0.0
                flip = torch.full((classes,), float("nan"))
                for cl in clean_y.unique().tolist():
                    sel = clean_y == cl
                    flip[cl] = float((pred[sel] == target).float().mean())
                out.append({"layer": li, "channel": ch, "stim_label": lab, "score": score, "label": target,
                            "reasr": reasr, "mask": m, "pattern": p, "flip": flip,
                            "mask_pixels": int((m > MASK_EPS).sum())})
        for q in model.parameters():
            q.requires_grad_(True)
        return out

    # -- retraining --------------------------------------------------------------------------------

    def retraining_set(self, trojans: list[dict[str, Any]], clean_x: torch.Tensor,
                       clean_y: torch.Tensor) -> tuple[TensorData, int]:
        """The clean holdout plus, per trigger, the ``top_p`` most affected other classes' images
        stamped with it under their correct labels; also the number of stamped images."""
        xs, ys, n_stamped = [clean_x.cpu()], [clean_y.cpu()], 0
        for t in trojans:
            flip = t["flip"].clone()
            flip[t["label"]] = float("nan")
            present = (~flip.isnan()).nonzero().squeeze(1)
            n_top = max(1, math.ceil(self.top_p * len(present)))
            order = present[flip[present].argsort(descending=True)][:n_top]
            sel = torch.isin(clean_y.cpu(), order)
            xs.append(stamp(clean_x.cpu()[sel], t["mask"].cpu(), t["pattern"].cpu()))
            ys.append(clean_y.cpu()[sel])
            n_stamped += int(sel.sum())
        return TensorData(torch.cat(xs).contiguous(), torch.cat(ys)), n_stamped

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           nesterov=False, weight_decay=self.weight_decay, schedule="cosine")

    def repair(self, ctx: DefenseContext) -> tuple[Classifier, dict[str, Any]]:
        model = start_model(ctx, WHO)
        sampled_layers(model, self.n_layers)  # fail early on an architecture without conv stages
        clean_x, clean_y = ctx.clean.float().to(ctx.device), ctx.clean.y.to(ctx.device)
        history: list[dict[str, Any]] = []
        rounds = 0
        while True:
            found = self.scan(model, clean_x, clean_y, ctx.generator)
            trojans = [f for f in found if f["reasr"] >= self.reasr_bound]
            history.append({"candidates": len(found), "trojan_neurons": len(trojans),
                            "reasr": [round(f["reasr"], 4) for f in found],
                            "labels": [f["label"] for f in trojans]})
            if not trojans or rounds >= self.max_iterations:
                break
            data, n_stamped = self.retraining_set(trojans, clean_x, clean_y)
            history[-1]["stamped_images"] = n_stamped
            model = fit(model, data, self.config(), generator=ctx.generator, device=ctx.device,
                        progress=ctx.progress).model
            rounds += 1
        facts = {"iterations": rounds, "trojan_neurons_per_scan": [h["trojan_neurons"] for h in history],
                 "trojan_neurons_final": history[-1]["trojan_neurons"],
                 "stamped_images_per_round": [h.get("stamped_images", 0) for h in history[:rounds]],
                 "max_reasr_per_scan": [max(h["reasr"], default=0.0) for h in history],
                 "trojan_labels_per_scan": [sorted(set(h["labels"])) for h in history],
                 "holdout_size": len(ctx.clean), "epochs": self.epochs, "lr": self.lr, "top_p": self.top_p,
                 "reasr_bound": self.reasr_bound}
        return ctx.deploy(model), facts


__all__ = ["StrategicRetraining", "sampled_layers", "seed_indices", "stamp", "stimulate"]
