"""Context usage: how much relevance falls on the object versus around it (Lapuschkin et al. 2016).

Binder et al. (2016, §4.1) measure context usage as the relevance inside the object's bounding box
divided by the total relevance: a Fisher-vector model that recognised boats by the water had little
relevance inside the boat boxes. The signed ratio is the paper's; it is unstable when positive and
negative relevance cancel, so the positive-relevance variant (R+ inside / R+ total, in [0, 1]) is
computed beside it.

Boxes are (x0, y0, x1, y1) in relevance-map pixels; pixel (y, x) is inside when its centre
(x + 0.5, y + 0.5) lies in [x0, x1) x [y0, y1), so integer boxes cover columns x0..x1-1.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _pixel_range(low: float, high: float, size: int) -> tuple[int, int]:
    """Pixels whose centre i + 0.5 lies in [low, high), as a range [start, stop) clipped to the map."""
    start = min(max(int(np.ceil(low - 0.5)), 0), size)
    return start, min(max(int(np.ceil(high - 0.5)), start), size)


def _box_ranges(row_boxes: np.ndarray, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """A row's finite, non-empty boxes as pixel ranges (x_start, x_stop, y_start, y_stop)."""
    row_boxes = np.asarray(row_boxes, np.float64).reshape(-1, 4)
    ranges = []
    for x0, y0, x1, y1 in row_boxes[np.isfinite(row_boxes).all(axis=1)]:
        (xa, xb), (ya, yb) = _pixel_range(x0, x1, width), _pixel_range(y0, y1, height)
        if xb > xa and yb > ya:
            ranges.append((xa, xb, ya, yb))
    return ranges


def box_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, K, 4) NaN-padded boxes -> (n, H, W) bool union of each row's boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(len(boxes), -1, 4)
    mask = np.zeros((len(boxes), height, width), dtype=bool)
    for i, row_boxes in enumerate(boxes):
        for xa, xb, ya, yb in _box_ranges(row_boxes, height, width):
            mask[i, ya:yb, xa:xb] = True
    return mask


def box_window(row_boxes: np.ndarray, height: int, width: int) -> tuple[slice, slice, np.ndarray | None] | None:
    """One row's object as (rows, cols) of the window around its boxes, plus the union mask in the window.

    The mask is None when the whole window is object (one box). None for a row without boxes.
    Pooling over the window costs the object's area, not the whole map's.
    """
    ranges = _box_ranges(row_boxes, height, width)
    if not ranges:
        return None
    xa, xb = min(r[0] for r in ranges), max(r[1] for r in ranges)
    ya, yb = min(r[2] for r in ranges), max(r[3] for r in ranges)
    local = np.zeros((yb - ya, xb - xa), bool)
    for x0, x1, y0, y1 in ranges:
        local[y0 - ya:y1 - ya, x0 - xa:x1 - xa] = True
    return slice(ya, yb), slice(xa, xb), None if local.all() else local


def box_windows(boxes: np.ndarray, height: int, width: int) -> list:
    """:func:`box_window` of every row of (n, K, 4) boxes, the common case (one finite, non-empty box per row)
    in a few array operations instead of Python per row: the scan's per-row overhead holds the GIL, which the
    other Dask threads' reads and sums wait on. Rows with several boxes go through :func:`box_window`."""
    boxes = np.asarray(boxes, np.float64)
    if not len(boxes):
        return []
    boxes = boxes.reshape(len(boxes), -1, 4)
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))

    def pixels(low, high, size):  # _pixel_range, vectorized: centres i + 0.5 in [low, high), clipped
        with np.errstate(invalid="ignore"):
            start = np.clip(np.ceil(low - 0.5), 0, size)
            return start, np.clip(np.ceil(high - 0.5), start, size)

    (xa, xb), (ya, yb) = pixels(x0, x1, width), pixels(y0, y1, height)
    valid = np.isfinite(boxes).all(axis=2) & (xb > xa) & (yb > ya)
    count = valid.sum(axis=1)
    first = valid.argmax(axis=1)
    rows = np.arange(len(boxes))
    xa, xb, ya, yb = (np.where(count > 0, a[rows, first], 0).astype(np.int64) for a in (xa, xb, ya, yb))  # NaN: none
    out = []
    for i, n in enumerate(count.tolist()):
        if n == 0:
            out.append(None)
        elif n == 1:
            out.append((slice(int(ya[i]), int(yb[i])), slice(int(xa[i]), int(xb[i])), None))
        else:
            out.append(box_window(boxes[i], height, width))
    return out

def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (no relevance: no usage to measure)."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def distribution(values: np.ndarray, groups: np.ndarray, prefix: str) -> pa.Table:
    """Per group: count (finite values), mean and quantiles of ``values``, as columns ``<prefix>_mean`` ...

    Rows with NaN (no object, no relevance) do not enter the statistics.
    """
    values, groups = np.asarray(values, np.float64), np.asarray(groups)
    keys = np.unique(groups)
    columns: dict[str, list] = {"group": keys.tolist(), f"{prefix}_n": [], f"{prefix}_mean": []}
    for q in QUANTILES:
        columns[f"{prefix}_q{round(q * 100):02d}"] = []
    for key in keys:
        finite = values[(groups == key) & np.isfinite(values)]
        columns[f"{prefix}_n"].append(int(finite.size))
        columns[f"{prefix}_mean"].append(float(finite.mean()) if finite.size else np.nan)
        quantiles = np.quantile(finite, QUANTILES) if finite.size else np.full(len(QUANTILES), np.nan)
        for q, value in zip(QUANTILES, quantiles):
            columns[f"{prefix}_q{round(q * 100):02d}"].append(float(value))
    return pa.table(columns)
