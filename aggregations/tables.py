"""The two tables of one explanation group, built column family by column family.

``regions.parquet`` has one row per ok explanation, ``classes.parquet`` one row per class. Every
builder takes ``(meta, stats, bias, settings)``: the group's metadata (:class:`GroupMeta`), what the
scan measured (:class:`aggregations.scan.RowStats`), the bias evidence (:class:`BiasEvidence`) and the
:class:`aggregations.bias.BiasSettings`, and returns its columns in order. A new column goes into one
builder (or a new builder in ``REGION_COLUMNS`` / ``CLASS_COLUMNS``); docs/extending.md says how.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from aggregations import bias, context
from aggregations.scan import RowStats
from pipeline.store import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, STATUS_PENDING, ExplanationGroup

FINE_KEYS = ("target", "label", "prediction", "correct")  # the finest grouping of the heatmaps


@dataclass
class GroupMeta:
    """Per-row metadata of one group (``meta["target"]`` ...: the store's row columns, plus ``ok``, ``correct``
    and ``on_class``), its name, the classes of its class table and whether objects are known."""

    name: str
    columns: dict[str, np.ndarray]
    class_names: list[str]
    objects_known: bool
    classes: np.ndarray = field(init=False)

    def __post_init__(self):
        target = self.columns["target"]
        present = np.unique(target[target >= 0])
        self.classes = np.union1d(np.arange(len(self.class_names)), present).astype(np.int64)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def n_rows(self) -> int:
        return len(self.columns["status"])

    def class_name(self, c: int) -> str:
        return self.class_names[c] if c < len(self.class_names) else str(c)

    @classmethod
    def read(cls, group: ExplanationGroup, class_names: Sequence[str]) -> GroupMeta:
        """The row columns from the store, and which rows are ok, correct and of the class they explain."""
        rows = group.checked_rows()  # a damaged store is refused here, not audited as it reads
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
        return cls(group.name, meta, list(class_names), objects_known=group.has("boxes") or group.has("mask"))

    def keys(self, names: Sequence[str]) -> np.ndarray:
        """(N, k) int64: the rows' values of these key columns."""
        return np.stack([self.columns[name] for name in names], axis=1)


@dataclass
class BiasEvidence:
    """What the bias flags rest on: per class (``meta.classes`` order) its spot and context scores, per row
    the share of its positive relevance in its class's spot (NaN unless checked), and the per-class
    summary of the class-average heatmaps (``heatmaps.summary`` of the ``target`` view)."""

    spots: dict
    target_summary: pa.Table
    context_share: np.ndarray
    context_score: np.ndarray
    context_reference: np.ndarray

    @classmethod
    def judge(cls, meta: GroupMeta, stats: RowStats, spots: dict, target_summary: pa.Table,
              settings: bias.BiasSettings) -> BiasEvidence:
        """Context shares and scores per class; classes too small to judge are left out of the others' median."""
        on_class, target = meta["on_class"], meta["target"]
        shares = np.full(len(meta.classes), np.nan)
        judged = np.zeros(len(meta.classes), bool)
        for i, c in enumerate(meta.classes):
            mine = on_class & (target == c)
            values = stats.inside_share_positive[mine]
            values = values[np.isfinite(values)]
            shares[i] = 1 - values.mean() if values.size else np.nan
            judged[i] = mine.sum() >= settings.min_images
        score, reference = bias.context_scores(np.where(judged, shares, np.nan))
        return cls(spots, target_summary, shares, score, reference)


# ---- regions.parquet: one row per ok explanation ----------------------------------------------------------------

