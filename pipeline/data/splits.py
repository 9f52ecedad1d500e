"""Train/val/test and k-fold assignment: stratified by label, and never cutting through a unit.

A unit is a set of images that must stay together: one ``group`` (patient, site, tile) and every
exact or near duplicate of its members. With every image its own unit the split is the plain
stratified shuffle; otherwise units are placed greedily, largest first, where their labels are most
missing. sklearn's StratifiedGroupKFold does the latter only for k equal folds, not for val/test
fractions, so the greedy placement (a dozen lines) serves both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def stratified(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Each class shuffled (seeded) and cut by the fractions; at least one image each in val and test."""
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = max(1, round(len(idx) * test_fraction))
        n_val = max(1, round(len(idx) * val_fraction))
        splits[idx[:n_test]] = "test"
        splits[idx[n_test : n_test + n_val]] = "val"
        splits[idx[n_test + n_val :]] = "train"
    return splits


def place_units(labels: np.ndarray, units: np.ndarray, shares: np.ndarray, seed: int) -> np.ndarray:
    """Index of the share (split or fold) each image goes to; every unit goes whole to one share."""
    classes, label_idx = np.unique(labels, return_inverse=True)
    unit_ids, unit_idx = np.unique(units, return_inverse=True)
    counts = np.zeros((len(unit_ids), len(classes)))
    np.add.at(counts, (unit_idx, label_idx), 1)
    totals = counts.sum(0)
    targets = np.outer(shares / shares.sum(), totals)
    order = np.random.default_rng(seed).permutation(len(unit_ids))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]  # largest units first, ties shuffled
    current = np.zeros_like(targets)
    placed = np.empty(len(unit_ids), dtype=np.int64)
    for u in order:
        need = ((targets - current) / totals * counts[u]).sum(1)
        placed[u] = int(np.argmax(need))
        current[placed[u]] += counts[u]
    return placed[unit_idx]


def assign(
    labels: np.ndarray, units: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """'train'/'val'/'test' per image: stratified, and grouped by unit when any unit holds several images."""
    if len(np.unique(units)) == len(units):
        return stratified(labels, val_fraction, test_fraction, seed)
    shares = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    return np.array(SPLITS, dtype=object)[place_units(labels, units, shares, seed)]


def folds(labels: np.ndarray, units: np.ndarray, splits: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold 0..k-1 for train and val images (grouped, stratified), -1 for the test split."""
    fold = np.full(len(labels), -1, dtype=np.int64)
    pool = np.flatnonzero(splits != "test")
    fold[pool] = place_units(labels[pool], units[pool], np.ones(k), seed)
    return fold


def crossing_units(units: np.ndarray, splits: np.ndarray) -> list[np.ndarray]:
    """Indices of each unit whose images sit in more than one split (leakage)."""
    table = pd.DataFrame({"unit": units, "split": splits})
    n_splits = table.groupby("unit")["split"].nunique()
    crossing = set(n_splits.index[n_splits > 1])
    return [np.flatnonzero(units == unit) for unit in sorted(crossing)]
