"""Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava,
"Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", AAAI SafeAI
workshop 2019, arXiv:1811.03728; reference implementation IBM ART ``ActivationDefence``).

The last hidden layer's activations of the training set are split by the label each sample
carries; per class they are reduced to 10 dimensions with ICA and split into two clusters with
k-means. Poisoned samples of a target class activate the network for a different reason (the
trigger) than its clean samples, so the class splits into a large clean cluster and a small,
well-separated poisoned one. Defaults follow ART: ``FastICA(n_components=10, max_iter=1000,
tol=0.005)``, ``KMeans(n_clusters=2)``, and its ``silhouette-scores`` analysis: a class is flagged
when the smaller cluster holds less than 35% of the class (``size_threshold=0.35``, the paper's
relative-size test) **and** the two-cluster silhouette score exceeds 0.1
(``silhouette_threshold=0.1``); ``analysis="relative-size"`` uses the size test alone. The
samples of a flagged class's smaller cluster are the ones removed.

Features: ``ctx.clf.features(x)``, the deployed artifact's penultimate activations (black box,
``FEATURES``), so the filter sees the network as it ships (int8 activations included).

Per-sample score (backdoorlab's, for AUROC; the paper scores clusters, not samples):
``score = q_k * (1 + [sample in the smaller cluster]) / 2`` with the class suspicion
``q_k = max(silhouette_k, 0) * (1 - 2 * r_k)`` in [0, 1), ``r_k`` the smaller cluster's share of
class ``k``. Classes that split into a small, well-separated cluster rank first; within a class
the smaller cluster ranks above the larger one. All values are in [0, 1).

Limitation (from the paper): the rule assumes poisoned samples are a minority of their class. When
they are the majority (e.g. GTSRB with 10% of the training set poisoned into a class holding ~0.5%
of it), the smaller cluster is the clean one, or k-means splits the poisoned majority instead.
"""

from __future__ import annotations

import warnings

import torch

from ...classifier import Capability
from ...errors import check
from ..base import DEFENSES, DefenseContext, Filter, FilterResult
from .common import penultimate_features, seed_from, training_set

ANALYSES = ("silhouette", "relative-size")


@DEFENSES.register("activation-clustering")
class ActivationClustering(Filter):
    """Activation Clustering filter.

    ``nb_dims``: ICA components per class (paper/ART: 10). ``size_threshold``: a smaller cluster
    below this share of its class is suspicious (ART: 0.35). ``silhouette_threshold``: ... and the
    split must have a silhouette score above this (ART: 0.1; ``analysis="silhouette"`` only).
    ``batch_size``: images per forward pass when reading features.
    """

    minority_assumption = True

    name = "activation-clustering"
    black_box = frozenset({Capability.FEATURES})

    def __init__(self, nb_dims: int = 10, size_threshold: float = 0.35, silhouette_threshold: float = 0.1,
                 analysis: str = "silhouette", batch_size: int = 512):
        check(isinstance(nb_dims, int) and not isinstance(nb_dims, bool) and nb_dims >= 1,
              f"activation-clustering: nb_dims must be an integer >= 1, got {nb_dims!r}")
        check(isinstance(size_threshold, (int, float)) and not isinstance(size_threshold, bool)
              and 0 < size_threshold <= 0.5,
              f"activation-clustering: size_threshold must be in (0, 0.5], got {size_threshold!r}")
        check(isinstance(silhouette_threshold, (int, float)) and not isinstance(silhouette_threshold, bool)
              and -1 <= silhouette_threshold < 1,
              f"activation-clustering: silhouette_threshold must be in [-1, 1), got {silhouette_threshold!r}")
        check(analysis in ANALYSES,
              f"activation-clustering: analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}")
        check(isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
              f"activation-clustering: batch_size must be an integer >= 1, got {batch_size!r}")
        self.nb_dims = nb_dims
        self.size_threshold = float(size_threshold)
        self.silhouette_threshold = float(silhouette_threshold)
        self.analysis = analysis
        self.batch_size = batch_size

    def filter(self, ctx: DefenseContext) -> FilterResult:
        import numpy as np
        from sklearn.cluster import KMeans
        from sklearn.decomposition import FastICA
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.metrics import silhouette_score

        train = training_set(ctx, self.name)
        feats = penultimate_features(ctx.clf, train, self.batch_size, who=self.name).numpy()
        y = train.y.cpu().numpy()
        n = len(y)
        scores = np.zeros(n)
        removed = np.zeros(n, dtype=bool)
        rel_size = [float("nan")] * ctx.num_classes
        silhouette = [float("nan")] * ctx.num_classes
        flagged: list[int] = []
        not_converged = 0
        for k in range(ctx.num_classes):
            idx = np.flatnonzero(y == k)
            seed = seed_from(ctx.generator)  # drawn for every class, so results do not shift with data
            if len(idx) < 3:  # two clusters and a silhouette need at least three samples
                continue
            act = feats[idx]
            if act.shape[1] > self.nb_dims and len(idx) > self.nb_dims:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    red = FastICA(n_components=self.nb_dims, max_iter=1000, tol=0.005,
                                  random_state=seed).fit_transform(act)
                not_converged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            else:  # as ART: no reduction when there are not more activations than dimensions
                red = act
            clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(red)
            sizes = np.bincount(clusters, minlength=2)
            if sizes.min() == 0:  # all activations identical: no split
                rel_size[k], silhouette[k] = 0.5, 0.0
                continue
            small = int(sizes.argmin()) if sizes[0] != sizes[1] else 1
            r = float(sizes.min() / sizes.sum())
            sil = float(silhouette_score(red, clusters))
            rel_size[k], silhouette[k] = r, sil
            in_small = clusters == small
            q = max(sil, 0.0) * (1 - 2 * r)
            scores[idx] = q * (1 + in_small) / 2
            suspicious = r < self.size_threshold and (self.analysis == "relative-size"
                                                      or sil > self.silhouette_threshold)
            if suspicious:
                flagged.append(k)
                removed[idx[in_small]] = True
        return FilterResult(
            scores=torch.from_numpy(scores).float(), removed=torch.from_numpy(removed), flagged=flagged,
            detected=bool(flagged),
            metrics={"ac_rel_size": [round(v, 4) for v in rel_size],
                     "ac_silhouette": [round(v, 4) for v in silhouette],
                     "ac_ica_not_converged": not_converged})
