"""Spectral Signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018;
reference code github.com/MadryLab/backdoor_data_poisoning, ``compute_corr.py``).

Per label ``k``, the learned representations ``R`` (``n_k x D``) of the training samples carrying
that label are centred, ``M = R - mean(R)``; the top right singular vector ``v`` of ``M`` is the
direction along which a poisoned sub-population shifts the class, and each sample's outlier score
is its squared projection ``tau_i = ((R_i - mean(R)) . v)^2`` (the paper's Algorithm 1). The
``round(1.5 * eps * n_k)`` highest-scoring samples of every class are removed, ``eps`` being the
assumed upper bound on the poisoned fraction. ``eps=0.1`` by default: BackdoorBench's spectral
defense removes the top 15% per class (``percentile: 85`` in ``config/defense/spectral/*.yaml``),
i.e. ``1.5 * 0.1``. (The reference ``compute_corr.py`` ranks ``|v . R_i|`` on uncentred
representations; here the centred score of the paper is used.)

Representations: ``ctx.clf.features(x)``, the deployed artifact's penultimate activations (black
box, ``FEATURES``). ``scores`` are the raw ``tau_i`` (comparable within a class; across classes
they carry each class's scale), ``removed`` the per-class top ``1.5 * eps`` share.

Model-level verdict (**backdoorlab's rule, not the paper's**, which makes none): a poisoned
sub-population concentrates a class's variance in one direction. Per class, the spectral
statistic is ``s_k = sigma_1^2 / sum_j sigma_j^2`` of ``M`` (the share of the class's variance
along ``v``); across the classes with at least ``min_class_size`` samples (smaller classes have
spiky spectra by sampling alone and get no verdict), the MAD anomaly index
``(s_k - median) / (1.4826 * MAD)`` is computed and classes above ``anomaly_threshold=2`` (high
side only) are flagged; ``detected = bool(flagged)``.

Retraining (the paper's Section 4 evaluates the network trained again on the data that survive
the removal): in a study cell the filter's row carries ``ca_after_retrain``, ``asr_after_retrain``
and ``ra_after_retrain`` of the model trained from scratch with the cell's recipe on the kept
samples and deployed as the cell deploys (:func:`~backdoorlab.defenses.evaluate.run_defense`;
``retrain: false`` skips it). Outside a study (no recipe in the context) the row says it was skipped.

Limitation (from the paper's analysis): the signature needs the poisoned samples to be a minority
of their class (``eps`` small); when they are the majority, the clean minority becomes the outlier.
"""

from __future__ import annotations

import torch

from ...classifier import Capability
from ...errors import check
from ..base import DEFENSES, DefenseContext, Filter, FilterResult
from .common import mad_index, penultimate_features, training_set


@DEFENSES.register("spectral-signatures")
class SpectralSignatures(Filter):
    """Spectral Signatures filter.

    ``eps``: assumed poisoned fraction per class, in (0, 2/3); ``round(1.5 * eps * n_k)`` samples
    are removed from each class of ``n_k`` samples. ``anomaly_threshold``: MAD anomaly index above
    which a class is flagged (backdoorlab's verdict rule). ``min_class_size``: classes with fewer
    samples get no verdict. ``batch_size``: images per forward pass when reading features.
    """

    minority_assumption = True
    retrain = True  # the paper's last step: train again on the kept samples (option ``retrain``)

    name = "spectral-signatures"
    black_box = frozenset({Capability.FEATURES})

    def __init__(self, eps: float = 0.1, anomaly_threshold: float = 2.0, min_class_size: int = 50,
                 batch_size: int = 512):
        check(isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 2 / 3,
              f"spectral-signatures: eps must be in (0, 2/3) so that 1.5 * eps < 1, got {eps!r}")
        check(isinstance(anomaly_threshold, (int, float)) and not isinstance(anomaly_threshold, bool)
              and anomaly_threshold > 0,
              f"spectral-signatures: anomaly_threshold must be > 0, got {anomaly_threshold!r}")
        check(isinstance(min_class_size, int) and not isinstance(min_class_size, bool) and min_class_size >= 2,
              f"spectral-signatures: min_class_size must be an integer >= 2, got {min_class_size!r}")
        check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
              f"spectral-signatures: batch_size must be an integer >= 1, got {batch_size!r}")
        self.eps = float(eps)
        self.anomaly_threshold = float(anomaly_threshold)
        self.min_class_size = min_class_size
        self.batch_size = batch_size

    def filter(self, ctx: DefenseContext) -> FilterResult:
        train = training_set(ctx, self.name)
        feats = penultimate_features(ctx.clf, train, self.batch_size, who=self.name)
        y = train.y.cpu()
        n = len(y)
        scores = torch.zeros(n, dtype=torch.float64)
        removed = torch.zeros(n, dtype=torch.bool)
        share = torch.full((ctx.num_classes,), float("nan"), dtype=torch.float64)
        for k in range(ctx.num_classes):
            idx = torch.nonzero(y == k).flatten()
            if len(idx) < 2:
                continue
            m = feats[idx] - feats[idx].mean(0, keepdim=True)
            _, s, vh = torch.linalg.svd(m, full_matrices=False)
            tau = (m @ vh[0]) ** 2
            scores[idx] = tau
            n_rm = int(round(1.5 * self.eps * len(idx)))
            if n_rm > 0:
                removed[idx[torch.topk(tau, n_rm).indices]] = True
            total = float((s ** 2).sum())
            if len(idx) >= self.min_class_size and total > 0:
                share[k] = float(s[0] ** 2) / total
        index = mad_index(share)
        flagged = [k for k in range(ctx.num_classes) if bool(index[k] > self.anomaly_threshold)]
        return FilterResult(
            scores=scores.float(), removed=removed, flagged=flagged, detected=bool(flagged),
            metrics={"ss_variance_share": [round(float(v), 4) for v in share],
                     "ss_anomaly_index": [round(float(v), 4) for v in index],
                     "ss_max_anomaly_index": float(torch.nan_to_num(index, nan=float("-inf")).max())})
