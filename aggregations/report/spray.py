"""The report's SpRAy section: per class, its prediction strategies (clusters of relevance maps) side by side.

Shown only when ``lrp-audit spray`` has written its results into the aggregates folder of the run
(``<aggregates>/spray/``, docs/spray.md). Classes in SpRAy's own ranking: a class with a flagged cluster
first, then by split score (how strongly its relevance splits into distinct strategies). Per class the
eigenvalue spectrum (the eigengap chose K), the 2-D embedding coloured by cluster, and per cluster its size,
flag and reason, mean heatmap and the prototypes (the rows nearest the cluster's centre).
"""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow.compute as pc

from aggregations.report import figures as fig
from aggregations.report.runs import AggregatesNote, AuditRun
from aggregations.run import same_location, state_changes
from aggregations.spray.run import SprayResult
from aggregations.spray.run import load as load_spray

PROTOTYPES = 4  # prototype images shown per cluster


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


def _pct(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.0%}"


def to_pixels(pooled: np.ndarray, height: int, width: int) -> np.ndarray:
    """A sum-pooled (gy, gx) map spread back over (height, width) pixels, each cell's sum shared evenly by its
    pixels (the cells of preprocess.sum_pool), so it lines up with the images and keeps its total."""
    gy, gx = pooled.shape
    rows = np.diff((np.arange(gy + 1) * height) // gy)
    cols = np.diff((np.arange(gx + 1) * width) // gx)
    density = pooled / (rows[:, None] * cols[None, :])
    return np.repeat(np.repeat(density, rows, axis=0), cols, axis=1)


def _spot(record: dict):
    if "spot" not in record["flag"]:
        return None
    return record["spot_x0"], record["spot_y0"], record["spot_x1"], record["spot_y1"]


def _prototypes(run: AuditRun, group: str, record: dict) -> list[dict]:
    rows = record["prototype_rows"][:PROTOTYPES]
    if not rows:
        return []
    explanation = run.store.group(group)
    maps = explanation.read_rows("relevance", np.asarray(sorted(rows), np.int64))
    by_row = dict(zip(sorted(rows), maps))
    boxes = explanation.boxes
    out = []
    for row, path in zip(rows, record["prototype_paths"]):
        image = run.images(path)
        row_boxes = boxes[row] if boxes is not None else None
        out.append({"path": path, "overlay": fig.overlay_uri(image, by_row[row], boxes=row_boxes,
                                                             spot=_spot(record))})
    return out


def _cluster(run: AuditRun, spray: SprayResult, group: str, record: dict, image) -> dict:
    mean = spray.cluster_mean(group, record["target"], record["cluster"])
    panel = {"cluster": record["cluster"], "size": record["size"], "share": _pct(record["share"]),
             "accuracy": _pct(record["accuracy"]), "score": _fmt(record["mean_score"]),
             "outside": _pct(record["outside_share_positive"]), "flag": record["flag"], "reason": record["reason"],
             "mean": None, "prototypes": _prototypes(run, group, record)}
    if mean is not None:
        pixels = to_pixels(np.asarray(mean), run.store.height, run.store.width)
        panel["mean"] = fig.overlay_uri(image, pixels, spot=_spot(record))
    return panel


def _class(run: AuditRun, spray: SprayResult, group: str, row: dict, records: list[dict], columns: dict) -> dict:
    target = row["target"]
    image = run.class_image(group, target)
    mine = columns["target"] == target
    xy = np.stack([columns["x"][mine], columns["y"][mine]], axis=1)
    labels = columns["cluster"][mine]
    return {
        "name": row["class_name"], "rank": row["split_rank"], "k": row["n_clusters"], "chosen_by": row["chosen_by"],
        "eigengap": _fmt(row["eigengap"]), "split_score": _fmt(row["split_score"]), "ok": row["n_ok"],
        "excluded": row["n_rows"] - row["n_ok"], "flagged": row["n_flagged"] > 0,
        "eigenvalues": fig.eigenvalue_chart(spray.eigenvalues(group, target), row["n_clusters"]),
        "embedding": fig.embedding_chart(xy, labels) if np.isfinite(xy).all() and len(xy) else None,
        "clusters": [_cluster(run, spray, group, r, image) for r in records],
    }


def spray_columns(spray: SprayResult, group: str) -> dict:
    """target, cluster, x, y of one group's assignments as numpy: read once per section, not once per class."""
    table = spray.assignments.filter(pc.equal(spray.assignments["group"], group))
    return {k: table[k].to_numpy() for k in ("target", "cluster", "x", "y")}


def report_section(run: AuditRun, group: str, max_classes: int) -> dict:
    """``{"spray": None}`` without SpRAy results for this group, else its classes in SpRAy's ranking."""
    try:
        spray = load_spray(run.aggregates.out_dir)
    except FileNotFoundError:
        return {"spray": None}
    recorded = spray.summary.get("store_state")
    if recorded is not None:
        changes = state_changes(recorded, run.state)
        if changes:  # older than the store, or another store's: not shown, and the terminal says why
            if same_location(spray.summary, run.url):
                why = (f"are older than the store {run.url!r} ({'; '.join(changes)}): not shown; run 'lrp-audit spray "
                       f"{run.url} --out {run.aggregates.out_dir}' to include them")
            else:  # that command would overwrite another store's results
                why = (f"were made from {spray.summary.get('store')!r}, not {run.url!r} ({'; '.join(changes)}): not "
                       "shown")
            warnings.warn(AggregatesNote(f"the SpRAy results in {run.aggregates.out_dir!r} {why}"), stacklevel=2)
            return {"spray": None}
    rows = [r for r in spray.classes.to_pylist() if r["group"] == group]
    if not rows:
        return {"spray": None}
    clustered = sorted((r for r in rows if r["status"] == "clustered"), key=lambda r: r["split_rank"])
    records = {}
    for record in spray.clusters.to_pylist():
        if record["group"] == group:
            records.setdefault(record["target"], []).append(record)
    settings = spray.summary.get("settings", {})
    columns = spray_columns(spray, group)
    return {"spray": {
        "classes": [_class(run, spray, group, r, records.get(r["target"], []), columns)
                    for r in clustered[:max_classes]],
        "hidden": max(0, len(clustered) - max_classes),
        "n_flagged": sum(r["n_flagged"] > 0 for r in clustered),
        "skipped": [{"name": r["class_name"], "status": r["status"].replace("_", " "), "ok": r["n_ok"]}
                    for r in rows if r["status"] != "clustered"],
        "min_rows": settings.get("min_rows", "?"),
        "settings": ", ".join(f"{k} {settings[k]}" for k in ("size", "normalise", "neighbors", "clusters", "method",
                                                               "embedding") if k in settings),
    }}
