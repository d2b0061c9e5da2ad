"""``spray(store)``: SpRAy for every (explanation group, target class) of a store, written as Parquet and Zarr.

One Dask graph: one task per shard pools the maps (aggregations/spray/read.py), one task per class
clusters them (aggregations/spray/analysis.py) as soon as the shards holding its rows are pooled. Classes
are independent and run in parallel, each holding only its own rows. Outputs (docs/spray.md)::

    <out>/spray/assignments.parquet   one row per clustered explanation row
    <out>/spray/clusters.parquet      one row per (group, target, cluster)
    <out>/spray/classes.parquet       one row per (group, target): counts, status, K, eigengap, split rank
    <out>/spray/arrays.zarr/<group>/  eigenvalues, cluster_means, spectral, spectral_rows
    <out>/spray/summary.json          settings, counts; written last, the mark of a finished run

Everything lives under ``<out>/spray/``, which ``lrp-audit aggregate`` never touches (it rewrites its own
``heatmaps.zarr`` from scratch): either job can be rerun without erasing the other's results.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import dask
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from dask.callbacks import Callback
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from aggregations.run import default_out_dir, scheduler_options, store_state
from pipeline.paths import normalise_url
from aggregations.spray import preprocess, read, tables
from aggregations.spray.analysis import analyse
from aggregations.spray.settings import SpraySettings
from aggregations.spray.stats import Geometry
from pipeline.store import STATUS_OK, open_store

FORMAT = 1


def arrays_url(out_dir: str) -> str:
    """Where the eigenvalues and cluster means go: ``<out>/spray/arrays.zarr``, apart from the aggregates."""
    return f"{str(out_dir).rstrip('/')}/spray/arrays.zarr"


@dataclass
class RunOptions:
    """Where and how it runs: a Dask scheduler (as for ``lrp-audit aggregate``), progress bars, scratch space."""

    scheduler: str | None = None
    num_workers: int | None = None
    progress: bool = True
    scratch_dir: str | None = None
    storage_options: dict | None = None


@dataclass
class SprayResult:
    out_dir: str
    assignments: pa.Table
    clusters: pa.Table
    classes: pa.Table
    summary: dict
    seconds: dict = field(default_factory=dict)

    @property
    def zarr_group(self) -> zarr.Group:
        """``[group]["eigenvalues"]`` (class, m) and ``[group]["cluster_means"]`` (cluster, gy, gx); keys in attrs."""
        return zarr.open_group(arrays_url(self.out_dir), mode="r")

    def eigenvalues(self, group: str, target: int) -> np.ndarray | None:
        array = self.zarr_group[group]["eigenvalues"]
        targets = list(array.attrs["targets"])
        if target not in targets:
            return None
        values = array[targets.index(target)]
        return values[np.isfinite(values)]

    def spectral(self, group: str, target: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(store rows, (n, m) eigenvectors of the normalised Laplacian) of one clustered class, or None."""
        node = self.zarr_group[group]
        table = self.assignments
        in_group = table["group"].to_numpy(zero_copy_only=False) == group
        mine = np.flatnonzero(table["target"].to_numpy()[in_group] == target)  # the arrays hold one group's rows
        if not mine.size:
            return None
        m = len(self.eigenvalues(group, target))
        return node["spectral_rows"][...][mine], node["spectral"].oindex[mine, :m]

    def cluster_mean(self, group: str, target: int, cluster: int) -> np.ndarray | None:
        array = self.zarr_group[group]["cluster_means"]
        keys = [tuple(k) for k in array.attrs["keys"]]
        return array[keys.index((target, cluster))] if (target, cluster) in keys else None


class _Progress(Callback):
    """A tqdm bar ticking once per finished task whose key starts with ``prefix``."""

    def __init__(self, prefix: str, total: int, description: str, enabled: bool):
        super().__init__()
        self.prefix, self.bar = prefix, tqdm(total=total, desc=description, disable=not enabled, unit="task")

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith(self.prefix):
            self.bar.update()

    def _finish(self, dsk, state, errored):
        self.bar.close()


def _compute(tasks, progress: list[tuple[str, int, str]], options: RunOptions, compute_options: dict):
    """``dask.compute`` with one progress bar per ``(key prefix, total, description)``, one BLAS thread per task."""
    limit = 1 if compute_options.get("num_workers", 1) != 1 else None  # one BLAS thread per parallel task
    bars = [_Progress(prefix, total, description, options.progress) for prefix, total, description in progress]
    with contextlib.ExitStack() as stack, threadpool_limits(limits=limit):
        for bar in bars:
            stack.enter_context(bar)
        return dask.compute(*tasks, **compute_options)


def _class_task(scratch: str, rows: np.ndarray, rows_per_shard: int, columns: dict, shard_stats: list,
                geometry: Geometry, settings: SpraySettings) -> dict:
    """One class: its pooled rows from the scratch files, then SpRAy; ``columns`` holds its rows' metadata.

    ``shard_stats`` are the results of the pool tasks of the shards holding its rows, ``(start, (n, 3) stats)``
    each: depending on them lets the scheduler start a class as soon as its own shards are pooled, while other
    shards are still being read.

    Many parameters because: a Dask task gets plain values (the scratch path, the rows, the shard size and the rows'
    metadata, the pool results it waits for, the geometry and the settings).
    """
    stats = np.concatenate([block[rows[(rows >= start) & (rows < start + len(block))] - start]
                            for start, block in shard_stats])
    pooled = read.read_pooled(scratch, rows, rows_per_shard)
    meta = dict(columns, positive_total=stats[:, 1], inside_positive=stats[:, 2])
    return analyse(pooled, meta, geometry, settings)


