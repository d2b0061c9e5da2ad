"""The one read of the store: every shard once, its ok rows of the chosen classes sum-pooled to the grid.

Dask runs one task per shard; each opens the store by URL (so any scheduler works: threads, processes,
distributed, Ray), reads the shard's wanted rows in one or two requests (a ``ShardReader``, about 10x faster
than zarr's per-row sharding codec) and writes its pooled rows into the scratch folder as one ``.npy`` file
per shard, so no two tasks touch one file. The class tasks then read just their rows from those files
(memory-mapped; 4 KB a row at 32x32), never the store's full maps again. Memory: a few shards of the
store in flight; the scratch files are on disk (5 GB for ImageNet at 32x32). Plain ``.npy`` files, not a
Zarr array: the scratch is private to one run, and a Zarr write of a shard's pooled rows cost more than
its pooling (8 ms against 1 ms for 2 MB).
"""
from __future__ import annotations

import os
import threading

import dask
import numpy as np

from aggregations.spray import preprocess
from pipeline.store import open_store

ROWS_AT_ONCE = 64  # maps pooled together: their float64 copy (2 MB at 64x64) stays in cache, no page faults


def scratch_file(scratch: str, shard: int) -> str:
    return os.path.join(scratch, f"{shard}.npy")


def create_scratch(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def pool_shard(store_url: str, group: str, shard: int, wanted: np.ndarray, sums: np.ndarray, boxes: np.ndarray | None,
               size: int, scratch: str, storage_options: dict | None = None) -> np.ndarray:
    """Pool one shard's ``wanted`` rows into its scratch file; return the shard's (n, 3) row stats
    (preprocess.row_stats; NaN for the other rows, which no class reads). ``sums``: the shard's stored
    ``relevance_sum`` per row, from the rows the run checked, that each map read must add up to.

    Only the wanted rows (ok rows of clustered classes, finite by the store's status rules) are read and pooled,
    batched per shard by the store's ``ShardReader`` (the whole object when most rows are wanted, else the index
    and those rows' byte ranges), not row by row.

    Many parameters because: a Dask task on any scheduler gets plain values, so the store's address (URL, group,
    storage options), the shard, its wanted rows, its boxes and the scratch folder are spelled out one by one.
    """
    explanations = open_store(store_url, storage_options=storage_options).group(group)
    start, keep = shard * explanations.rows_per_shard, np.flatnonzero(wanted)
    block = explanations.shard_reader("relevance").rows(start + keep)
    # ok rows are finite and add up to their relevance_sum: NaN here is a missing shard object, refused, never pooled
    explanations.check_maps(start + keep, block.sum(axis=(1, 2), dtype=np.float64),
                            np.abs(block).sum(axis=(1, 2), dtype=np.float64), sums[keep])
    pooled = np.zeros((len(wanted), int(np.prod(preprocess.grid_shape(*block.shape[1:], size)))), np.float32)
    stats = np.full((len(wanted), 3), np.nan)
    for at in range(0, len(keep), ROWS_AT_ONCE):
        part, rows = block[at:at + ROWS_AT_ONCE], keep[at:at + ROWS_AT_ONCE]
        pooled[rows] = preprocess.sum_pool(part, size).reshape(len(rows), -1)
        stats[rows] = preprocess.row_stats(part, None if boxes is None else boxes[rows])
    path = scratch_file(scratch, shard)
    np.save(f"{path}.{os.getpid()}.{threading.get_ident()}.tmp.npy", pooled)  # then renamed: never read half-written
    os.replace(f"{path}.{os.getpid()}.{threading.get_ident()}.tmp.npy", path)
    return stats


def pooling_tasks(store, group: str, wanted: np.ndarray, sums: np.ndarray, boxes: np.ndarray | None, size: int,
                  scratch: str, storage_options: dict | None = None) -> list:
    """Lazy (start, stats) per shard that holds a wanted row; shards without one are not read.

    Many parameters because: it forwards :func:`pool_shard`'s plain-value arguments, which every task needs.
    """
    tasks = []
    for shard in range(store.n_shards):
        start, stop = store.shard_rows(shard)
        if wanted[start:stop].any():
            task = dask.delayed(pool_shard, pure=True)(
                store.url, group, shard, wanted[start:stop], sums[start:stop],
                None if boxes is None else boxes[start:stop], size,
                scratch, storage_options, dask_key_name=f"spray-pool-{group}-{shard}")
            tasks.append((start, task))
    return tasks


def read_pooled(scratch: str, rows: np.ndarray, rows_per_shard: int) -> np.ndarray:
    """(n, cells) float32 pooled maps of these store rows (sorted), from the scratch files of their shards."""
    rows = np.asarray(rows, np.int64)
    if np.any(np.diff(rows) <= 0):
        raise ValueError("read_pooled takes sorted, distinct store rows")
    shards, first = np.unique(rows // rows_per_shard, return_index=True)
    parts = np.split(rows, first[1:])
    return np.concatenate([np.load(scratch_file(scratch, int(shard)), mmap_mode="r")[part - shard * rows_per_shard]
                           for shard, part in zip(shards, parts)])
