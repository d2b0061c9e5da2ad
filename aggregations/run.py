"""The aggregation job: everything in one Dask pass over a relevance store, written as Parquet and Zarr.

``aggregate(store_url)`` reads each explanation group's relevance chunk by chunk, each chunk once
(aggregations/scan.py), and writes beside the store (layout in docs/aggregates.md):

    <out>/regions.parquet    one row per ok explanation: ids, scores, totals, region sums, box pooling
    <out>/classes.parquet    one row per (group, class): counts, means, region fractions, context, bias
    <out>/heatmaps.parquet   one row per aggregate heatmap: sum_p E[R_p] beside E[sum R] and E[f(x)]
    <out>/heatmaps.zarr      the aggregate heatmaps E[R_p] (float64), one (G, H, W) array per <group>/<view>
    <out>/summary.json       counts of excluded rows, settings

A class whose hot spot qualifies as a possible cue costs a second read of just its rows
(aggregations/bias.py). Rows whose status is not ok are excluded from every aggregate and counted.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import dask
import dask.array as da
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from aggregations import bias, context, heatmaps, pools, scan
from pipeline.store import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, STATUS_PENDING, ExplanationGroup, open_store

OUTPUT_FORMAT = 1
# heatmap views: name -> key columns of the finest grouping (target, label, prediction, correct)
VIEWS = {
    "target": ("target",),
    "label_target": ("label", "target"),
    "prediction": ("prediction",),
    "target_correct": ("target", "correct"),
}
FINE_KEYS = ("target", "label", "prediction", "correct")


@dataclass
class AggregateResult:
    """What ``aggregate`` wrote (and ``load`` reads back): the tables, the heatmap group and a summary."""

    out_dir: str
    regions: pa.Table
    classes: pa.Table
    heatmap_table: pa.Table
    summary: dict
    seconds: dict = field(default_factory=dict)  # {group: {"scan", "spot_check", "tables"}, "write": s}: timings only

    @property
    def heatmaps(self) -> zarr.Group:
        """The Zarr group of aggregate heatmaps: ``heatmaps[f"{group}/{view}"]`` is (G, H, W) float64 E[R_p],
        its attrs ``key_names``, ``keys`` (G lists) and ``count`` (G rows) say which rows each map averages."""
        return zarr.open_group(_join(self.out_dir, "heatmaps.zarr"), mode="r")

    def heatmap(self, group: str, view: str = "target", **key: int) -> np.ndarray | None:
        """One mean map E[R_p], e.g. ``heatmap("epsilon", target=3)`` or ``heatmap(g, "target_correct", target=3, correct=0)``.

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


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def default_out_dir(store_url: str) -> str:
    """``runs/store.zarr`` -> ``runs/store.aggregates``: beside the store, which may be read-only."""
    base = str(store_url).rstrip("/")
    return (base[:-5] if base.endswith(".zarr") else base) + ".aggregates"


# ---- schedulers --------------------------------------------------------------------------------------------

@contextmanager
def scheduler_options(scheduler: str | None = None, num_workers: int | None = None) -> Iterator[dict]:
    """Keyword arguments for ``dask.compute``: the local threads by default, or

    ``"sync"``/``"processes"`` (Dask's local schedulers), ``"ray"`` (Dask on Ray: the Ray cluster this
    process is connected to, else ``RAY_ADDRESS``, else a local one), or a ``distributed`` scheduler
    address such as ``tcp://10.0.0.5:8786``.
    """
    if scheduler in (None, "", "threads", "local"):
        yield {"scheduler": "threads", "num_workers": num_workers or os.cpu_count()}
    elif scheduler in ("sync", "synchronous", "processes"):
        yield {"scheduler": scheduler, **({"num_workers": num_workers} if num_workers else {})}
    elif scheduler == "ray":
        import ray
        from ray.util.dask import ray_dask_get

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        yield {"scheduler": ray_dask_get}
    elif "://" in scheduler or ":" in scheduler:
        from distributed import Client

        with Client(scheduler) as client:
            yield {"scheduler": client.get}
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}: use threads, sync, processes, ray, "
                         "or a distributed scheduler address like tcp://host:8786")


# ---- per-group metadata --------------------------------------------------------------------------------------

