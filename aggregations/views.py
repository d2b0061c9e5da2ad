"""Heatmap views under a memory budget: the scan in passes over blocks of target classes, maps spilled to Zarr.

The partial maps of the scan are kept per (target, label, prediction, correct) group, H x W float64
each, so memory grows with the number of groups a dataset has, not with its rows. :func:`plan_passes`
cuts the target classes into blocks whose maps fit in a budget (default 2 GiB); each block is one scan
pass that reads only the chunks holding its rows, and :class:`ViewWriter` writes the block's finished
views straight into ``heatmaps.zarr``. What stays in memory across passes grows with the classes only:
the ``prediction`` view (its groups span every block) and one share map per class for the spots.
A store whose groups fit in the budget takes one pass, as before; every pass adds the same maps in
the same order, so the results do not depend on the number of passes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import zarr

from aggregations import heatmaps
from aggregations.scan import RowStats, ScanResult
from aggregations.tables import GroupMeta

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of heatmaps held at once (docs/aggregates.md)
# maps held per fine group during a pass: its partial sums, their merge, and the views regrouped from them
MAPS_PER_GROUP = 4
MAPS_PER_CLASS = 6  # per class of a pass: target, target_correct (2), positive, outside, their merge
# held across passes per class: the prediction view and the share map of the spot search
FIXED_MAPS_PER_CLASS = 2

# heatmap views: name -> key columns of the finest grouping (target, label, prediction, correct)
VIEWS = {
    "target": ("target",),
    "label_target": ("label", "target"),
    "prediction": ("prediction",),
    "target_correct": ("target", "correct"),
}
POSITIVE_VIEWS = ("target_positive", "target_positive_outside")  # keyed by target, over the class's own images


def plan_passes(meta: GroupMeta, map_bytes: int, budget: int | None = DEFAULT_MEMORY_BUDGET) -> list[np.ndarray]:
    """Blocks of target values (ascending; -1 included when it has ok rows) whose maps fit in ``budget`` bytes.

    A class whose groups alone exceed the budget is a block of its own: the budget is then exceeded by
    that class. ``budget=None``: one pass, whatever it holds.
    """
    ok = meta["ok"]
    fine = np.unique(meta.keys(("target", "label", "prediction", "correct"))[ok], axis=0)
    targets, groups = np.unique(fine[:, 0], return_counts=True) if len(fine) else (np.zeros(0, np.int64),) * 2
    if budget is None:
        return [targets]
    available = budget - FIXED_MAPS_PER_CLASS * len(meta.classes) * map_bytes
    blocks, block, used = [], [], 0
    for target, count in zip(targets, groups):
        cost = (MAPS_PER_GROUP * int(count) + MAPS_PER_CLASS) * map_bytes
        if block and used + cost > available:
            blocks.append(np.array(block, np.int64))
            block, used = [], 0
        block.append(int(target))
        used += cost
    blocks.append(np.array(block, np.int64))
    return blocks


def pass_bytes(meta: GroupMeta, map_bytes: int, block: np.ndarray) -> int:
    """The estimate :func:`plan_passes` works with, for one block (benchmarks print it beside the measured peak)."""
    ok = meta["ok"] & np.isin(meta["target"], block)
    groups = len(np.unique(meta.keys(("target", "label", "prediction", "correct"))[ok], axis=0))
    fixed = FIXED_MAPS_PER_CLASS * len(meta.classes)
    return (MAPS_PER_GROUP * groups + MAPS_PER_CLASS * len(block) + fixed) * map_bytes


class ViewWriter:
    """Every view's arrays in ``node`` (keys and counts known from the metadata), filled pass by pass.

    ``add`` writes the views a pass completes (all but ``prediction``, whose sums are added up across
    passes) and keeps their summary tables; ``finish`` writes ``prediction`` and returns every view's
    summary table in key order.
    """

    def __init__(self, node: zarr.Group, meta: GroupMeta, shape: tuple[int, int]):
        self.node, self.meta, self.shape = node, meta, tuple(shape)
        self.names = [*VIEWS, *(POSITIVE_VIEWS if meta.objects_known else POSITIVE_VIEWS[:1])]
        self.keys, self.position, self.parts = {}, {}, {name: [] for name in self.names}
        for name in self.names:
            key_names, select = self._rows(name)
            keys = meta.keys(key_names)[select]
            keys, counts = np.unique(keys[(keys >= 0).all(axis=1)], axis=0, return_counts=True)
            keys = keys.reshape(-1, len(key_names)).astype(np.int64)
            self.keys[name] = (keys, counts.astype(np.int64))
            self.position[name] = {tuple(key): i for i, key in enumerate(keys.tolist())}
            array = node.create_array(name, shape=(len(keys), *self.shape), dtype="float64", fill_value=np.nan,
                                      chunks=(1, *self.shape), dimension_names=("group", "y", "x"))
            array.attrs.update({"key_names": list(key_names), "keys": keys.tolist(), "count": counts.tolist()})
        self.prediction_sums = np.zeros((len(self.keys["prediction"][0]), *self.shape))
        self.prediction_counts = np.zeros(len(self.prediction_sums), np.int64)

    def _rows(self, name: str) -> tuple[Sequence[str], np.ndarray]:
        if name in VIEWS:
            return VIEWS[name], self.meta["ok"]
        return ("target",), self.meta["on_class"]

    def _summary(self, name: str, view: heatmaps.GroupedMaps, means: np.ndarray, stats: RowStats) -> pa.Table:
        key_rows = self.meta.keys(view.key_names)
        if name == "target_positive":
            return heatmaps.summary(view, key_rows, self.meta["on_class"], stats.positive_total,
                                    heatmap_sum=means.sum(axis=(1, 2)))
        if name == "target_positive_outside":
            return heatmaps.summary(view, key_rows, self.meta["on_class"], stats.positive_total - stats.inside_positive,
                                    heatmap_sum=means.sum(axis=(1, 2)))
        return heatmaps.summary(view, key_rows, self.meta["ok"], stats.total, self.meta["output"],
                                heatmap_sum=means.sum(axis=(1, 2)))

    def _write(self, name: str, view: heatmaps.GroupedMaps, stats: RowStats) -> None:
        means = view.means()
        positions = np.array([self.position[name][tuple(key)] for key in view.keys.tolist()], np.int64)
        array = self.node[name]
        for i, position in enumerate(positions):
            array[position] = means[i]
        self.parts[name].append((positions, self._summary(name, view, means, stats)))

    def add(self, done: ScanResult, stats: RowStats) -> None:
        """The views of one pass; ``stats`` must hold the rows of its block."""
        views = {name: done.maps.regroup(keys) for name, keys in VIEWS.items() if name != "prediction"}
        views["target_positive"] = done.positive
        if done.outside is not None:
            views["target_positive_outside"] = done.outside
        for name, view in views.items():
            self._write(name, view, stats)
        predictions = done.maps.keys[:, done.maps.key_names.index("prediction")]
        kept = predictions >= 0  # regroup's order: the fine groups in key order, added one after the other
        index = np.array([self.position["prediction"][(int(p),)] for p in predictions[kept]], np.int64)
        np.add.at(self.prediction_sums, index, done.maps.sums[kept])
        np.add.at(self.prediction_counts, index, done.maps.counts[kept])

    def finish(self, stats: RowStats) -> list[tuple[str, pa.Table]]:
        """Write ``prediction``; every view's summary table, rows in the order of its array."""
        keys, _ = self.keys["prediction"]
        prediction = heatmaps.GroupedMaps(("prediction",), keys, self.prediction_sums, self.prediction_counts)
        self._write("prediction", prediction, stats)
        self.prediction_sums = None
        out = []
        for name in self.names:
            parts = self.parts[name]
            if not parts:
                continue
            positions = np.concatenate([p for p, _ in parts])
            table = pa.concat_tables([t for _, t in parts])
            out.append((name, table.take(pa.array(np.argsort(positions, kind="stable")))))
        return out
