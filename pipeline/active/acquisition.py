"""Which pool images to label next: uncertainty from what ships, typicality at a cold start, a diverse batch.

- ``margin``, ``entropy``, ``bald``: baal's heuristics (Apache-2.0) on the shipped model's class
  probabilities over several draws (the fold ensemble's members, or test-time views of one model): margin
  and entropy on their mean, BALD (the members' disagreement) on all of them.
- ``typical``: TypiClust (Hacohen et al., "Active learning on a budget", ICML 2022), for a cold start, where
  uncertainty sampling is known to lose to random: cluster the labelled and pool features into as many
  clusters as there will be labels, and take the most typical image (the densest: the smallest mean distance
  to its nearest neighbours) of each cluster that holds no label yet, largest first.
- ``random``: the baseline every strategy is measured against.
- ``auto``: at a cold start (no trained model, or fewer than ``COLD_START_PER_CLASS`` train labels per class on
  average), typical where the features come from pretrained weights (ImageNet, a domain backbone, the pretrain
  stage) and random where they come from a random init: TypiClust's typicality is density in a feature space
  that means something (the paper clusters self-supervised features), and on features a random init learnt from
  a few dozen labels it lost to random on both measured sets (docs/benchmarks.md, issue 27: PneumoniaMNIST 0.809
  against 0.825 at 40 labels over 3 seeds; EuroSAT 0.299 against 0.364 at 40, still behind at 160). Past the cold
  start, BALD when there are several draws, else margin. The average labels per class, not the least-labelled
  class's: typicality's picks follow the clusters, not the classes, so on EuroSAT a class it rarely picked held
  the whole run at the cold start until 300 labels.

Whatever ranks them, a batch is diverse: no two picks from one near-duplicate set or one group (a DICOM
patient), and at most ``cap`` picks from one cluster of the features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from baal.active.heuristics import BALD, Entropy, Margin
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.neighbors import NearestNeighbors

Strategy = Literal["auto", "typical", "margin", "entropy", "bald", "random"]
STRATEGIES: tuple[str, ...] = ("auto", "typical", "margin", "entropy", "bald", "random")
COLD_START_PER_CLASS = 10  # fewer train labels than this per class on average: typicality, not uncertainty
TYPICAL_NEIGHBOURS = 20  # TypiClust's k
MIN_CLUSTER = 5  # TypiClust leaves out clusters too small to have a typical member


def resolve(
    strategy: Strategy, labels_per_class: Sequence[int] | None, draws: int, pretrained: bool = True
) -> str:
    """The strategy ``auto`` stands for: ``labels_per_class`` None means no trained model; ``pretrained``: the
    features started from pretrained weights (not a random init)."""
    if strategy != "auto":
        return strategy
    cold = labels_per_class is None or sum(labels_per_class) < COLD_START_PER_CLASS * max(
        len(labels_per_class), 1
    )
    if cold:
        return "typical" if pretrained else "random"
    return "bald" if draws > 1 else "margin"


def uncertainty(strategy: str, probs: np.ndarray) -> np.ndarray:
    """Per image, higher = more informative to label: ``probs`` (N, classes, draws) class probabilities."""
    heuristic = {"margin": Margin(), "entropy": Entropy(), "bald": BALD()}[strategy]
    if strategy == "bald" and probs.shape[-1] < 2:
        raise ValueError("bald needs several draws per image (fold members or test-time views)")
    given = probs if strategy == "bald" else probs.mean(axis=-1, keepdims=True)
    scores = np.asarray(heuristic.get_uncertainties(given), dtype=float).reshape(len(probs))
    return scores if heuristic.reversed else -scores  # baal: reversed = the larger, the more uncertain


def typicality(features: np.ndarray, k: int = TYPICAL_NEIGHBOURS) -> np.ndarray:
    """TypiClust's typicality: 1 / the mean Euclidean distance to the k nearest other points."""
    if len(features) < 2:
        return np.ones(len(features))
    k = min(k, len(features) - 1)
    distance, _ = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    return 1.0 / (distance[:, 1:].mean(axis=1) + 1e-12)