def _metadata(group: ExplanationGroup) -> dict[str, np.ndarray]:
    rows = group.rows()
    meta = {name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}
    meta["ok"] = meta["status"] == STATUS_OK
    label, prediction, target = meta["label"], meta["prediction"], meta["target"]
    correct = np.where((label >= 0) & (prediction >= 0), (label == prediction).astype(np.int64), -1)
    on_class = (target >= 0) & ((label == target) | (label < 0))
    if group.has("labels"):  # multi-label: an image is of every class it is labelled with
        multi = label < 0
        correct = np.where(multi & (prediction >= 0), group.label_bits(prediction).astype(np.int64), correct)
        on_class = (target >= 0) & np.where(multi, group.label_bits(target), label == target)
    meta["correct"] = correct
    meta["on_class"] = meta["ok"] & on_class  # the class's own images: what its bias is judged on
    return meta


# ---- one explanation group -----------------------------------------------------------------------------------

def _aggregate_group(group: ExplanationGroup, regions: pools.Regions, settings: bias.BiasSettings,
                     compute_options: dict, class_names: Sequence[str]) -> dict:
    meta = _metadata(group)
    ok, on_class, target = meta["ok"], meta["on_class"], meta["target"]
    on_ray = getattr(compute_options["scheduler"], "__module__", "").startswith("ray.")
    relevance, mask = group.lazy("relevance", ray=on_ray), group.lazy("mask", ray=on_ray)
    relevance = relevance.rechunk({1: -1, 2: -1})
    boxes = group.boxes
    fine_keys = np.stack([meta[name] for name in FINE_KEYS], axis=1)
    lazy = scan.scan(relevance, boxes, mask, regions, fine_keys, FINE_KEYS, ok, target, on_class)
    clock = time.perf_counter()
    (done,) = dask.compute(lazy, **compute_options)
    seconds = {"scan": time.perf_counter() - clock, "spot_check": 0.0}
    stats = {name: done.stats[:, i] for i, name in enumerate(scan.ROW_STATS)}
    region_sums = done.stats[:, len(scan.ROW_STATS):]

    total, positive_total = stats["total"], stats["positive_total"]
    residual, conserved = pools.conservation(region_sums, total, 2 * positive_total - total)
    n = len(total)
    inside_sum, inside_positive, object_area = stats["inside"], stats["inside_positive"], stats["object_area"]
    has_object = object_area > 0
    context_usage = np.where(has_object, context.ratio(inside_sum, total), np.nan)
    inside_share = np.where(has_object, context.ratio(inside_positive, positive_total), np.nan)

    # ---- bias: spots from the class maps, then a second read of just the rows of classes with a candidate
    classes = _class_universe(class_names, target)
    spots = bias.find_spots(done.positive, done.outside, settings)
    row_boxes = np.full((n, 4), np.nan)
    for c, spot in spots.items():
        if spot is not None and spot.qualifies:
            row_boxes[on_class & (target == c)] = spot.box
    image_share = np.full(n, np.nan)
    checked = np.flatnonzero(np.isfinite(row_boxes[:, 0]))
    if checked.size:
        read_mask = group.row_reader("mask").rows if mask is not None else None
        lazy = bias.spot_sums(group.row_reader("relevance").rows, checked, row_boxes[checked],
                              None if boxes is None else boxes[checked], read_mask)
        clock = time.perf_counter()
        (spot_sum,) = dask.compute(lazy, **compute_options)
        seconds["spot_check"] = time.perf_counter() - clock
        image_share[checked] = context.ratio(spot_sum, positive_total[checked])

    views = {name: done.maps.regroup(keys) for name, keys in VIEWS.items()}
    views["target_positive"] = done.positive
    if done.outside is not None:
        views["target_positive_outside"] = done.outside

    regions_table = _regions_table(group.name, meta, regions, total, positive_total, region_sums, residual,
                                   conserved, inside_sum, inside_positive, object_area, context_usage, inside_share,
                                   image_share)
    classes_table = _classes_table(group.name, classes, class_names, meta, regions, total, region_sums, conserved,
                                   residual, context_usage, inside_share, object_area, views["target"], spots,
                                   image_share, settings, objects_known=boxes is not None or mask is not None)
    heatmap_rows = []
    for name, view in views.items():
        key_rows = np.stack([meta[k] for k in view.key_names], axis=1)
        if name == "target_positive":
            table = heatmaps.summary(view, key_rows, on_class, positive_total)
        elif name == "target_positive_outside":
            table = heatmaps.summary(view, key_rows, on_class, positive_total - inside_positive)
        else:
            table = heatmaps.summary(view, key_rows, ok, total, meta["output"])
        heatmap_rows.append((name, view, table))
    status = meta["status"]
    counts = {"rows": n, "ok": int(ok.sum()), "failed": int((status == STATUS_FAILED).sum()),
              "nonfinite": int((status == STATUS_NONFINITE).sum()), "pending": int((status == STATUS_PENDING).sum()),
              "not_conserved": int((ok & ~conserved).sum()), "spot_checked_rows": int(np.isfinite(row_boxes[:, 0]).sum())}
    return {"regions": regions_table, "classes": classes_table, "views": heatmap_rows, "counts": counts,
            "seconds": seconds}