def _spray_group(store, name: str, classes: Sequence[int] | None, settings: SpraySettings, options: RunOptions,
                 compute_options: dict, scratch: str) -> dict:
    """SpRAy on one explanation group: pool its shards once and cluster each class, in one Dask graph.

    Many parameters because: the group's store, name and class subset, the two settings objects, Dask's compute
    options and the scratch folder are distinct inputs of one run, none derivable from the others.
    """
    group = store.group(name)
    table = group.checked_rows()  # a damaged store is refused here, not clustered as it reads
    meta = {k: table[k].to_numpy(zero_copy_only=False) for k in table.column_names}
    universe = tables.class_universe(meta["target"], classes, len(store.class_names))
    ok = meta["status"] == STATUS_OK
    counts = {int(c): int((ok & (meta["target"] == c)).sum()) for c in universe}
    clustered = [c for c in universe if counts[c] >= settings.min_rows]
    wanted = ok & np.isin(meta["target"], clustered)
    geometry = Geometry(store.height, store.width, *preprocess.grid_shape(store.height, store.width, settings.size))
    read.create_scratch(scratch)
    boxes = group.boxes
    pooling = dict(read.pooling_tasks(store, name, wanted, meta["relevance_sum"], boxes, settings.size, scratch,
                                        options.storage_options))
    jobs = []
    for c in clustered:
        rows = np.flatnonzero(wanted & (meta["target"] == c))
        columns = {k: meta[k][rows] for k in ("row", "sample_id", "path", "label", "prediction", "output")}
        columns["boxes"] = None if boxes is None else boxes[rows]
        starts = np.unique(rows // store.rows_per_shard) * store.rows_per_shard
        shard_stats = [(int(start), pooling[int(start)]) for start in starts]
        jobs.append(dask.delayed(_class_task, pure=True)(scratch, rows, store.rows_per_shard, columns, shard_stats,
                                                         geometry, settings,
                                                         dask_key_name=f"spray-class-{name}-{c}"))
    clock = time.perf_counter()
    progress = [("spray-pool", len(pooling), f"{name}: pool"), ("spray-class", len(jobs), f"{name}: cluster")]
    results = dict(zip(clustered, _compute(jobs, progress, options, compute_options)))
    seconds = {"pool_and_cluster": time.perf_counter() - clock}
    return {"meta": meta, "universe": universe, "results": results, "geometry": geometry, "seconds": seconds}


def spray(store_url: str, out_dir: str | None = None, *, groups: Sequence[str] | None = None,
          classes: Sequence[int] | None = None, settings: SpraySettings | None = None,
          options: RunOptions | None = None) -> SprayResult:
    """Run SpRAy on every class of every explanation group of a store (or the given ones) and write the outputs."""
    settings, options = settings or SpraySettings(), options or RunOptions()
    store = open_store(store_url, storage_options=options.storage_options)
    names = list(groups or store.group_names)
    unknown = sorted(set(names) - set(store.group_names))
    if unknown:
        raise ValueError(f"no explanation group(s) {unknown} in {store_url!r}; the store has {store.group_names}")
    out_dir = str(out_dir or default_out_dir(store_url))
    state = store_state(store, names)  # before reading: rows written meanwhile make the results stale (report)
    per_group, seconds = {}, {}
    with scheduler_options(options.scheduler, options.num_workers) as compute_options, \
            tempfile.TemporaryDirectory(prefix="lrp-spray-", dir=options.scratch_dir) as scratch_dir:
        for name in names:
            scratch = os.path.join(scratch_dir, str(len(per_group)))
            per_group[name] = _spray_group(store, name, classes, settings, options, compute_options, scratch)
            seconds[name] = per_group[name]["seconds"]
    result = tables.build(out_dir, per_group, store, settings)
    result = SprayResult(out_dir, *result, seconds=seconds)
    result.summary["store_state"] = state
    result.summary["store_location"] = normalise_url(store_url)  # whose results: a --spray folder may be another's
    _write(result, per_group)
    return result


def _write(result: SprayResult, per_group: dict) -> None:
    """Arrays, then tables, then ``summary.json`` (removed first): an interrupted run is never loaded."""
    fs, path = fsspec.core.url_to_fs(result.out_dir)
    fs.makedirs(f"{path}/spray", exist_ok=True)
    if fs.exists(f"{path}/spray/summary.json"):
        fs.rm(f"{path}/spray/summary.json")
    root = zarr.open_group(arrays_url(result.out_dir), mode="w", zarr_format=3)
    root.attrs.update({"lrp_audit_spray": FORMAT, "store": result.summary["store"]})
    for name, done in per_group.items():
        tables.write_arrays(root.require_group(name), done)
    for name in ("assignments", "clusters", "classes"):
        pq.write_table(getattr(result, name), f"{path}/spray/{name}.parquet", filesystem=fs)
    with fs.open(f"{path}/spray/summary.json", "w") as handle:
        json.dump(result.summary, handle, indent=2, sort_keys=True, default=str)


def load(out_dir: str) -> SprayResult:
    """Read a finished run's tables back (the arrays stay in Zarr: ``result.zarr_group``)."""
    fs, path = fsspec.core.url_to_fs(str(out_dir))
    if not fs.exists(f"{path}/spray/summary.json"):
        raise FileNotFoundError(f"no SpRAy results in {out_dir!r}: run 'lrp-audit spray STORE --out {out_dir}'")
    with fs.open(f"{path}/spray/summary.json") as handle:
        summary = json.load(handle)
    parts = [pq.read_table(f"{path}/spray/{n}.parquet", filesystem=fs) for n in ("assignments", "clusters", "classes")]
    return SprayResult(str(out_dir), *parts, summary)
