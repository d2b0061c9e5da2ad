"""SpRAy's preprocessing: sum-pool each map to a small grid, normalise it, optionally reduce it with PCA.

Sum pooling (not averaging or resizing) keeps conservation: a pooled map adds up to the same total
relevance. Normalising by the total positive relevance makes two images with the same strategy but
different scores look alike (CoRelAy's "spectral" preprocessing divides by the signed total instead,
which is unstable where positive and negative relevance cancel).
"""
from __future__ import annotations

import numpy as np

from aggregations.context import box_mask


def grid_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The pooled grid: ``size`` x ``size`` cells, never more cells than pixels along an axis."""
    return min(size, height), min(size, width)


def _edges(length: int, parts: int) -> np.ndarray:
    return (np.arange(parts) * length) // parts


def _cells(length: int, parts: int) -> np.ndarray:
    """(length, parts) 0/1 float64 matrix: pixel i belongs to cell j."""
    cell = np.searchsorted(_edges(length, parts), np.arange(length), side="right") - 1
    return (cell[:, None] == np.arange(parts)[None, :]).astype(np.float64)


def sum_pool(block: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) maps -> (n, gy, gx) float64 sums over near-equal cells (exact when size divides H and W).

    Two float64 matrix products with 0/1 cell matrices (BLAS: about twice as fast as numpy's strided reduction);
    a cell's float32 values add up exactly in float64, so the sums are the same whatever the order."""
    n, height, width = block.shape
    gy, gx = grid_shape(height, width, size)
    return _cells(height, gy).T @ (np.asarray(block, np.float64) @ _cells(width, gx))


def normalise(pooled: np.ndarray, how: str) -> np.ndarray:
    """(n, d) pooled maps -> float32 features: divided by their positive total (``positive``), their L2
    norm (``l2``), or left as they are (``none``). A map with nothing to divide by stays zero."""
    if how == "none":
        return np.array(pooled, np.float32)
    pooled = np.array(pooled, np.float64)  # a copy, divided in place
    if how == "positive":
        scale = np.maximum(pooled, 0).sum(axis=1)
    elif how == "l2":
        scale = np.linalg.norm(pooled, axis=1)
    else:
        raise ValueError(f"unknown normalisation {how!r}: use positive, l2 or none")
    np.divide(pooled, np.where(scale > 0, scale, 1.0)[:, None], out=pooled)
    pooled[~(scale > 0)] = 0.0
    return pooled.astype(np.float32)


def row_stats(block: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """(n, 3) float64 per map: total relevance, positive total, positive relevance inside the object
    boxes (NaN without boxes or when a row has none)."""
    positive = np.maximum(block, 0)
    stats = np.full((len(block), 3), np.nan)
    stats[:, 0] = block.sum(axis=(1, 2), dtype=np.float64)
    stats[:, 1] = positive.sum(axis=(1, 2), dtype=np.float64)
    if boxes is not None:
        inside = box_mask(boxes, *block.shape[1:])
        has = inside.any(axis=(1, 2))
        stats[has, 2] = (positive * inside).sum(axis=(1, 2), dtype=np.float64)[has]
    return stats


def reduce(features: np.ndarray, components: int, method: str, seed: int) -> np.ndarray:
    """PCA to ``components`` dims (0: unchanged). Randomized PCA or incremental PCA in batches: both keep
    memory at a few copies of the class's features, never a dense d x d covariance of the whole store."""
    if not components or components >= min(features.shape):
        return features
    if method == "incremental":
        from sklearn.decomposition import IncrementalPCA

        batch = max(components * 5, 256)
        return IncrementalPCA(n_components=components, batch_size=batch).fit_transform(features).astype(np.float32)
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(features).astype(np.float32)