def _class_universe(class_names: Sequence[str], target: np.ndarray) -> np.ndarray:
    present = np.unique(target[target >= 0])
    return np.union1d(np.arange(len(class_names)), present).astype(np.int64)


def _regions_table(name, meta, regions, total, positive_total, region_sums, residual, conserved, inside_sum,
                   inside_positive, object_area, context_usage, inside_share, image_share) -> pa.Table:
    ok = meta["ok"]
    columns = {"group": pa.array([name] * int(ok.sum()), pa.string())}
    for key in ("row", "sample_id", "path", "target", "label", "prediction", "correct"):
        columns[key] = meta[key][ok]
    columns["score"] = meta["output"][ok]
    columns["relevance_sum"] = meta["relevance_sum"][ok]
    columns["residual"] = meta["residual"][ok]
    columns["total"] = total[ok]
    columns["positive_total"] = positive_total[ok]
    for r, region in enumerate(regions.names):
        columns[f"region_{region}"] = region_sums[ok, r]
    columns["region_residual"] = residual[ok]
    columns["conserved"] = conserved[ok]
    columns["inside"] = inside_sum[ok]
    columns["inside_positive"] = inside_positive[ok]
    columns["object_area"] = object_area[ok]
    columns["context_usage"] = context_usage[ok]
    columns["inside_share_positive"] = inside_share[ok]
    columns["spot_share"] = image_share[ok]
    return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})