def _row_identity(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok = meta["ok"]
    columns = {"group": pa.array([meta.name] * int(ok.sum()), pa.string())}
    columns.update({key: meta[key][ok] for key in ("row", "sample_id", "path", "target", "label", "prediction",
                                                    "correct")})
    columns["path"] = pa.array(columns["path"].tolist(), pa.string())  # typed: a group without an ok row has none
    return columns


def _row_scores(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok = meta["ok"]
    return {"score": meta["output"][ok], "relevance_sum": meta["relevance_sum"][ok], "residual": meta["residual"][ok],
            "total": stats.total[ok], "positive_total": stats.positive_total[ok]}


def _row_regions(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok = meta["ok"]
    columns = {f"region_{region}": stats.region_sums[ok, r] for r, region in enumerate(stats.region_names)}
    columns.update(region_residual=stats.region_residual[ok], conserved=stats.conserved[ok])
    return columns


def _row_objects(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok = meta["ok"]
    return {"inside": stats.inside[ok], "inside_positive": stats.inside_positive[ok],
            "object_area": stats.object_area[ok], "context_usage": stats.context_usage[ok],
            "inside_share_positive": stats.inside_share_positive[ok], "spot_share": stats.spot_share[ok]}


REGION_COLUMNS = (_row_identity, _row_scores, _row_regions, _row_objects)


def regions_table(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings: bias.BiasSettings) -> pa.Table:
    columns = {}
    for builder in REGION_COLUMNS:
        columns.update(builder(meta, stats, evidence, settings))
    return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})


# ---- classes.parquet: one row per class ---------------------------------------------------------------------------

def _mean(values: np.ndarray) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else np.nan


def _class_counts(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok, on_class, target = meta["ok"], meta["on_class"], meta["target"]
    status, correct = meta["status"], meta["correct"]
    columns = {key: [] for key in ("group", "class", "class_name", "n_rows", "n_ok", "n_images", "n_failed",
                                   "n_nonfinite", "n_pending", "n_correct", "accuracy")}
    for c in meta.classes:
        of_class = target == c
        mine = ok & of_class
        for key, value in (("group", meta.name), ("class", int(c)), ("class_name", meta.class_name(c)),
                           ("n_rows", int(of_class.sum())), ("n_ok", int(mine.sum())),
                           ("n_images", int((on_class & of_class).sum())),
                           ("n_failed", int((of_class & (status == STATUS_FAILED)).sum())),
                           ("n_nonfinite", int((of_class & (status == STATUS_NONFINITE)).sum())),
                           ("n_pending", int((of_class & (status == STATUS_PENDING)).sum())),
                           ("n_correct", int((mine & (correct == 1)).sum())),
                           ("accuracy", _mean(correct[mine & (correct >= 0)]))):
            columns[key].append(value)
    return columns


def _class_heatmaps(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    heat = evidence.target_summary.to_pydict()
    index = {k: i for i, k in enumerate(heat["target"])}
    keys = ("mean_score", "mean_total", "heatmap_sum", "aggregation_gap", "explanation_gap")
    return {key: [np.nan if index.get(int(c)) is None else heat[key][index[int(c)]] for c in meta.classes]
            for key in keys}


def _class_regions(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok, target = meta["ok"], meta["target"]
    columns = {f"fraction_{region}": [] for region in stats.region_names}
    columns.update(n_conserved=[], max_region_residual=[])
    for c in meta.classes:
        mine = ok & (target == c)
        total_sum = stats.total[mine].sum()
        for r, region in enumerate(stats.region_names):
            columns[f"fraction_{region}"].append(float(stats.region_sums[mine, r].sum() / total_sum)
                                                 if mine.any() and total_sum else np.nan)
        columns["n_conserved"].append(int((mine & stats.conserved).sum()))
        largest = float(np.abs(stats.region_residual[mine]).max()) if mine.any() else np.nan
        columns["max_region_residual"].append(largest)
    return columns


def _class_context(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    ok, on_class, target = meta["ok"], meta["on_class"], meta["target"]
    columns = {}
    for values, rows, prefix in ((stats.context_usage, ok, "context_usage"),
                                 (stats.inside_share_positive, on_class, "inside_share_positive")):
        table = context.distribution(values[rows], target[rows], prefix).to_pydict()
        index = {k: i for i, k in enumerate(table["group"])}
        for key in table:
            if key != "group":
                empty = 0 if key.endswith("_n") else np.nan
                columns[key] = [empty if index.get(int(c)) is None else table[key][index[int(c)]]
                                for c in meta.classes]
    columns["object_area"] = [_mean(stats.object_area[on_class & (target == c)]) for c in meta.classes]
    columns["context_share"] = list(evidence.context_share)
    return columns


def _class_verdict(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings) -> dict:
    """The spot, the scores, the flag and its reason, and the images that show the spot most."""
    on_class, target = meta["on_class"], meta["target"]
    image_share = stats.spot_share
    rows = []
    for i, c in enumerate(meta.classes):
        mine = on_class & (target == c)
        spot = evidence.spots.get(int(c))
        checked = spot is not None and spot.qualifies
        verdict = bias.judge(spot, image_share[mine] if checked else np.zeros(0), evidence.context_share[i],
                             evidence.context_score[i], evidence.context_reference[i], int(mine.sum()), settings,
                             meta.objects_known)
        x0, y0, x1, y1 = spot.box if spot is not None else (-1, -1, -1, -1)
        row = dict(spot_x0=x0, spot_y0=y0, spot_x1=x1, spot_y1=y1,
                   spot_area=spot.area if spot else np.nan, spot_share=spot.share if spot else np.nan)
        row.update(verdict)
        top = np.zeros(0, np.int64)
        if checked:
            candidates = np.flatnonzero(mine & np.isfinite(image_share))
            order = np.lexsort((candidates, -image_share[candidates]))  # most first, ties by row
            top = candidates[order[: settings.top_images]]
        row.update(top_rows=meta["row"][top].tolist(), top_sample_ids=meta["sample_id"][top].tolist(),
                   top_paths=[str(p) for p in meta["path"][top]], top_spot_shares=image_share[top].tolist())
        rows.append(row)
    return {key: [row[key] for row in rows] for key in (rows[0] if rows else ())}


CLASS_COLUMNS = (_class_counts, _class_heatmaps, _class_regions, _class_context, _class_verdict)


def classes_table(meta: GroupMeta, stats: RowStats, evidence: BiasEvidence, settings: bias.BiasSettings) -> pa.Table:
    """One row per class, ranked by bias score (``bias_rank`` 1: most suspicious; ties by class)."""
    columns = {}
    for builder in CLASS_COLUMNS:
        columns.update(builder(meta, stats, evidence, settings))
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    table = pa.Table.from_pylist(rows, schema=_classes_schema(rows))
    ranking = np.lexsort((table["class"].to_numpy(), -np.nan_to_num(table["bias_score"].to_numpy(), nan=-np.inf)))
    rank = np.empty(len(ranking), np.int64)
    rank[ranking] = np.arange(1, len(ranking) + 1)
    return table.append_column("bias_rank", pa.array(rank))


def _classes_schema(rows: list[dict]) -> pa.Schema:
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
