"""Per-cluster statistics, the flags, and the class's split score (docs/spray.md).

Cluster means are compared as *positive shares*: each map's positive part divided by its positive
total, averaged over the cluster, so a share map adds up to 1. A cluster is flagged

* ``spot`` when the 3x3-cell window around the peak of (its share map - the rest of the class's)
  holds at least ``min_spot_share`` of its positive relevance and ``spot_ratio`` times the rest's
  share there: a place the rest of the class does not use (a watermark, a stamp);
  with object boxes, the window must also lie mostly off the objects (``spot_on_object`` < 0.5: the mean
  share of the window that the cluster's rows' boxes cover), so that a group of images with the object
  at one place is not taken for a cue;
* ``outside`` (with object boxes) when at least ``outside_threshold`` of its positive relevance lies
  outside the boxes and ``outside_margin`` more than for the rest of the class.

split_score = eigengap x divergence, where divergence is the largest total-variation distance between
a cluster's share map and the rest's (0: the clusters look alike; 1: disjoint). 0 for one cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aggregations.context import box_mask
from aggregations.spray.settings import SpraySettings


@dataclass
class Geometry:
    """Where grid cells lie in the map: cell edges in map pixels."""

    height: int
    width: int
    gy: int
    gx: int

    def cell_box(self, y0: int, x0: int, y1: int, x1: int) -> tuple[int, int, int, int]:
        """Cells [y0, y1) x [x0, x1) -> (x0, y0, x1, y1) in map pixels (exclusive ends)."""
        ey = (np.arange(self.gy + 1) * self.height) // self.gy
        ex = (np.arange(self.gx + 1) * self.width) // self.gx
        return int(ex[x0]), int(ey[y0]), int(ex[x1]), int(ey[y1])


def share_maps(pooled: np.ndarray) -> np.ndarray:
    """(n, d) pooled maps -> positive shares, each row adding up to 1 (0 for a map without positive part)."""
    positive = np.maximum(np.asarray(pooled, np.float64), 0)
    total = positive.sum(axis=1, keepdims=True)
    return np.where(total > 0, positive / np.where(total > 0, total, 1.0), 0.0)


def _spot(own: np.ndarray, rest: np.ndarray, geometry: Geometry, cells: int) -> dict:
    """The window around the peak of own - rest, and both shares in it."""
    difference = (own - rest).reshape(geometry.gy, geometry.gx)
    y, x = np.unravel_index(int(np.argmax(difference)), difference.shape)
    half = cells // 2
    y0, x0 = max(y - half, 0), max(x - half, 0)
    y1, x1 = min(y0 + cells, geometry.gy), min(x0 + cells, geometry.gx)
    own_map, rest_map = own.reshape(difference.shape), rest.reshape(difference.shape)
    return {"box": geometry.cell_box(y0, x0, y1, x1), "share": float(own_map[y0:y1, x0:x1].sum()),
            "rest_share": float(rest_map[y0:y1, x0:x1].sum())}


def on_object(window: tuple[int, int, int, int], boxes: np.ndarray | None, geometry: Geometry) -> float:
    """Mean share of the window (x0, y0, x1, y1) that each row's object boxes cover; NaN without boxes."""
    if boxes is None or not np.isfinite(boxes).any():
        return float("nan")
    x0, y0, x1, y1 = window
    covered = box_mask(boxes, geometry.height, geometry.width)[:, y0:y1, x0:x1]
    return float(covered.mean()) if covered.size else float("nan")


def _flag(spot: dict, outside: float, rest_outside: float, alone: bool, settings: SpraySettings) -> tuple[str, str]:
    flags, reasons = [], []
    x0, y0, x1, y1 = spot["box"]
    if not alone and spot["share"] >= settings.min_spot_share and not spot["on_object"] >= 0.5 and \
            spot["share"] >= settings.spot_ratio * max(spot["rest_share"], 1e-12):
        flags.append("spot")
        reasons.append(f"{spot['share']:.0%} of its positive relevance lies in x {x0}-{x1}, y {y0}-{y1} (map pixels), "
                       f"where the rest of the class has {spot['rest_share']:.0%}")
    if np.isfinite(outside) and outside >= settings.outside_threshold and \
            (alone or not np.isfinite(rest_outside) or outside - rest_outside >= settings.outside_margin):
        flags.append("outside")
        rest = "" if alone or not np.isfinite(rest_outside) else f" (rest of the class: {rest_outside:.0%})"
        reasons.append(f"{outside:.0%} of its positive relevance lies outside the object boxes{rest}")
    return "+".join(flags), "; ".join(reasons)