def _classes_table(name, classes, class_names, meta, regions, total, region_sums, conserved, residual, context_usage,
                   inside_share, object_area, target_maps, spots, image_share, settings, objects_known) -> pa.Table:
    ok, on_class, target, status = meta["ok"], meta["on_class"], meta["target"], meta["status"]
    heat = heatmaps.summary(target_maps, target[:, None], ok, total, meta["output"]).to_pydict()
    heat_of = {k: i for i, k in enumerate(heat["target"])}
    context_share = np.full(len(classes), np.nan)
    for i, c in enumerate(classes):
        shares = inside_share[on_class & (target == c)]
        shares = shares[np.isfinite(shares)]
        context_share[i] = 1 - shares.mean() if shares.size else np.nan
    # classes too small to judge are left out of the other classes' median too
    judged = np.array([(on_class & (target == c)).sum() >= settings.min_images for c in classes], bool)
    context_score, context_reference = bias.context_scores(np.where(judged, context_share, np.nan))
    usage = context.distribution(context_usage[ok], target[ok], "context_usage").to_pydict()
    inside = context.distribution(inside_share[on_class], target[on_class], "inside_share_positive").to_pydict()
    usage_of = {k: i for i, k in enumerate(usage["group"])}
    inside_of = {k: i for i, k in enumerate(inside["group"])}

    rows = []
    for i, c in enumerate(classes):
        of_class = target == c
        mine = ok & of_class
        n_images = int((on_class & of_class).sum())
        total_sum = total[mine].sum()
        h = heat_of.get(int(c))
        row = {
            "group": name, "class": int(c), "class_name": class_names[c] if c < len(class_names) else str(c),
            "n_rows": int(of_class.sum()), "n_ok": int(mine.sum()), "n_images": n_images,
            "n_failed": int((of_class & (status == STATUS_FAILED)).sum()),
            "n_nonfinite": int((of_class & (status == STATUS_NONFINITE)).sum()),
            "n_pending": int((of_class & (status == STATUS_PENDING)).sum()),
            "n_correct": int((mine & (meta["correct"] == 1)).sum()),
            "accuracy": _mean(meta["correct"][mine & (meta["correct"] >= 0)]),
            "mean_score": np.nan if h is None else heat["mean_score"][h],
            "mean_total": np.nan if h is None else heat["mean_total"][h],
            "heatmap_sum": np.nan if h is None else heat["heatmap_sum"][h],
            "aggregation_gap": np.nan if h is None else heat["aggregation_gap"][h],
            "explanation_gap": np.nan if h is None else heat["explanation_gap"][h],
        }
        for r, region in enumerate(regions.names):
            row[f"fraction_{region}"] = float(region_sums[mine, r].sum() / total_sum) if mine.any() and total_sum else np.nan
        row["n_conserved"] = int((mine & conserved).sum())
        row["max_region_residual"] = float(np.abs(residual[mine]).max()) if mine.any() else np.nan
        for table, index, prefix in ((usage, usage_of, "context_usage"), (inside, inside_of, "inside_share_positive")):
            j = index.get(int(c))
            for key in table:
                if key != "group":
                    row[key] = (0 if key.endswith("_n") else np.nan) if j is None else table[key][j]
        row["object_area"] = _mean(object_area[on_class & of_class])
        row["context_share"] = context_share[i]

        spot = spots.get(int(c))
        shares = image_share[on_class & of_class]
        checked = spot is not None and spot.qualifies
        verdict = bias.judge(spot, shares if checked else np.zeros(0), context_share[i], context_score[i],
                             context_reference[i], n_images, settings, objects_known)
        x0, y0, x1, y1 = spot.box if spot is not None else (-1, -1, -1, -1)
        row.update(spot_x0=x0, spot_y0=y0, spot_x1=x1, spot_y1=y1,
                   spot_area=spot.area if spot else np.nan, spot_share=spot.share if spot else np.nan)
        row.update(verdict)
        top = np.zeros(0, np.int64)
        if checked:
            candidates = np.flatnonzero(on_class & of_class & np.isfinite(image_share))
            order = np.lexsort((candidates, -image_share[candidates]))  # most first, ties by row
            top = candidates[order[: settings.top_images]]
        row.update(top_rows=meta["row"][top].tolist(), top_sample_ids=meta["sample_id"][top].tolist(),
                   top_paths=[str(p) for p in meta["path"][top]], top_spot_shares=image_share[top].tolist())
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=_classes_schema(regions, rows))
    ranking = np.lexsort((table["class"].to_numpy(), -np.nan_to_num(table["bias_score"].to_numpy(), nan=-np.inf)))
    rank = np.empty(len(ranking), np.int64)
    rank[ranking] = np.arange(1, len(ranking) + 1)
    return table.append_column("bias_rank", pa.array(rank))


def _classes_schema(regions: pools.Regions, rows: list[dict]) -> pa.Schema:
    """Explicit types so that empty or all-NaN columns keep their type (int, float, list) in every run."""
    fields = []
    for key in rows[0] if rows else []:
        if key in ("group", "class_name", "flag", "reason"):
            kind = pa.string()
        elif key == "flagged":
            kind = pa.bool_()
        elif key in ("top_rows", "top_sample_ids"):
            kind = pa.list_(pa.int64())
        elif key == "top_paths":
            kind = pa.list_(pa.string())
        elif key == "top_spot_shares":
            kind = pa.list_(pa.float64())
        elif key == "class" or key.startswith(("n_", "spot_x", "spot_y")) or key.endswith("_n") or key == "spot_images":
            kind = pa.int64()
        else:
            kind = pa.float64()
        fields.append(pa.field(key, kind))
    return pa.schema(fields)


def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else np.nan


# ---- entry points ----------------------------------------------------------------------------------------------

