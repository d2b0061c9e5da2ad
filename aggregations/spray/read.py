"""The one read of the store: every shard once, its ok rows of the chosen classes sum-pooled to the grid.

Dask runs one task per shard; each opens the store by URL (so any scheduler works: threads, processes,
distributed, Ray), reads the shard's wanted rows in one or two requests (a ``ShardReader``, about 10x faster
than zarr's per-row sharding codec) and writes its pooled rows into a local scratch Zarr array, chunked
like the store's shards, so no two tasks touch one chunk. The class tasks then read just their rows from the
scratch array (4 KB a row at 32x32), never the store's full maps again. Memory: a few shards of the
store in flight; the scratch array is on disk (5 GB for ImageNet at 32x32).
"""
from __future__ import annotations

import dask
import numpy as np
import zarr

from aggregations.spray import preprocess
from pipeline.store import open_store


def create_scratch(path: str, n_rows: int, cells: int, rows_per_shard: int) -> None:
    zarr.create_array(path, shape=(n_rows, cells), chunks=(max(min(rows_per_shard, n_rows), 1), cells),
                      dtype="float32", fill_value=0.0, compressors=None, zarr_format=3, overwrite=True)


def pool_shard(store_url: str, group: str, shard: int, wanted: np.ndarray, boxes: np.ndarray | None, size: int,
               scratch: str, storage_options: dict | None = None) -> np.ndarray:
    """Pool one shard's ``wanted`` rows into the scratch array; return the shard's (n, 3) row stats
    (preprocess.row_stats; NaN for the other rows, which no class reads).

    Only the wanted rows (ok rows of clustered classes, finite by the store's status rules) are read and pooled,
    batched per shard by the store's ``ShardReader`` (the whole object when most rows are wanted, else the index
    and those rows' byte ranges), not row by row.

    Many parameters because: a Dask task on any scheduler gets plain values, so the store's address (URL, group,
    storage options), the shard, its wanted rows, its boxes and the scratch array are spelled out one by one.
    """
    explanations = open_store(store_url, storage_options=storage_options).group(group)
    start, keep = shard * explanations.rows_per_shard, np.flatnonzero(wanted)
    block = explanations.shard_reader("relevance").rows(start + keep)
    if not np.isfinite(block).all():  # never for ok rows; kept as a guard so that NaN cannot spread
        block = np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
    pooled = np.zeros((len(wanted), int(np.prod(preprocess.grid_shape(*block.shape[1:], size)))), np.float32)
    pooled[keep] = preprocess.sum_pool(block, size).reshape(len(keep), -1)
    zarr.open_array(scratch, mode="r+")[start:start + len(wanted)] = pooled
    stats = np.full((len(wanted), 3), np.nan)
    stats[keep] = preprocess.row_stats(block, None if boxes is None else boxes[keep])
    return stats


def pooling_tasks(store, group: str, wanted: np.ndarray, boxes: np.ndarray | None, size: int, scratch: str,
                  storage_options: dict | None = None) -> list:
    """Lazy (start, stats) per shard that holds a wanted row; shards without one are not read.

    Many parameters because: it forwards :func:`pool_shard`'s plain-value arguments, which every task needs.
    """
    tasks = []
    for shard in range(store.n_shards):
        start, stop = store.shard_rows(shard)
        if wanted[start:stop].any():
            task = dask.delayed(pool_shard, pure=True)(
                store.url, group, shard, wanted[start:stop], None if boxes is None else boxes[start:stop], size,
                scratch, storage_options, dask_key_name=f"spray-pool-{group}-{shard}")
            tasks.append((start, task))
    return tasks


def read_pooled(scratch: str, rows: np.ndarray) -> np.ndarray:
    """(n, cells) float32 pooled maps of these rows (sorted): each scratch chunk they touch is read once."""
    return np.asarray(zarr.open_array(scratch, mode="r").oindex[np.asarray(rows, np.int64)])
