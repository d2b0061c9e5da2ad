"""The aggregation's statistics one at a time, as plain lazy Dask reductions: the reference the one-pass scan
(aggregations/scan.py) is checked against. Production never calls them: the scan computes all of them from
one read of each chunk."""
from __future__ import annotations

from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from aggregations.context import box_mask
from aggregations.heatmaps import encode, merge_partials, merge_tree, to_grouped
from aggregations.pools import Regions


def positive(relevance: da.Array) -> da.Array:
    """The positive part R+ = max(R, 0): evidence for the class, without the counter-evidence."""
    return da.maximum(relevance, 0)


def row_totals(values: da.Array) -> da.Array:
    """(N,) float64 sum over each map."""
    return values.sum(axis=(1, 2), dtype=np.float64)


def region_sums(values: da.Array, regions: Regions) -> da.Array:
    """(N, R) float64 region sums, one Dask task per chunk of rows."""
    if values.shape[1:] != (regions.height, regions.width):
        raise ValueError(f"regions are for {regions.height}x{regions.width} maps, the store has {values.shape[1:]}")
    values = values.rechunk({1: -1, 2: -1})
    return values.map_blocks(regions.sums, drop_axis=[1, 2], new_axis=[1],
                             chunks=(values.chunks[0], (len(regions.names),)), dtype=np.float64)


def object_mask(boxes: np.ndarray | None, mask: da.Array | None, like: da.Array) -> da.Array | None:
    """Lazy (N, H, W) bool object region, chunked like ``like``: the store's masks, else its boxes, else None."""
    if mask is not None:
        return mask.rechunk(like.chunks)
    if boxes is None:
        return None
    _, height, width = like.shape
    lazy_boxes = da.asarray(boxes).astype(np.float32).rechunk((like.chunks[0], -1, -1))
    return lazy_boxes.map_blocks(box_mask, height, width, drop_axis=[1, 2], new_axis=[1, 2],
                                 chunks=(like.chunks[0], (height,), (width,)), dtype=bool)


def _inside_block(block: np.ndarray, inside: np.ndarray) -> np.ndarray:
    masked = np.where(inside, block, np.float32(0))  # exact: a copy with the context zeroed
    out = np.empty((len(block), 3), np.float64)
    out[:, 0] = masked.sum(axis=(1, 2), dtype=np.float64)
    out[:, 1] = np.maximum(masked, 0, out=masked).sum(axis=(1, 2), dtype=np.float64)
    out[:, 2] = inside.mean(axis=(1, 2))
    return out


def inside_sums(relevance: da.Array, inside: da.Array) -> da.Array:
    """(N, 3) float64 per row: relevance inside the object, positive relevance inside, object area fraction."""
    inside = inside.rechunk(relevance.chunks)
    return da.map_blocks(_inside_block, relevance, inside, drop_axis=[1, 2], new_axis=[1],
                         chunks=(relevance.chunks[0], (3,)), dtype=np.float64)


def _block_sums(block: np.ndarray, codes: np.ndarray) -> tuple:
    """Partial sums of one chunk. Rows with code -1 are skipped."""
    present = np.unique(codes[codes >= 0])
    sums = np.zeros((len(present), *block.shape[1:]), np.float64)
    counts = np.zeros(len(present), np.int64)
    for row in np.flatnonzero(codes >= 0):  # one map at a time: in cache, no float64 copy of the chunk
        g = np.searchsorted(present, codes[row])
        sums[g] += block[row]
        counts[g] += 1
    return present, sums, counts


def grouped_sums(values: da.Array, keys: np.ndarray, key_names: Sequence[str],
                 select: np.ndarray | None = None) -> Delayed:
    """Lazy per-group sums of (N, H, W) maps: a Delayed :class:`aggregations.heatmaps.GroupedMaps`.

    ``keys`` (N, k) int: the group of each row; ``select`` (N,) bool: rows to include (e.g. status ok).
    One task per chunk sums its rows per group; a tree of merges adds the partial sums. Chunks without a
    selected row are never read.
    """
    keys = np.asarray(keys, np.int64).reshape(values.shape[0], -1)
    if keys.shape[1] != len(key_names):
        raise ValueError(f"{keys.shape[1]} key columns but names {list(key_names)}")
    codes, unique_keys = encode(keys, select)
    values = values.rechunk({1: -1, 2: -1})
    blocks = values.to_delayed(optimize_graph=False).ravel()
    bounds = np.cumsum((0, *values.chunks[0]))
    partials = [
        dask.delayed(_block_sums, pure=True)(block, codes[start:stop])
        for block, start, stop in zip(blocks, bounds[:-1], bounds[1:])
        if (codes[start:stop] >= 0).any()
    ]
    merged = merge_tree(partials, merge_partials)
    if merged is None:
        merged = (np.zeros(0, np.int64), None, np.zeros(0, np.int64))
    return dask.delayed(to_grouped, pure=True)(merged, tuple(key_names), unique_keys, values.shape[1:])
