"""The SpRAy outputs as tables (Parquet) and arrays (Zarr): one row per explanation row, per cluster, per class."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import zarr

from aggregations.spray.settings import SpraySettings
from pipeline.store import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, STATUS_PENDING

FORMAT = 1


def class_universe(target: np.ndarray, classes: Sequence[int] | None, n_names: int) -> list[int]:
    """The classes to report: the given ones (each must be a known class), else every explained target."""
    present = sorted(int(c) for c in np.unique(target[target >= 0]))
    if classes is None:
        return present
    unknown = sorted({int(c) for c in classes} - set(range(n_names)) - set(present))
    if unknown:
        raise ValueError(f"unknown class(es) {unknown}: the store's classes are 0..{n_names - 1}")
    return sorted({int(c) for c in classes})


def _ranks(scores: dict[int, float], flagged: dict[int, bool]) -> dict[int, int]:
    """Rank 1 = most suspicious: classes with a flagged cluster first, then by split score, ties by class."""
    order = sorted(scores, key=lambda c: (not flagged[c], -scores[c], c))
    return {c: rank + 1 for rank, c in enumerate(order)}


def _class_rows(name: str, done: dict, class_names: Sequence[str], settings: SpraySettings) -> list[dict]:
    meta, results = done["meta"], done["results"]
    status, target = meta["status"], meta["target"]
    ranks = _ranks({c: r["split_score"] for c, r in results.items()},
                   {c: any(x["flagged"] for x in r["records"]) for c, r in results.items()})
    rows = []
    for c in done["universe"]:
        mine = target == c
        n_ok = int((mine & (status == STATUS_OK)).sum())
        result = results.get(c)
        rows.append({
            "group": name, "target": c, "class_name": class_names[c] if c < len(class_names) else str(c),
            "status": "clustered" if result else ("no_rows" if n_ok == 0 else "too_small"),
            "n_rows": int(mine.sum()), "n_ok": n_ok, "n_failed": int((mine & (status == STATUS_FAILED)).sum()),
            "n_nonfinite": int((mine & (status == STATUS_NONFINITE)).sum()),
            "n_pending": int((mine & (status == STATUS_PENDING)).sum()),
            "n_clusters": result["n_clusters"] if result else 0,
            "chosen_by": result["chosen_by"] if result else "",
            "eigengap": result["eigengap"] if result else float("nan"),
            "split_score": result["split_score"] if result else float("nan"),
            "split_rank": ranks.get(c, -1),
            "n_flagged": sum(r["flagged"] for r in result["records"]) if result else 0,
            "approximate_knn": bool(result["approximate_knn"]) if result else False,
            "seconds": result["seconds"] if result else 0.0,
        })
    return rows


def _assignment_rows(name: str, done: dict) -> dict[str, list]:
    meta, columns = done["meta"], {k: [] for k in ASSIGNMENT_SCHEMA.names}
    for c, result in done["results"].items():
        rows = np.flatnonzero((meta["target"] == c) & (meta["status"] == STATUS_OK))
        n = len(rows)
        columns["group"] += [name] * n
        for key in ("row", "sample_id", "path", "target", "label", "prediction"):
            columns[key] += meta[key][rows].tolist()
        columns["cluster"] += result["labels"].tolist()
        columns["x"] += result["coordinates"][:, 0].tolist()
        columns["y"] += result["coordinates"][:, 1].tolist()
        columns["distance"] += result["distance"].tolist()
    return columns


def build(out_dir: str, per_group: dict, store, settings: SpraySettings) -> tuple:
    """(assignments, clusters, classes, summary) from the per-group results of run.py."""
    assignments = {k: [] for k in ASSIGNMENT_SCHEMA.names}
    clusters, classes = [], []
    for name, done in per_group.items():
        for key, values in _assignment_rows(name, done).items():
            assignments[key] += values
        class_rows = _class_rows(name, done, store.class_names, settings)
        classes += class_rows
        info = {r["target"]: r for r in class_rows}
        for c, result in done["results"].items():
            for record in result["records"]:
                clusters.append({"group": name, "target": c, "class_name": info[c]["class_name"],
                                 "n_clusters": result["n_clusters"], "eigengap": result["eigengap"],
                                 "split_score": result["split_score"], "split_rank": info[c]["split_rank"], **record})
    summary = {
        "format": FORMAT, "store": store.url, "class_names": store.class_names, "map_shape": [store.height, store.width],
        "grid": {name: [done["geometry"].gy, done["geometry"].gx] for name, done in per_group.items()},
        "settings": settings.as_dict(),
        "groups": {name: {s: sum(1 for r in classes if r["group"] == name and r["status"] == s)
                          for s in ("clustered", "too_small", "no_rows")} for name in per_group},
    }
    cluster_table = pa.Table.from_pylist(clusters, schema=CLUSTER_SCHEMA) if clusters else CLUSTER_SCHEMA.empty_table()
    return (pa.table(assignments, schema=ASSIGNMENT_SCHEMA), cluster_table,
            pa.Table.from_pylist(classes, schema=CLASS_SCHEMA) if classes else CLASS_SCHEMA.empty_table(), summary)


def write_arrays(node: zarr.Group, done: dict) -> None:
    """Eigenvalues (class, m) NaN-padded and cluster mean maps (cluster, gy, gx) with their keys in attrs."""
    results, geometry = done["results"], done["geometry"]
    targets = sorted(results)
    width = max((len(results[c]["eigenvalues"]) for c in targets), default=0)
    values = np.full((len(targets), width), np.nan)
    for i, c in enumerate(targets):
        values[i, : len(results[c]["eigenvalues"])] = results[c]["eigenvalues"]
    array = node.create_array("eigenvalues", shape=values.shape, dtype="float64", fill_value=np.nan,
                              dimension_names=("class", "eigenvalue"))
    if values.size:
        array[...] = values
    array.attrs["targets"] = targets
    keys = [[c, r["cluster"]] for c in targets for r in results[c]["records"]]
    means = [results[c]["means"] for c in targets]
    stack = np.concatenate(means) if means else np.zeros((0, geometry.gy, geometry.gx))
    array = node.create_array("cluster_means", shape=stack.shape, dtype="float64", fill_value=np.nan,
                              chunks=(1, geometry.gy, geometry.gx), dimension_names=("cluster", "gy", "gx"))
    if stack.size:
        array[...] = stack
    array.attrs.update({"keys": keys, "key_names": ["target", "cluster"], "map_shape": [geometry.height, geometry.width]})


ASSIGNMENT_SCHEMA = pa.schema([
    ("group", pa.string()), ("row", pa.int64()), ("sample_id", pa.int64()), ("path", pa.string()),
    ("target", pa.int64()), ("label", pa.int64()), ("prediction", pa.int64()), ("cluster", pa.int64()),
    ("x", pa.float64()), ("y", pa.float64()), ("distance", pa.float64()),
])
CLUSTER_SCHEMA = pa.schema([
    ("group", pa.string()), ("target", pa.int64()), ("class_name", pa.string()), ("n_clusters", pa.int64()),
    ("eigengap", pa.float64()), ("split_score", pa.float64()), ("split_rank", pa.int64()), ("cluster", pa.int64()),
    ("size", pa.int64()), ("share", pa.float64()), ("mean_score", pa.float64()), ("accuracy", pa.float64()),
    ("inside_share_positive", pa.float64()), ("outside_share_positive", pa.float64()),
    ("peak_y", pa.float64()), ("peak_x", pa.float64()),
    *[(k, pa.int64()) for k in ("spot_x0", "spot_y0", "spot_x1", "spot_y1")],
    ("spot_share", pa.float64()), ("rest_spot_share", pa.float64()), ("spot_on_object", pa.float64()), ("divergence", pa.float64()),
    ("prototype_rows", pa.list_(pa.int64())), ("prototype_sample_ids", pa.list_(pa.int64())),
    ("prototype_paths", pa.list_(pa.string())), ("flagged", pa.bool_()), ("flag", pa.string()), ("reason", pa.string()),
])
CLASS_SCHEMA = pa.schema([
    ("group", pa.string()), ("target", pa.int64()), ("class_name", pa.string()), ("status", pa.string()),
    *[(k, pa.int64()) for k in ("n_rows", "n_ok", "n_failed", "n_nonfinite", "n_pending", "n_clusters")],
    ("chosen_by", pa.string()), ("eigengap", pa.float64()), ("split_score", pa.float64()), ("split_rank", pa.int64()),
    ("n_flagged", pa.int64()), ("approximate_knn", pa.bool_()), ("seconds", pa.float64()),
])