def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _accuracy(label: np.ndarray, prediction: np.ndarray) -> float:
    known = (label >= 0) & (prediction >= 0)
    return float((label[known] == prediction[known]).mean()) if known.any() else float("nan")


def cluster_stats(labels: np.ndarray, pooled: np.ndarray, features: np.ndarray, rows: dict,
                  geometry: Geometry, settings: SpraySettings) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """One dict per cluster (statistics, flag, reason, prototypes), the (c, gy, gx) mean maps, and each
    row's distance to its cluster's mean in feature space (NaN for noise)."""
    shares = share_maps(pooled)
    outside = 1.0 - rows["inside_positive"] / np.where(rows["positive_total"] > 0, rows["positive_total"], np.nan)
    found = [c for c in np.unique(labels) if c >= 0]
    distance = np.full(len(labels), np.nan)
    records, means = [], []
    for c in found:
        member = labels == c
        centre = features[member].mean(axis=0)
        distance[member] = np.linalg.norm(features[member] - centre, axis=1)
        own, rest = shares[member].mean(axis=0), shares[~member].mean(axis=0) if (~member).any() else None
        alone = rest is None
        spot = _spot(own, np.zeros_like(own) if alone else rest, geometry, settings.spot_cells)
        boxes = rows.get("boxes")
        spot["on_object"] = on_object(spot["box"], None if boxes is None else boxes[member], geometry)
        mean_map = np.asarray(pooled[member], np.float64).mean(axis=0).reshape(geometry.gy, geometry.gx)
        peak_y, peak_x = np.unravel_index(int(np.argmax(own)), (geometry.gy, geometry.gx))
        px0, py0, px1, py1 = geometry.cell_box(peak_y, peak_x, peak_y + 1, peak_x + 1)
        out_c, out_rest = _mean(outside[member]), _mean(outside[~member]) if not alone else float("nan")
        flag, reason = _flag(spot, out_c, out_rest, alone, settings)
        order = np.flatnonzero(member)[np.argsort(distance[member], kind="stable")[: settings.prototypes]]
        records.append({
            "cluster": int(c), "size": int(member.sum()), "share": float(member.mean()),
            "mean_score": _mean(rows["output"][member]),
            "accuracy": _accuracy(rows["label"][member], rows["prediction"][member]),
            "inside_share_positive": 1.0 - out_c, "outside_share_positive": out_c,
            "peak_y": (py0 + py1) / 2.0, "peak_x": (px0 + px1) / 2.0,
            "spot_x0": spot["box"][0], "spot_y0": spot["box"][1], "spot_x1": spot["box"][2],
            "spot_y1": spot["box"][3], "spot_share": spot["share"], "rest_spot_share": spot["rest_share"],
            "spot_on_object": spot["on_object"],
            "divergence": 0.0 if alone else 0.5 * float(np.abs(own - rest).sum()),
            "prototype_rows": rows["row"][order].tolist(), "prototype_sample_ids": rows["sample_id"][order].tolist(),
            "prototype_paths": [str(p) for p in rows["path"][order]],
            "flagged": bool(flag), "flag": flag, "reason": reason,
        })
        means.append(mean_map)
    stack = np.stack(means) if means else np.zeros((0, geometry.gy, geometry.gx))
    return records, stack, distance


def split_score(eigengap: float, records: list[dict]) -> float:
    """eigengap x the largest divergence of a cluster from the rest of its class; 0 for one cluster."""
    if len(records) < 2:
        return 0.0
    return float(eigengap) * max(r["divergence"] for r in records)
