"""The aggregation job: everything in one Dask pass over a relevance store, written as Parquet and Zarr.

``aggregate(store_url)`` reads each explanation group's relevance chunk by chunk, each chunk once
(aggregations/scan.py), and writes beside the store (layout in docs/aggregates.md):

    <out>/regions.parquet    one row per ok explanation: ids, scores, totals, region sums, box pooling
    <out>/classes.parquet    one row per (group, class): counts, means, region fractions, context, bias
    <out>/heatmaps.parquet   one row per aggregate heatmap: sum_p E[R_p] beside E[sum R] and E[f(x)]
    <out>/heatmaps.zarr      the aggregate heatmaps E[R_p] (float64), one (G, H, W) array per <group>/<view>
    <out>/summary.json       counts of excluded rows, settings, the store's location and state (store_state)

A class whose hot spot qualifies as a possible cue costs a second read of just its rows
(aggregations/bias.py). The two tables are built column family by column family in aggregations/tables.py.
Rows whose status is not ok are excluded from every aggregate and counted.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import dask
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from aggregations import bias, context, pools, scan, tables, views
from aggregations.views import VIEWS
from aggregations.tables import FINE_KEYS
from pipeline.paths import beside, join_url, normalise_url
from pipeline.store import (STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, STATUS_PENDING, ExplanationGroup,
                            RelevanceStore, canonical_json, open_store)

OUTPUT_FORMAT = 1
@dataclass
class AggregateResult:
    """What ``aggregate`` wrote (and ``load`` reads back): the tables, the heatmap group and a summary."""

    out_dir: str
    regions: pa.Table
    classes: pa.Table
    heatmap_table: pa.Table
    summary: dict
    seconds: dict = field(default_factory=dict)  # {group: {"scan", "spot_check", "total", "passes"}, "write": s}

    @property
    def heatmaps(self) -> zarr.Group:
        """The Zarr group of aggregate heatmaps: ``heatmaps[f"{group}/{view}"]`` is (G, H, W) float64 E[R_p],
        its attrs ``key_names``, ``keys`` (G lists) and ``count`` (G rows) say which rows each map averages."""
        return zarr.open_group(join_url(self.out_dir, "heatmaps.zarr"), mode="r")

    def heatmap(self, group: str, view: str = "target", **key: int) -> np.ndarray | None:
        """One mean map E[R_p], e.g. ``heatmap("epsilon", target=3)`` or
        ``heatmap(g, "target_correct", target=3, correct=0)``.

        Views: ``target``, ``label_target``, ``prediction``, ``target_correct``, and over the class's
        own images ``target_positive`` (E[R+]) and ``target_positive_outside`` (E[R+ outside the object]).
        None when no row falls in that group.
        """
        array = self.heatmaps[f"{group}/{view}"]
        names = list(array.attrs["key_names"])
        unknown = set(key) - set(names)
        if unknown:
            raise KeyError(f"view {view!r} is keyed by {names}, not {sorted(unknown)}")
        for index, values in enumerate(array.attrs["keys"]):
            if all(values[names.index(name)] == value for name, value in key.items()):
                return array[index]
        return None


def store_state(store: RelevanceStore, names: Sequence[str] | None = None) -> dict:
    """What aggregates are computed from, to tell later whether the store still holds it (docs/aggregates.md).

    ``config``: a digest of the store's config, class names and layout (another store, or one made anew with
    other options); per group its rows by status and ``digest``, a digest of every row's status, relevance sum and
    output (rows written since, a ``--retry-failed`` run, a store rewritten with other values). Reads three (N,)
    arrays per group: milliseconds next to the scan.
    """
    identity = {"config": store.config, "class_names": store.class_names,
                "layout": [store.n_rows, store.height, store.width, store.group_names]}
    groups = {}
    for name in names or store.group_names:
        group = store.group(name)
        status = np.asarray(group.read("status"))
        digest = hashlib.sha256(np.ascontiguousarray(status, np.int8).tobytes())
        for array in ("relevance_sum", "output"):
            digest.update(np.ascontiguousarray(group.read(array), np.float64).tobytes())
        groups[name] = {"rows": int(status.size), "ok": int((status == STATUS_OK).sum()),
                        "failed": int((status == STATUS_FAILED).sum()),
                        "nonfinite": int((status == STATUS_NONFINITE).sum()),
                        "pending": int((status == STATUS_PENDING).sum()), "digest": digest.hexdigest()}
    return {"config": hashlib.sha256(canonical_json(identity).encode()).hexdigest(), "groups": groups}


def changes_since(recorded: Mapping, store: RelevanceStore) -> list[str]:
    """How ``store`` changed since its :func:`store_state` was ``recorded`` (by aggregate or spray); [] when not."""
    names = [name for name in recorded.get("groups", {}) if name in store.group_names]
    return state_changes(recorded, store_state(store, names))


def state_changes(recorded: Mapping, current: Mapping) -> list[str]:
    """How the store changed since ``recorded`` (both from :func:`store_state`), one phrase each; [] when not."""
    if recorded.get("config") != current.get("config"):
        return ["it was made anew with another configuration, class names or layout"]
    changes = []
    for name, then in recorded.get("groups", {}).items():
        now = current.get("groups", {}).get(name)
        if now is None:
            changes.append(f"group {name!r} is gone")
        elif then != now:
            counts = ", ".join(f"{then.get(k, 0)} -> {now[k]} {k}" for k in ("ok", "failed", "nonfinite", "pending")
                               if then.get(k) != now[k])
            changes.append(f"group {name!r}: " + (counts or "rows rewritten with other values"))
    return changes


def same_location(recorded: dict, url: str) -> bool:
    """Whether ``summary.json`` names the store at ``url``, however either was spelled (relative, ``file://``,
    trailing ``/``). A summary from before ``store_location`` was recorded holds only the spelling given then, which a
    move of the run folder outdates: it is compared by the store's name."""
    here = normalise_url(url)
    if recorded.get("store_location"):
        return recorded["store_location"] == here
    spelled = recorded.get("store")
    return not spelled or os.path.basename(str(spelled).rstrip("/")) == os.path.basename(here)


