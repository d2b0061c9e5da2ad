"""The one pass of the aggregation job: every per-row statistic and every partial class map, per chunk.

Each statistic alone (the plain Dask reductions of tests/helpers/reductions.py: row totals, region
sums, inside sums, grouped map sums) is a cheap, memory-bound sweep; as separate Dask tasks they sweep each
51 MB chunk six times, with fresh float32/float64 temporaries each time, and together cost several
times the zarr decompression they follow. Here a chunk is swept a few maps at a time through
preallocated buffers that stay in cache, and every statistic is taken from them: the job then runs at
the speed of reading the store. tests/test_aggregate_job.py checks that this pass and the separate
reductions agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from aggregations import context, heatmaps, pools
from aggregations.pools import Regions

ROW_STATS = ("total", "positive_total", "inside", "inside_positive", "object_area")  # then one column per region
TOTAL, POSITIVE_TOTAL, INSIDE, INSIDE_POSITIVE, OBJECT_AREA = range(len(ROW_STATS))  # column of each
OBJECT = slice(INSIDE, OBJECT_AREA + 1)  # the three columns that need object geometry
REGIONS = len(ROW_STATS)  # first region column
MAPS_PER_STEP = 4  # 4 maps of 224x224 float32 per buffer: 800 kB, cache-resident


@dataclass
class RowStats:
    """Per row of a group, by name: what the scan measured (float64, NaN for rows not scanned) and what follows.

    ``total``/``positive_total``: sums of the stored map and of its positive part; ``inside``,
    ``inside_positive``, ``object_area``: the same inside the object and its area fraction (NaN without
    geometry); ``region_sums`` (N, R) in ``region_names`` order. Derived: ``region_residual`` and
    ``conserved`` (regions add up to the total), ``context_usage`` (inside / total) and
    ``inside_share_positive`` (NaN without an object); ``spot_share`` is filled in by the spot check.
    """

    total: np.ndarray
    positive_total: np.ndarray
    inside: np.ndarray
    inside_positive: np.ndarray
    object_area: np.ndarray
    region_sums: np.ndarray
    region_names: tuple[str, ...]
    region_residual: np.ndarray = field(init=False)
    conserved: np.ndarray = field(init=False)
    context_usage: np.ndarray = field(init=False)
    inside_share_positive: np.ndarray = field(init=False)
    spot_share: np.ndarray = field(init=False)

    def __post_init__(self):
        self.region_residual, self.conserved = pools.conservation(self.region_sums, self.total,
                                                                  2 * self.positive_total - self.total)
        has_object = self.object_area > 0
        self.context_usage = np.where(has_object, context.ratio(self.inside, self.total), np.nan)
        self.inside_share_positive = np.where(has_object, context.ratio(self.inside_positive, self.positive_total),
                                              np.nan)
        self.spot_share = np.full(len(self.total), np.nan)

    @classmethod
    def from_array(cls, stats: np.ndarray, region_names: tuple[str, ...]) -> RowStats:
        """From the scan's (N, 5 + R) array (``ROW_STATS`` columns, then one per region)."""
        return cls(*(stats[:, ROW_STATS.index(name)] for name in ROW_STATS), region_sums=stats[:, REGIONS:],
                   region_names=tuple(region_names))


@dataclass
class ScanResult:
    """Per row: ``stats`` (N, 5 + R) float64 in ``ROW_STATS`` + region order (NaN for rows not scanned;
    :meth:`RowStats.from_array` names them).
    Per group: ``maps`` (relevance, by the fine key), ``positive`` (R+ by class), ``outside`` (R+ outside
    the object by class; None without object geometry)."""

    stats: np.ndarray
    maps: heatmaps.GroupedMaps
    positive: heatmaps.GroupedMaps
    outside: heatmaps.GroupedMaps | None


def _present(codes: np.ndarray) -> np.ndarray:
    return np.unique(codes[codes >= 0])