def clusters(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels (mini-batch past 5,000 points, as TypiClust does for large pools)."""
    k = max(1, min(k, len(features)))
    algorithm = MiniBatchKMeans if len(features) > 5000 else KMeans
    return algorithm(n_clusters=k, random_state=seed, n_init=3).fit_predict(features)


@dataclass(frozen=True)
class Ranked:
    """Pool images in the order to label them: indices into the pool, a score each and why."""

    order: np.ndarray
    scores: np.ndarray  # per pool image (not per rank): higher was picked first
    reasons: list[str]  # per pool image


def rank_typical(pool: np.ndarray, labelled: np.ndarray, budget: int, seed: int) -> Ranked:
    """TypiClust: the most typical image of each cluster without a label, the largest clusters first; then
    the rest of the pool by typicality within its cluster."""
    both = np.concatenate([labelled, pool]) if len(labelled) else pool
    groups = clusters(both, len(labelled) + budget, seed)
    covered = set(groups[: len(labelled)].tolist())
    in_pool = groups[len(labelled) :]
    scores = np.zeros(len(pool))
    for c in np.unique(in_pool):
        members = np.flatnonzero(in_pool == c)
        scores[members] = typicality(pool[members])
    sizes = np.bincount(in_pool, minlength=groups.max() + 1)
    heads = []  # the most typical member of each uncovered cluster large enough to have one
    for c in np.argsort(-sizes, kind="stable"):
        members = np.flatnonzero(in_pool == c)
        if c in covered or len(members) < min(MIN_CLUSTER, len(pool)):
            continue
        heads.append(members[np.argmax(scores[members])])
    rest = [i for i in np.argsort(-scores, kind="stable") if i not in set(heads)]
    order = np.array(heads + rest, dtype=np.int64)
    reasons = ["typical: the densest image of its cluster"] * len(pool)
    for i in heads:
        reasons[i] = f"typical: the densest image of a cluster of {sizes[in_pool[i]]} with no label yet"
    return Ranked(order, _rank_scores(order), reasons)


def rank_uncertain(strategy: str, probs: np.ndarray) -> Ranked:
    scores = uncertainty(strategy, probs)
    order = np.argsort(-scores, kind="stable")
    what = {"margin": "small margin between the top two classes", "entropy": "high entropy",
            "bald": "the draws disagree (BALD)"}[strategy]  # fmt: skip
    return Ranked(order, scores, [f"{strategy}: {what}"] * len(probs))


def rank_random(n: int, seed: int) -> Ranked:
    order = np.random.default_rng(seed).permutation(n)
    return Ranked(order, _rank_scores(order), ["random"] * n)


def _rank_scores(order: np.ndarray) -> np.ndarray:
    scores = np.empty(len(order))
    scores[order] = np.linspace(1.0, 0.0, len(order)) if len(order) > 1 else 1.0
    return scores


def diverse(ranked: Ranked, budget: int, sets: np.ndarray, features: np.ndarray, seed: int) -> list[int]:
    """The first ``budget`` of ``ranked.order`` with no two from one of ``sets`` (near-duplicate sets and
    groups joined: a set id per pool image) and at most ``cap`` from one cluster of ``features``
    (k = the budget, at most 50: cap = ceil(2 x budget / k)). If the caps leave the batch short, it is filled
    with the best remaining images of unseen sets."""
    budget = min(budget, len(np.unique(sets)))
    k = max(1, min(budget, 50, len(features)))
    cluster = clusters(features, k, seed) if k > 1 else np.zeros(len(features), dtype=int)
    cap = math.ceil(2 * budget / k)
    picks: list[int] = []
    taken_sets: set[int] = set()
    per_cluster = np.zeros(cluster.max() + 1, dtype=int)
    for capped in (True, False):
        for i in ranked.order:
            if len(picks) == budget:
                return picks
            if sets[i] in taken_sets or (capped and per_cluster[cluster[i]] >= cap):
                continue
            picks.append(int(i))
            taken_sets.add(int(sets[i]))
            per_cluster[cluster[i]] += 1
    return picks
