"""Duplicate finding: exact copies by content hash, near copies by a perceptual (difference) hash.

The difference hash (dHash: is each pixel of a 17x16 gray thumbnail brighter than its right-hand
neighbour, 256 bits) is written here rather than taken from ``imagehash``: it is ten lines of numpy on
pixels ingest has already decoded, whereas imagehash wants PIL images and cannot take 16-bit, float or
N-band arrays. 256 bits, not the usual 64: on chest X-rays (PneumoniaMNIST, 3,166 images) the 64-bit
hash puts 12,000 pairs of different radiographs within 4 bits of each other and 27 distinct pairs at
0 bits, while at 256 bits identical images sit at 0 and the nearest distinct pair at 19.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import cv2
import numpy as np

HASH_SIDE = 16  # bits = HASH_SIDE ** 2
MIN_SUBSTRING_BITS = 16  # near_pairs: shorter substrings prune too little; search exhaustively


def dhash(pixels: np.ndarray) -> np.ndarray | None:
    """256 bits (a uint8 0/1 vector) of an (H, W, C) image; None for a flat image, which has no structure."""
    gray = _gray(pixels)
    flat = 1e-3 * max(float(np.abs(gray).max()), 1e-6)
    # std >= (max - min) / sqrt(2n) for any n values: an image clearly above the threshold skips the exact std
    # (the same answer; the margin of 2 is far beyond float32's rounding in numpy's std)
    bound = float(gray.max() - gray.min()) / math.sqrt(2 * gray.size)
    if bound <= 2 * flat and float(gray.std()) <= flat:
        return None
    thumb = cv2.resize(gray, (HASH_SIDE + 1, HASH_SIDE), interpolation=cv2.INTER_AREA)
    return (thumb[:, 1:] > thumb[:, :-1]).astype(np.uint8).ravel()


def _gray(pixels: np.ndarray) -> np.ndarray:
    """The channels' mean as float32, as ``pixels.astype(np.float32).mean(axis=-1)`` gives it, bit for bit.

    For integer pixels the channel sum is an exact integer in float32 (at most 3 x 65535 < 2**24 for RGB,
    fewer than 256 bands of 16 bits), so adding channel planes in any order and dividing once (correctly
    rounded, as numpy's mean does) gives the same values; numpy's reduction over a 3-long last axis is ~6x
    slower on a 64 px tile. Float pixels keep numpy's own summation order.
    """
    if pixels.dtype.kind not in "ui" or pixels.shape[-1] > 255:
        return pixels.astype(np.float32).mean(axis=-1)
    gray = pixels[..., 0].astype(np.float32)
    for c in range(1, pixels.shape[-1]):
        gray += pixels[..., c]
    gray /= np.float32(pixels.shape[-1])
    return gray


def exact_groups(hashes: list[str]) -> list[list[int]]:
    """Indices sharing a content hash, one list per hash seen more than once."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    return [idx for idx in by_hash.values() if len(idx) > 1]


def near_groups(bits: list[np.ndarray | None], max_distance: int, chunk: int = 1 << 20) -> np.ndarray:
    """Near-duplicate set per item: the smallest index of the items linked to it by chains of dHashes at most
    ``max_distance`` bits apart (itself when none is; an item without a hash stands alone).

    Sets, not pairs: N copies of one image are N^2/2 pairs, so a search that collects pairs is quadratic in
    memory (a manifest naming one file 8,000 times took 21 GB). Here identical hashes are collapsed first,
    and near ones are joined in a union-find as they are found, so memory stays linear in the images.

    Multi-index hashing (Norouzi et al., "Fast search in Hamming space with multi-index hashing", CVPR
    2012): the 256 bits are cut into ``max_distance + 1`` (or more) disjoint substrings, and two hashes
    at most ``max_distance`` bits apart agree exactly on at least one of them (pigeonhole). So only
    hashes that share a substring value are compared, found by sorting each substring's values, and a
    pair already in one set is not compared at all: a bucket of near-identical frames is joined in one
    pass. The sets equal the connected components of the exhaustive search's pairs
    (tests/test_validation.py). Written with numpy rather than taken from a library: faiss' binary
    indexes would add a 30 MB dependency and still return pairs. Substrings shorter than
    ``MIN_SUBSTRING_BITS`` (a threshold past 15 bits on 256) match too often to prune, and the exhaustive
    search is used instead. Candidates are compared ``chunk`` at a time, which bounds memory when a
    substring value is shared by many images.
    """
    groups = np.arange(len(bits))
    index = np.array([i for i, b in enumerate(bits) if b is not None], dtype=np.int64)
    if len(index) < 2:
        return groups
    matrix = np.stack([bits[i] for i in index]).astype(bool)
    width = matrix.shape[1]
    parts = max(max_distance + 1, -(-width // 62))  # int64 keys; more parts than needed stay exact
    if width // parts < MIN_SUBSTRING_BITS:
        pairs = near_pairs_exhaustive(bits, max_distance)
        return components(len(bits), [(a, b) for a, b, _ in pairs])
    unique, inverse = np.unique(matrix, axis=0, return_inverse=True)  # identical hashes: 0 bits apart
    sets = _UnionFind(len(unique))
    packed = np.packbits(unique, axis=1)  # (n, 32) bytes: XOR + popcount per candidate pair
    n = len(unique)
    for part in np.array_split(np.arange(width), parts):
        keys = unique[:, part].astype(np.int64) @ (np.int64(1) << np.arange(len(part), dtype=np.int64))
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        bucket = np.repeat(np.arange(len(starts)), sizes)  # each sorted position's bucket
        ends = starts[bucket] + sizes[bucket]
        at = np.flatnonzero(ends - np.arange(n) > 1)  # positions with a later member in their bucket
        step = 1
        while len(at):  # compare each position with the member `step` places after it in its bucket
            roots = sets.roots(order)
            joined = np.minimum.reduceat(roots, starts) == np.maximum.reduceat(roots, starts)
            at = at[~joined[bucket[at]]]  # a bucket whose members are all in one set has nothing to add
            for lo in range(0, len(at), chunk):
                s = at[lo : lo + chunk]
                a, b = order[s], order[s + step]
                apart = sets.roots(a) != sets.roots(b)
                a, b = a[apart], b[apart]
                distance = np.bitwise_count(packed[a] ^ packed[b]).sum(axis=1, dtype=np.int64)
                near = distance <= max_distance
                sets.union(a[near], b[near])
            step += 1
            at = at[ends[at] - at > step]
    root = sets.roots(np.arange(n))[inverse.ravel()]  # each hashed item's set, as a unique-hash root
    smallest = np.full(n, len(bits))
    np.minimum.at(smallest, root, index)
    groups[index] = smallest[root]
    return groups


class _UnionFind:
    """Disjoint sets over 0..n-1 for arrays of links at once; each set's root is its smallest member."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def roots(self, items: np.ndarray) -> np.ndarray:
        found = self.parent[items]
        while True:
            above = self.parent[found]
            if np.array_equal(above, found):
                return found
            found = above

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the sets of each pair (a[i], b[i]): the links' components among the current roots, found
        at once (one vectorized write per call, however many links share a root), then every root of a
        component points at its smallest."""
        ra, rb = self.roots(a), self.roots(b)
        apart = ra != rb
        if not apart.any():
            return
        ra, rb = ra[apart], rb[apart]
        nodes = np.unique(np.r_[ra, rb])
        merged = components(
            len(nodes), np.stack([np.searchsorted(nodes, ra), np.searchsorted(nodes, rb)], axis=1)
        )
        self.parent[nodes] = nodes[merged]
        self.parent = self.roots(np.arange(len(self.parent)))  # path compression: one hop to a root


def near_pairs_exhaustive(
    bits: list[np.ndarray | None], max_distance: int, chunk: int = 256
) -> list[tuple[int, int, int]]:
    """``near_pairs`` by comparing all pairs, in chunks of rows (the reference the index is tested against).

    A +-1 matrix product gives bits - 2 * distance: n^2 work (1e11 multiply-adds at 20,000 images) and a
    few ``chunk`` x N float matrices of memory, on top of the N x 256 hashes themselves.
    """
    index = np.array([i for i, b in enumerate(bits) if b is not None], dtype=np.int64)
    if len(index) < 2:
        return []
    signs = np.stack([bits[i] for i in index]).astype(np.float32) * 2 - 1
    pairs = []
    for start in range(0, len(index), chunk):
        distance = (signs.shape[1] - signs[start : start + chunk] @ signs.T) / 2
        rows, cols = np.nonzero(distance <= max_distance)
        for r, c in zip(rows, cols, strict=True):
            if start + r < c:
                pairs.append((int(index[start + r]), int(index[c]), round(float(distance[r, c]))))
    return pairs


def group_links(groups: Sequence[object]) -> list[tuple[int, int]]:
    """Links tying each item to the first item of its group (an empty-string group is no group), for
    :func:`components`: a patient's images, a near-duplicate set's members."""
    first: dict[object, int] = {}
    links = []
    for i, group in enumerate(groups):
        if isinstance(group, str) and group == "":
            continue
        j = first.setdefault(group, i)
        if j != i:
            links.append((j, i))
    return links


def components(n: int, links: list[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Connected-component id per item of ``n`` given linked pairs (a list, or a (k, 2) array); ids are the
    smallest member."""
    from scipy.sparse import coo_matrix  # here: the decoding workers import this module for dhash alone
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(links, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if n else 0, n)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]