def scan_chunk(block: np.ndarray, boxes: np.ndarray | None, mask: np.ndarray | None, regions: Regions,
               codes: np.ndarray, class_codes: np.ndarray) -> tuple:
    """One chunk: (stats (n, 5 + R), partial relevance sums by ``codes``, partial R+ and R+ inside the
    object by ``class_codes``). The object is ``mask`` (n, H, W) when given, else ``boxes`` (n, K, 4),
    pooled over the window around each row's boxes. Rows with code -1 contribute no map; their stats
    are computed but meaningless."""
    n, height, width = block.shape
    stats = np.full((n, REGIONS + len(regions.names)), np.nan)
    fine, classes = _present(codes), _present(class_codes)
    sums = np.zeros((len(fine), height, width))
    positive_sums = np.zeros((len(classes), height, width))
    objects = mask is not None or boxes is not None
    inside_sums = np.zeros((len(classes), height, width)) if objects else None
    step = MAPS_PER_STEP
    positive = np.empty((step, height, width), np.float32)
    masked = np.empty_like(positive)
    zero = np.float32(0)
    windows = context.box_windows(boxes, height, width) if boxes is not None and mask is None else None
    for start in range(0, n, step):
        stop = min(start + step, n)
        x, p, rows = block[start:stop], positive[: stop - start], slice(start, stop)
        np.maximum(x, zero, out=p)
        stats[rows, TOTAL] = x.sum(axis=(1, 2), dtype=np.float64)
        stats[rows, POSITIVE_TOTAL] = p.sum(axis=(1, 2), dtype=np.float64)
        stats[rows, REGIONS:] = regions.sums(x)
        if mask is not None:
            m, q = mask[start:stop], masked[: stop - start]
            stats[rows, INSIDE] = np.multiply(x, m, out=q).sum(axis=(1, 2), dtype=np.float64)
            stats[rows, INSIDE_POSITIVE] = np.multiply(p, m, out=q).sum(axis=(1, 2), dtype=np.float64)
            stats[rows, OBJECT_AREA] = np.count_nonzero(m.reshape(len(m), -1), axis=1) / (height * width)
        for j in range(stop - start):
            row = start + j
            window = None
            if boxes is not None and mask is None:
                window = windows[row]
                if window is None:
                    stats[row, OBJECT] = 0.0
                else:
                    ys, xs, local = window
                    x_in, p_in = x[j, ys, xs], p[j, ys, xs]
                    if local is not None:
                        x_in, p_in = np.where(local, x_in, zero), np.where(local, p_in, zero)
                    stats[row, INSIDE] = x_in.sum(dtype=np.float64)
                    stats[row, INSIDE_POSITIVE] = p_in.sum(dtype=np.float64)
                    area = x_in.size if local is None else np.count_nonzero(local)
                    stats[row, OBJECT_AREA] = area / (height * width)
            if codes[row] >= 0:
                sums[np.searchsorted(fine, codes[row])] += x[j]
            if class_codes[row] >= 0:
                g = np.searchsorted(classes, class_codes[row])
                positive_sums[g] += p[j]
                if mask is not None:
                    inside_sums[g] += masked[j]  # holds p * m of this step
                elif window is not None:
                    inside_sums[g][ys, xs] += p_in
    fine_counts = np.array([(codes == c).sum() for c in fine], np.int64)
    class_counts = np.array([(class_codes == c).sum() for c in classes], np.int64)
    return (stats, (fine, sums, fine_counts), (classes, positive_sums, class_counts),
            (classes, inside_sums, class_counts) if objects else None)


def _merge(*parts):
    stats = np.concatenate([p[0] for p in parts])
    merged = [heatmaps.merge_partials(*[p[k] for p in parts]) for k in (1, 2)]
    outside = None if parts[0][3] is None else heatmaps.merge_partials(*[p[3] for p in parts])
    return stats, merged[0], merged[1], outside


def _finish(merged, fine_names, fine_keys, class_keys, shape) -> ScanResult:
    stats, fine, positive, inside = merged
    positive_maps = heatmaps.to_grouped(positive, ("target",), class_keys, shape)
    outside = None
    if inside is not None:  # R+ outside = R+ - R+ inside: the window costs the object's area only
        inside_maps = heatmaps.to_grouped(inside, ("target",), class_keys, shape)
        outside = heatmaps.GroupedMaps(("target",), positive_maps.keys, positive_maps.sums - inside_maps.sums,
                                       positive_maps.counts)
    return ScanResult(stats=stats, maps=heatmaps.to_grouped(fine, fine_names, fine_keys, shape),
                      positive=positive_maps, outside=outside)


def scan(relevance: da.Array, boxes: np.ndarray | None, mask: da.Array | None, regions: Regions,
         fine_keys: np.ndarray, fine_names: tuple[str, ...], select: np.ndarray, class_keys: np.ndarray,
         class_select: np.ndarray) -> Delayed:
    """Lazy :class:`ScanResult` of a (N, H, W) relevance array, one task per chunk, each chunk read once.

    The object is the store's ``mask`` (lazy (N, H, W) bool) when given, else its ``boxes`` (N, K, 4),
    else unknown (inside stats NaN, ``outside`` None). ``fine_keys`` (N, k) group the relevance maps of
    the rows in ``select``; ``class_keys`` (N,) group the positive maps of the rows in ``class_select``.
    Chunks without a selected row (failed or pending shards) are not read; their rows' stats are NaN.
    Many parameters because: each is one input array of the pass (kept apart so that a pass over a block of
    classes differs from the full pass in the selections only, and tests can drive it without a store).
    """
    relevance = relevance.rechunk({1: -1, 2: -1})
    codes, unique_fine = heatmaps.encode(fine_keys, select)
    class_codes, unique_classes = heatmaps.encode(np.asarray(class_keys).reshape(-1, 1), class_select)
    blocks = relevance.to_delayed(optimize_graph=False).ravel()
    masks = ([None] * len(blocks) if mask is None
             else mask.rechunk(relevance.chunks).to_delayed(optimize_graph=False).ravel())
    bounds = np.cumsum((0, *relevance.chunks[0]))
    width = REGIONS + len(regions.names)
    objects = mask is not None or boxes is not None
    empty = (np.zeros(0, np.int64), None, np.zeros(0, np.int64))
    parts = []
    for block, mask_block, start, stop in zip(blocks, masks, bounds[:-1], bounds[1:]):
        if (codes[start:stop] >= 0).any():
            parts.append(dask.delayed(scan_chunk, pure=True)(
                block, None if boxes is None else boxes[start:stop], mask_block, regions,
                codes[start:stop], class_codes[start:stop]))
        else:
            parts.append((np.full((stop - start, width), np.nan), empty, empty, empty if objects else None))
    merged = heatmaps.merge_tree(parts, _merge)
    if merged is None:  # no rows at all
        merged = (np.zeros((0, width)), empty, empty, empty if objects else None)
    return dask.delayed(_finish, pure=True)(merged, tuple(fine_names), unique_fine, unique_classes, relevance.shape[1:])