def default_out_dir(store_url: str) -> str:
    """``runs/store.zarr`` -> ``runs/store.aggregates``: beside the store, which may be read-only."""
    return beside(store_url, ".aggregates")


# ---- schedulers --------------------------------------------------------------------------------------------

@contextmanager
def scheduler_options(scheduler: str | None = None, num_workers: int | None = None) -> Iterator[dict]:
    """Keyword arguments for ``dask.compute``: the local threads by default, or

    ``"sync"``/``"processes"`` (Dask's local schedulers), ``"ray"`` (Dask on Ray: the Ray cluster this
    process is connected to, else ``RAY_ADDRESS``, else a local one), or a ``distributed`` scheduler
    address such as ``tcp://10.0.0.5:8786``.
    """
    if scheduler in (None, "", "threads", "local"):
        from dask.threaded import get  # the function, not "threads": by name, dask imports distributed (0.3 s)

        yield {"scheduler": get, "num_workers": num_workers or os.cpu_count()}
    elif scheduler in ("sync", "synchronous", "processes"):
        yield {"scheduler": scheduler, **({"num_workers": num_workers} if num_workers else {})}
    elif scheduler == "ray":
        from ray.util.dask import ray_dask_get

        from pipeline.dispatch import connect

        connect()  # the connected cluster, else RAY_ADDRESS, else a local one
        yield {"scheduler": ray_dask_get}
    elif "://" in scheduler or ":" in scheduler:
        from distributed import Client

        with Client(scheduler) as client:
            yield {"scheduler": client.get}
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: use threads, sync, processes, ray, "
                         "or a distributed scheduler address like tcp://host:8786")


# ---- one explanation group -----------------------------------------------------------------------------------

@dataclass
class GroupAggregate:
    """What one explanation group contributes: its two tables, the summary table of each heatmap view (the maps
    themselves are in ``heatmaps.zarr`` already), its row counts for summary.json and the seconds of its phases."""

    regions: pa.Table
    classes: pa.Table
    views: list[tuple[str, pa.Table]]
    counts: dict
    seconds: dict