def aggregate(store_url: str, out_dir: str | None = None, *, groups: Sequence[str] | None = None,
              grid: str | tuple[int, int] = "3x1", masks: Mapping[str, np.ndarray] | None = None,
              scheduler: str | None = None, num_workers: int | None = None,
              settings: bias.BiasSettings = bias.BiasSettings(),
              storage_options: Mapping | None = None) -> AggregateResult:
    """Aggregate every explanation group of a store (or ``groups``) and write the outputs to ``out_dir``.

    ``grid`` ("ROWSxCOLS", default thirds) or ``masks`` (name -> (H, W) bool, disjoint) define the region
    pools; ``scheduler`` picks where Dask runs (see :func:`scheduler_options`). Rerunning overwrites
    the outputs with identical values.
    """
    store = open_store(store_url, storage_options=storage_options)
    out_dir = str(out_dir or default_out_dir(store_url))
    names = list(groups or store.group_names)
    unknown = sorted(set(names) - set(store.group_names))
    if unknown:
        raise ValueError(f"no explanation group(s) {unknown} in {store_url!r}; the store has {store.group_names}")
    if masks is not None:
        regions = pools.from_masks(masks)
        if (regions.height, regions.width) != (store.height, store.width):
            raise ValueError(f"masks are {regions.height}x{regions.width}, the store's maps {store.height}x{store.width}")
    else:
        rows, cols = pools.parse_grid(grid) if isinstance(grid, str) else grid
        regions = pools.grid(store.height, store.width, rows, cols)

    per_group, seconds = {}, {}
    with scheduler_options(scheduler, num_workers) as options:
        for name in names:
            start = time.perf_counter()
            per_group[name] = _aggregate_group(store.group(name), regions, settings, options, store.class_names)
            seconds[name] = dict(per_group[name]["seconds"], total=time.perf_counter() - start)

    summary = {
        "format": OUTPUT_FORMAT, "store": str(store_url), "class_names": store.class_names,
        "map_shape": [store.height, store.width], "regions": regions.describe(), "settings": settings.as_dict(),
        "views": {**{k: list(v) for k, v in VIEWS.items()}, "target_positive": ["target"],
                  "target_positive_outside": ["target"]},
        "groups": {name: result["counts"] for name, result in per_group.items()},
    }
    result = AggregateResult(
        out_dir=out_dir,
        regions=pa.concat_tables([r["regions"] for r in per_group.values()]),
        classes=pa.concat_tables([r["classes"] for r in per_group.values()]),
        heatmap_table=_heatmap_table(per_group),
        summary=summary, seconds=seconds,
    )
    start = time.perf_counter()
    _write(result, regions, per_group, store.class_names)
    seconds["write"] = time.perf_counter() - start
    return result


def _heatmap_table(per_group: dict) -> pa.Table:
    tables = []
    for name, result in per_group.items():
        for view_name, _, table in result["views"]:
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


def _write(result: AggregateResult, regions: pools.Regions, per_group: dict, class_names: Sequence[str]) -> None:
    fs, path = fsspec.core.url_to_fs(result.out_dir)
    fs.makedirs(path, exist_ok=True)
    for name, table in (("regions", result.regions), ("classes", result.classes), ("heatmaps", result.heatmap_table)):
        pq.write_table(table, _join(path, f"{name}.parquet"), filesystem=fs)
    with fs.open(_join(path, "summary.json"), "w") as handle:
        json.dump(result.summary, handle, indent=2, sort_keys=True, default=str)

    root = zarr.open_group(_join(result.out_dir, "heatmaps.zarr"), mode="w", zarr_format=3)
    root.attrs.update({"lrp_audit_aggregates": OUTPUT_FORMAT, "class_names": list(class_names),
                       "regions": regions.describe(), "store": result.summary["store"]})
    root.create_array("regions", data=regions.mask_stack(), dimension_names=("region", "y", "x"))
    for name, result_group in per_group.items():
        node = root.require_group(name)
        for view_name, view, _ in result_group["views"]:  # one array per view; its groups' keys in attrs
            array = node.create_array(view_name, shape=view.sums.shape, dtype="float64", fill_value=np.nan,
                                      chunks=(1, *view.sums.shape[1:]), dimension_names=("group", "y", "x"))
            if len(view.sums):
                array[...] = view.means()
            array.attrs.update({"key_names": list(view.key_names), "keys": view.keys.tolist(),
                                "count": view.counts.tolist()})


def load(out_dir: str) -> AggregateResult:
    """Read the outputs of :func:`aggregate` back (tables in memory, heatmaps lazily via ``.heatmaps``)."""
    fs, path = fsspec.core.url_to_fs(str(out_dir))
    if not fs.exists(_join(path, "summary.json")):
        raise FileNotFoundError(f"no aggregates in {out_dir!r}: run 'lrp-audit aggregate STORE --out {out_dir}'")
    with fs.open(_join(path, "summary.json")) as handle:
        summary = json.load(handle)
    tables = {name: pq.read_table(_join(path, f"{name}.parquet"), filesystem=fs)
              for name in ("regions", "classes", "heatmaps")}
    return AggregateResult(str(out_dir), tables["regions"], tables["classes"], tables["heatmaps"], summary)
