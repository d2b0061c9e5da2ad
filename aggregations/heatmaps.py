"""Dataset-level heatmaps: the expected relevance E[R_p] over a set of rows (Binder et al. 2016, §2).

Averaging keeps conservation: sum_p E[R_p] = E[sum_p R_p], which is E[f(x)] when the maps conserve
the explained score. :func:`summary` reports the three side by side, so a gap shows whether it is
the explanations (E[sum R] != E[f]) or the aggregation (sum_p E[R_p] != E[sum R]) that leaks.

Maps are summed in float64: the mean over thousands of float32 maps loses several percent in float32.
One pass sums each row into its finest group, e.g. (target, label, prediction); coarser views (per
target, per predicted class, correct / incorrect) are sums of those, computed without re-reading.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np
import pyarrow as pa
from dask.delayed import Delayed

# fan-in of the tree that merges per-chunk partial sums: bounded memory, log depth
MERGE_EVERY = 8


@dataclass
class GroupedMaps:
    """Per group: the sum of its maps (float64) and its row count; group g is ``keys[g]``."""

    key_names: tuple[str, ...]
    keys: np.ndarray  # (G, k) int64
    sums: np.ndarray  # (G, H, W) float64
    counts: np.ndarray  # (G,) int64

    def means(self) -> np.ndarray:
        """(G, H, W) E[R_p] per group."""
        return self.sums / np.maximum(self.counts, 1)[:, None, None]

    def regroup(self, key_names: Sequence[str]) -> GroupedMaps:
        """Coarser groups by a subset of the key columns, summing the finer groups; keys with -1 (unknown) drop out."""
        key_names = tuple(key_names)
        new_keys = self.keys[:, [self.key_names.index(name) for name in key_names]]
        kept = (new_keys >= 0).all(axis=1)
        unique, inverse = np.unique(new_keys[kept], axis=0, return_inverse=True)
        sums = np.zeros((len(unique), *self.sums.shape[1:]))
        np.add.at(sums, inverse.ravel(), self.sums[kept])
        counts = np.bincount(inverse.ravel(), weights=self.counts[kept], minlength=len(unique)).astype(np.int64)
        return GroupedMaps(key_names, unique.reshape(-1, len(key_names)).astype(np.int64), sums, counts)


Partial = tuple  # (codes present, (g, H, W) float64 sums, (g,) counts): the sums of one chunk or subtree


def encode(keys: np.ndarray, select: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows' keys (N, k) -> (per-row group code, -1 where not selected; the (G, k) key of each code)."""
    keys = np.asarray(keys, np.int64).reshape(len(keys), -1)
    select = np.ones(len(keys), bool) if select is None else np.asarray(select, bool)
    codes = np.full(len(keys), -1, np.int64)
    if not select.any():
        return codes, np.zeros((0, keys.shape[1]), np.int64)
    unique_keys, inverse = np.unique(keys[select], axis=0, return_inverse=True)
    codes[select] = inverse.ravel()
    return codes, unique_keys


def merge_partials(*partials: Partial) -> Partial:
    """Add partial sums that share codes; the result is ordered by code, so merging is deterministic."""
    partials = [p for p in partials if len(p[0])]
    if not partials:
        return np.zeros(0, np.int64), None, np.zeros(0, np.int64)
    if len(partials) == 1:
        return partials[0]
    codes = np.unique(np.concatenate([p[0] for p in partials]))
    sums = np.zeros((len(codes), *partials[0][1].shape[1:]))
    counts = np.zeros(len(codes), np.int64)
    for present, part_sums, part_counts in partials:
        where = np.searchsorted(codes, present)
        sums[where] += part_sums
        counts[where] += part_counts
    return codes, sums, counts


def to_grouped(partial: Partial, key_names: Sequence[str], unique_keys: np.ndarray,
               shape: tuple[int, int]) -> GroupedMaps:
    """The merged partial of all chunks as :class:`GroupedMaps`."""
    codes, sums, counts = partial
    if len(codes) == 0:
        sums = np.zeros((0, *shape))
    keys = unique_keys[codes].astype(np.int64).reshape(len(codes), len(key_names))
    return GroupedMaps(tuple(key_names), keys, sums, counts)


def merge_tree(parts: list, merge) -> Delayed | None:
    """Combine per-chunk Delayed results ``MERGE_EVERY`` at a time, in order: bounded memory, log depth."""
    while len(parts) > 1:
        parts = [dask.delayed(merge, pure=True)(*parts[i:i + MERGE_EVERY]) for i in range(0, len(parts), MERGE_EVERY)]
    return parts[0] if parts else None


def summary(maps: GroupedMaps, row_keys: np.ndarray, select: np.ndarray, totals: np.ndarray,
            scores: np.ndarray | None = None, heatmap_sum: np.ndarray | None = None) -> pa.Table:
    """Per group: count, E[f(x)], E[sum_p R_p] and sum_p E[R_p] side by side (the aggregate conservation).

    ``row_keys`` (N, k) are the rows' keys in ``maps.key_names`` order, ``totals`` the rows' float64 map
    sums (of the same values the maps hold) reduced independently of the maps, ``scores`` the explained
    logits f(x) (None for maps of derived values, e.g. positive relevance: no score to compare with).
    ``aggregation_gap`` = sum_p E[R_p] - E[sum_p R_p] (rounding only); ``explanation_gap`` =
    E[sum_p R_p] - E[f(x)] (what the explanations leak or absorb, e.g. through biases or epsilon).
    ``heatmap_sum``: sum_p E[R_p] per group when the caller has the means already (no second copy of the maps).
    """
    row_keys = np.asarray(row_keys, np.int64).reshape(len(select), -1)
    index = {tuple(key): g for g, key in enumerate(maps.keys.tolist())}
    group_of = np.array([index.get(tuple(key), -1) for key in row_keys.tolist()], np.int64)
    rows = np.asarray(select, bool) & (group_of >= 0)
    n = np.bincount(group_of[rows], minlength=len(maps.keys))
    scores = np.full(len(select), np.nan) if scores is None else np.asarray(scores, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(group_of[rows], weights=scores[rows], minlength=len(maps.keys)) / n
        mean_total = np.bincount(group_of[rows], weights=totals[rows], minlength=len(maps.keys)) / n
    heatmap_sum = maps.means().sum(axis=(1, 2)) if heatmap_sum is None else heatmap_sum
    columns = {name: maps.keys[:, i] for i, name in enumerate(maps.key_names)}
    columns.update(count=maps.counts, mean_score=mean_score, mean_total=mean_total, heatmap_sum=heatmap_sum,
                   aggregation_gap=heatmap_sum - mean_total, explanation_gap=mean_total - mean_score)
    return pa.table(columns)