@dataclass
class GroupJob:
    """How to aggregate one group: regions, bias settings, Dask options, class names, where its maps go, budget."""

    regions: pools.Regions
    settings: bias.BiasSettings
    compute_options: dict
    class_names: Sequence[str]
    node: zarr.Group
    memory_budget: int | None


def _aggregate_group(group: ExplanationGroup, meta: tables.GroupMeta, job: GroupJob) -> GroupAggregate:
    stats, view_tables, spots, seconds = _scan_passes(group, meta, job)
    seconds["spot_check"] = _spot_check(group, meta, stats, spots, job.compute_options)
    evidence = tables.BiasEvidence.judge(meta, stats, spots, dict(view_tables)["target"], job.settings)
    status, ok = meta["status"], meta["ok"]
    counts = {"rows": meta.n_rows, "ok": int(ok.sum()), "failed": int((status == STATUS_FAILED).sum()),
              "nonfinite": int((status == STATUS_NONFINITE).sum()), "pending": int((status == STATUS_PENDING).sum()),
              "not_conserved": int((ok & ~stats.conserved).sum()),
              "spot_checked_rows": int(np.isfinite(stats.spot_share).sum())}
    return GroupAggregate(tables.regions_table(meta, stats, evidence, job.settings),
                          tables.classes_table(meta, stats, evidence, job.settings), view_tables, counts, seconds)


def _scan_passes(group: ExplanationGroup, meta: tables.GroupMeta, job: GroupJob) -> tuple:
    """The scan, one pass per block of target classes (aggregations/views.py): row stats, view tables, spots."""
    # whole shards, one store request each (pipeline/store.py ShardReader): zarr's task per one-row inner chunk
    # cost several times the decompression; the reader is a plain object, so this works on Ray's scheduler too
    relevance, mask, boxes = group.lazy_shards("relevance"), group.lazy_shards("mask"), group.boxes
    shape = tuple(relevance.shape[1:])
    blocks = views.plan_passes(meta, int(np.prod(shape)) * 8, job.memory_budget)
    writer = views.ViewWriter(job.node, meta, shape)
    merged, shares, seconds = None, {}, {"scan": 0.0}
    for block in blocks:
        in_block = np.isin(meta["target"], block)
        lazy = scan.scan(relevance, boxes, mask, job.regions, meta.keys(FINE_KEYS), FINE_KEYS, meta["ok"] & in_block,
                         meta["target"], meta["on_class"] & in_block)
        clock = time.perf_counter()
        (done,) = dask.compute(lazy, **job.compute_options)
        seconds["scan"] += time.perf_counter() - clock
        scanned = np.flatnonzero(meta["ok"] & in_block)  # before any map is kept: a missing shard reads as NaN
        total, positive = done.stats[scanned, scan.TOTAL], done.stats[scanned, scan.POSITIVE_TOTAL]
        group.check_maps(scanned, total, 2 * positive - total, meta["relevance_sum"][scanned])
        merged = done.stats if merged is None else np.where(np.isnan(merged), done.stats, merged)
        writer.add(done, scan.RowStats.from_array(done.stats, job.regions.names))
        shares.update(bias.share_maps(done.positive, done.outside, job.settings))
        del done
    stats = scan.RowStats.from_array(merged, job.regions.names)
    return stats, writer.finish(stats), bias.spots_of(shares, job.settings), dict(seconds, passes=len(blocks))


def _spot_check(group: ExplanationGroup, meta: tables.GroupMeta, stats: scan.RowStats, spots: dict,
                compute_options: dict) -> float:
    """The second read: each qualifying spot on every image of its class; fills ``stats.spot_share``.

    Returns its seconds."""
    on_class, target = meta["on_class"], meta["target"]
    row_boxes = np.full((meta.n_rows, 4), np.nan)
    for c, spot in spots.items():
        if spot is not None and spot.qualifies:
            row_boxes[on_class & (target == c)] = spot.box
    checked = np.flatnonzero(np.isfinite(row_boxes[:, 0]))
    if not checked.size:
        return 0.0
    boxes = group.boxes
    read_mask = group.shard_reader("mask").rows if group.has("mask") else None  # batched: one request per shard
    lazy = bias.spot_sums(group.shard_reader("relevance").rows, checked, row_boxes[checked],
                          None if boxes is None else boxes[checked], read_mask)
    clock = time.perf_counter()
    (spot_sum,) = dask.compute(lazy, **compute_options)
    stats.spot_share[checked] = context.ratio(spot_sum, stats.positive_total[checked])
    return time.perf_counter() - clock


# ---- entry points ----------------------------------------------------------------------------------------------

def aggregate(store_url: str, out_dir: str | None = None, *, groups: Sequence[str] | None = None,
              grid: str | tuple[int, int] = "3x1", masks: Mapping[str, np.ndarray] | None = None,
              scheduler: str | None = None, num_workers: int | None = None,
              settings: bias.BiasSettings = bias.BiasSettings(),
              storage_options: Mapping | None = None,
              memory_budget: int | None = views.DEFAULT_MEMORY_BUDGET) -> AggregateResult:
    """Aggregate every explanation group of a store (or ``groups``) and write the outputs to ``out_dir``.

    ``grid`` ("ROWSxCOLS", default thirds) or ``masks`` (name -> (H, W) bool, disjoint) define the region
    pools; ``scheduler`` picks where Dask runs (see :func:`scheduler_options`); ``memory_budget`` bounds the
    bytes of heatmaps held at once (more passes over the store when the groups need more; None: one pass).
    Rerunning overwrites the outputs with identical values; ``summary.json`` is written last, so an
    interrupted run leaves no outputs that :func:`load` accepts.

    Many parameters because: the keyword options are those of ``lrp-audit aggregate``, passed through one to one.
    """
    store = open_store(store_url, storage_options=storage_options)
    out_dir = str(out_dir or default_out_dir(store_url))
    names = list(groups or store.group_names)
    unknown = sorted(set(names) - set(store.group_names))
    if unknown:
        raise ValueError(f"no explanation group(s) {unknown} in {store_url!r}; the store has {store.group_names}")
    state = store_state(store, names)  # before the scan: rows written while it runs make the outputs stale
    regions = _regions(store, grid, masks)
    metas = _checked_metas(store, names)  # the maps are checked as the scan reads them
    root = _start_outputs(out_dir, regions, store.class_names, str(store_url))
    per_group, seconds = {}, {}
    with scheduler_options(scheduler, num_workers) as options:
        for name, meta in zip(names, metas):
            start = time.perf_counter()
            job = GroupJob(regions, settings, options, store.class_names, root.require_group(name), memory_budget)
            per_group[name] = _aggregate_group(store.group(name), meta, job)
            del meta
            seconds[name] = dict(per_group[name].seconds, total=time.perf_counter() - start)

    summary = {
        "format": OUTPUT_FORMAT, "store": str(store_url), "store_location": normalise_url(store_url),
        "store_state": state, "class_names": store.class_names,
        "map_shape": [store.height, store.width], "regions": regions.describe(), "settings": settings.as_dict(),
        "memory_budget": memory_budget,
        "views": {**{k: list(v) for k, v in VIEWS.items()}, "target_positive": ["target"],
                  "target_positive_outside": ["target"]},
        "groups": {name: result.counts for name, result in per_group.items()},
    }
    result = AggregateResult(
        out_dir=out_dir,
        regions=pa.concat_tables([r.regions for r in per_group.values()]),
        classes=pa.concat_tables([r.classes for r in per_group.values()]),
        heatmap_table=_heatmap_table(per_group),
        summary=summary, seconds=seconds,
    )
    start = time.perf_counter()
    _write(result)
    seconds["write"] = time.perf_counter() - start
    return result


def _checked_metas(store: RelevanceStore, names: Sequence[str]) -> Iterator[tables.GroupMeta]:
    """Each group's row metadata in turn, every group's rows read and checked now (a damaged store is refused before
    an output is touched). Only the first group's are kept; the others are read again in their turn, so memory holds
    one group's rows (about 160 bytes a row: 0.2 GB for ImageNet), not every group's."""
    first = tables.GroupMeta.read(store.group(names[0]), store.class_names)
    for name in names[1:]:
        store.group(name).checked_rows()
    return itertools.chain([first], (tables.GroupMeta.read(store.group(name), store.class_names) for name in names[1:]))


def _regions(store: RelevanceStore, grid: str | tuple[int, int],
             masks: Mapping[str, np.ndarray] | None) -> pools.Regions:
    """The region pools: the ``masks`` (of the store's map size), else the ``grid``."""
    if masks is None:
        rows, cols = pools.parse_grid(grid) if isinstance(grid, str) else grid
        return pools.grid(store.height, store.width, rows, cols)
    regions = pools.from_masks(masks)
    if (regions.height, regions.width) != (store.height, store.width):
        raise ValueError(f"masks are {regions.height}x{regions.width}, the store's maps {store.height}x{store.width}")
    return regions


def _heatmap_table(per_group: dict[str, GroupAggregate]) -> pa.Table:
    tables = []
    for name, result in per_group.items():
        for view_name, table in result.views:
            columns = {"group": [name] * len(table), "view": [view_name] * len(table)}
            for key in FINE_KEYS:
                columns[key] = table[key].to_numpy() if key in table.column_names else np.full(len(table), -1, np.int64)
            for key in ("count", "mean_score", "mean_total", "heatmap_sum", "aggregation_gap", "explanation_gap"):
                columns[key] = table[key].to_numpy()
            tables.append(pa.table(columns).cast(_HEATMAP_SCHEMA))
    return pa.concat_tables(tables) if tables else _HEATMAP_SCHEMA.empty_table()


_HEATMAP_SCHEMA = pa.schema([("group", pa.string()), ("view", pa.string()), *[(k, pa.int64()) for k in FINE_KEYS],
                             ("count", pa.int64()), *[(k, pa.float64()) for k in ("mean_score", "mean_total",
                                                      "heatmap_sum", "aggregation_gap", "explanation_gap")]])


def _start_outputs(out_dir: str, regions: pools.Regions, class_names: Sequence[str], store_url: str) -> zarr.Group:
    """A fresh ``heatmaps.zarr`` (the scan writes its maps into it) and no ``summary.json`` until the end."""
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    if fs.exists(join_url(path, "summary.json")):
        fs.rm(join_url(path, "summary.json"))
    root = zarr.open_group(join_url(out_dir, "heatmaps.zarr"), mode="w", zarr_format=3)
    root.attrs.update({"lrp_audit_aggregates": OUTPUT_FORMAT, "class_names": list(class_names),
                       "regions": regions.describe(), "store": store_url})
    root.create_array("regions", data=regions.mask_stack(), dimension_names=("region", "y", "x"))
    return root


def _write(result: AggregateResult) -> None:
    """The three tables, then ``summary.json``: the mark of a finished run."""
    fs, path = fsspec.core.url_to_fs(result.out_dir)
    for name, table in (("regions", result.regions), ("classes", result.classes), ("heatmaps", result.heatmap_table)):
        pq.write_table(table, join_url(path, f"{name}.parquet"), filesystem=fs)
    with fs.open(join_url(path, "summary.json"), "w") as handle:
        json.dump(result.summary, handle, indent=2, sort_keys=True, default=str)


def load(out_dir: str) -> AggregateResult:
    """Read the outputs of :func:`aggregate` back (tables in memory, heatmaps lazily via ``.heatmaps``)."""
    fs, path = fsspec.core.url_to_fs(str(out_dir))
    if not fs.exists(join_url(path, "summary.json")):
        raise FileNotFoundError(f"no aggregates in {out_dir!r}: run 'lrp-audit aggregate STORE --out {out_dir}'")
    with fs.open(join_url(path, "summary.json")) as handle:
        summary = json.load(handle)
    tables = {name: pq.read_table(join_url(path, f"{name}.parquet"), filesystem=fs)
              for name in ("regions", "classes", "heatmaps")}
    return AggregateResult(str(out_dir), tables["regions"], tables["classes"], tables["heatmaps"], summary)
