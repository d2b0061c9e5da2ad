"""The audit report: one self-contained HTML file a person reads to find a model's shortcuts.

``render_report(store)`` reads a relevance store and its aggregates (computing them when missing),
and renders ``templates/report.html.j2`` with jinja2 (autoescape on: class names and paths come from
the dataset and are shown as text, never as markup). Images are embedded as base64 PNG and the page
carries a Content-Security-Policy that forbids scripts and remote resources, so the file is safe to
open and to mail around. Sections, most important first: the headline finding, the flagged classes
with their evidence, per-class average heatmaps over the class-average image, region pools with the
conservation check, context usage, parameter sweeps (several groups of one store side by side, as
Figs. 4-5 of Binder et al. 2016), a model comparison (a second store of the same data, §4.2), and
failures and conservation residuals.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregations import aopc, report_figures as fig
from aggregations.run import AggregateResult, aggregate, default_out_dir, load
from pipeline.store import STATUS_NAMES, STATUS_OK, RelevanceStore, open_store

TEMPLATES = Path(__file__).parent / "templates"
MAX_CLASSES = 40  # per-class galleries show at most this many classes (flagged and highest-scored first)
CLASS_IMAGES = 24  # the class-average image is the mean of at most this many of the class's images
EVIDENCE_IMAGES = 5


# ---- reading one run -------------------------------------------------------------------------------------

class ImageReader:
    """The images of a store's rows in the model's input geometry (float RGB in [0, 1]), or None.

    Uses the run's own preprocessing (from the store config) and undoes the normalisation, so the
    picture lines up pixel for pixel with the relevance map. Unreadable or moved images give None:
    the report then shows heatmaps without the picture underneath.
    """

    def __init__(self, store: RelevanceStore):
        self.size = (store.height, store.width)
        self.preprocess = None
        spec = store.config.get("preprocess") if isinstance(store.config, dict) else None
        if spec:
            try:
                from pipeline.preprocess import Preprocess, PreprocessSpec

                self.spec = PreprocessSpec(**spec)
                self.preprocess = Preprocess(self.spec)
            except (TypeError, ValueError):
                self.preprocess = None
        self._cache: dict[str, np.ndarray | None] = {}

    def __call__(self, path: str) -> np.ndarray | None:
        if path not in self._cache:
            self._cache[path] = self._read(path)
        return self._cache[path]

    def _read(self, path: str) -> np.ndarray | None:
        try:
            from pipeline.datasets import read_image

            image = read_image(path)
        except Exception:  # missing, moved or unreadable: the report goes on without it
            return None
        if self.preprocess is not None:
            try:
                x, _, _ = self.preprocess(image)
            except Exception:
                return None
            mean = np.asarray(self.spec.mean)[:, None, None]
            std = np.asarray(self.spec.std)[:, None, None]
            array = x.numpy() * std + mean
        elif tuple(image.shape[-2:]) == self.size:  # no preprocessing recorded: only same-size images line up
            array = image.numpy() / 255.0
        else:
            return None
        return np.clip(array.transpose(1, 2, 0), 0, 1)


@dataclass
class AuditRun:
    """A store, its aggregates and a way to read its images: everything one report column needs."""

    url: str
    store: RelevanceStore
    aggregates: AggregateResult
    images: ImageReader
    label: str
    _rows: dict = field(default_factory=dict)

    def rows(self, group: str) -> pa.Table:
        if group not in self._rows:
            self._rows[group] = self.store.group(group).rows()
        return self._rows[group]

    def classes(self, group: str) -> list[dict]:
        table = self.aggregates.classes
        rows = [r for r in table.to_pylist() if r["group"] == group]
        return sorted(rows, key=lambda r: r["bias_rank"])

    def class_map(self, group: str, target: int) -> np.ndarray | None:
        return self.aggregates.heatmap(group, "target", target=target)

    def class_image(self, group: str, target: int) -> np.ndarray | None:
        """Mean of up to CLASS_IMAGES of the class's own images (label == target), in map geometry."""
        rows = self.rows(group)
        status, label, tgt = (rows[k].to_numpy() for k in ("status", "label", "target"))
        picked = np.flatnonzero((status == STATUS_OK) & (tgt == target) & ((label == target) | (label < 0)))
        if picked.size > CLASS_IMAGES:
            picked = picked[np.linspace(0, picked.size - 1, CLASS_IMAGES).astype(int)]
        paths = rows["path"].to_pylist()
        images = [image for image in (self.images(paths[i]) for i in picked) if image is not None]
        return np.mean(images, axis=0) if images else None


def model_label(store: RelevanceStore, url: str) -> str:
    """A short human name for the model of a run: the factory or torchvision name, and the weights file."""
    model = store.config.get("model", {}) if isinstance(store.config, dict) else {}
    name = model.get("factory") or model.get("name")
    weights = model.get("weights")
    if not name:
        return Path(str(url).rstrip("/")).name
    if weights:
        name += f" ({Path(str(weights)).name})"
    return name


def open_run(url: str, aggregates_dir: str | None = None, *, compute: bool = True, label: str | None = None,
             scheduler: str | None = None) -> AuditRun:
    """A store and its aggregates; the aggregates are computed (and written) when they are missing."""
    store = open_store(url)
    out_dir = aggregates_dir or default_out_dir(url)
    try:
        aggregates = load(out_dir)
    except FileNotFoundError:
        if not compute:
            raise
        aggregates = aggregate(url, out_dir, scheduler=scheduler)
    return AuditRun(url, store, aggregates, ImageReader(store), label or model_label(store, url))


# ---- the page ----------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return "–" if not np.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.0%}"


def _spot(row: dict):
    box = (row.get("spot_x0", -1), row.get("spot_y0", -1), row.get("spot_x1", -1), row.get("spot_y1", -1))
    return box if min(box) >= 0 and "cue" in row.get("flag", "") else None


def _setting_text(setting: dict) -> str:
    setting = dict(setting or {})
    composite = setting.pop("composite", "?")
    return composite + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(setting.items())) + ")" if setting else "")


def _shown_classes(rows: list[dict], limit: int) -> list[dict]:
    """Flagged classes first (by rank), then the rest by rank, at most ``limit``."""
    ordered = [r for r in rows if r["flagged"]] + [r for r in rows if not r["flagged"]]
    return ordered[:limit]


def _class_panels(run: AuditRun, group: str, rows: list[dict]) -> list[dict]:
    panels = []
    for row in rows:
        mean_map = run.class_map(group, row["class"])
        image = run.class_image(group, row["class"])
        spot = _spot(row)
        panel = {"name": row["class_name"], "flag": row["flag"], "images": row["n_images"],
                 "accuracy": _pct(row["accuracy"]), "score": _fmt(row["mean_score"]),
                 "heatmap_sum": _fmt(row["heatmap_sum"]), "overlay": None, "heatmap": None, "picture": None}
        if mean_map is not None:
            panel["overlay"] = fig.overlay_uri(image, mean_map, spot=spot)
            panel["heatmap"] = fig.heatmap_uri(mean_map, spot=spot)
        if image is not None:
            panel["picture"] = fig.image_uri(image)
        panels.append(panel)
    return panels


def _evidence(run: AuditRun, group: str, row: dict) -> list[dict]:
    """The images that show the class's cue most: the aggregation's top rows, else most context."""
    rows_table = run.rows(group)
    paths = rows_table["path"].to_pylist()
    picks = list(zip(row.get("top_rows") or [], row.get("top_spot_shares") or []))
    caption = "{:.0%} of its positive relevance in the spot"
    if not picks:  # a context flag: the images with the most positive relevance outside the object
        regions = run.aggregates.regions
        mine = regions.filter(pc.and_(pc.and_(pc.equal(regions["group"], group), pc.equal(regions["target"], row["class"])),
                                      pc.is_in(regions["label"], pa.array([row["class"], -1], pa.int64()))))
        inside = np.nan_to_num(mine["inside_share_positive"].to_numpy(zero_copy_only=False), nan=np.inf)
        order = np.lexsort((mine["row"].to_numpy(), inside))[:EVIDENCE_IMAGES]
        picks = [(int(mine["row"][i].as_py()), 1 - inside[i]) for i in order if np.isfinite(inside[i])]
        caption = "{:.0%} of its positive relevance outside the object"
    explanation = run.store.group(group)
    boxes = explanation.boxes
    spot = _spot(row)
    evidence = []
    for index, share in picks[:EVIDENCE_IMAGES]:
        relevance = np.asarray(explanation.relevance[index].compute())
        image = run.images(paths[index])
        row_boxes = boxes[index] if boxes is not None else None
        evidence.append({
            "path": paths[index], "caption": caption.format(share),
            "picture": fig.image_uri(image, boxes=row_boxes, spot=spot) if image is not None else None,
            "overlay": fig.overlay_uri(image, relevance, boxes=row_boxes, spot=spot),
        })
    return evidence


def _residuals(run: AuditRun, group: str) -> dict:
    regions = run.aggregates.regions
    table = regions.filter(pc.equal(regions["group"], group))
    residual = table["residual"].to_numpy(zero_copy_only=False)
    score = table["score"].to_numpy(zero_copy_only=False)
    relative = residual / np.maximum(np.abs(score), 1e-12)
    conserved = table["conserved"].to_numpy(zero_copy_only=False)
    region_residual = table["region_residual"].to_numpy(zero_copy_only=False)
    return {
        "group": group, "rows": len(table), "relative": relative,
        "mean": _fmt(float(residual.mean()) if len(residual) else np.nan),
        "mean_abs": _fmt(float(np.abs(residual).mean()) if len(residual) else np.nan),
        "max_abs": _fmt(float(np.abs(residual).max()) if len(residual) else np.nan),
        "median_rel": _pct(float(np.median(np.abs(relative))) if len(relative) else np.nan),
        "pools_conserved": int(conserved.sum()),
        "pools_max_residual": _fmt(float(np.abs(region_residual).max()) if len(region_residual) else np.nan),
    }


def _failures(run: AuditRun, groups: Sequence[str], limit: int = 50) -> tuple[list[dict], list[dict]]:
    counts, failed = [], {}
    for group in groups:
        rows = run.rows(group)
        status = rows["status"].to_numpy()
        counts.append({"group": group, **{STATUS_NAMES[code]: int((status == code).sum()) for code in STATUS_NAMES}})
        paths, errors = rows["path"].to_pylist(), rows["error"].to_pylist()
        for i in np.flatnonzero(status != STATUS_OK):
            failed.setdefault((paths[i], STATUS_NAMES[int(status[i])]), errors[i] or "")
    listed = [{"path": p, "status": s, "error": e} for (p, s), e in sorted(failed.items())]
    return counts, listed[:limit] + ([{"path": f"… and {len(listed) - limit} more", "status": "", "error": ""}]
                                     if len(listed) > limit else [])


def _config_rows(run: AuditRun) -> list[tuple[str, str]]:
    config = run.store.config if isinstance(run.store.config, dict) else {}
    model = config.get("model", {})
    dataset = config.get("dataset", {})
    rows = [("store", run.url), ("model", run.label)]
    if model.get("kwargs"):
        rows.append(("model arguments", json.dumps(model["kwargs"])))
    if config.get("weights_digest"):
        rows.append(("weights", str(config["weights_digest"])))
    if dataset:
        rows.append(("dataset", f"{dataset.get('source', '?')} ({config.get('dataset_kind', dataset.get('kind', '?'))})"))
    if config.get("target_mode"):
        rows.append(("explained target", str(config["target_mode"])))
    for group in run.store.groups():
        rows.append((f"explanation {group.name}", _setting_text(group.setting)))
    regions = run.aggregates.summary.get("regions", {})
    rows.append(("region pools", ", ".join(regions.get("names", []))))
    rows.append(("relevance maps", f"{run.store.height} × {run.store.width} px, {run.store.n_rows} rows per group"))
    software = run.store.software or {}
    if software:
        rows.append(("software", ", ".join(f"{k} {v}" for k, v in sorted(software.items()))))
    return rows


def build_context(run: AuditRun, compare: AuditRun | None = None, group: str | None = None,
                  max_classes: int = MAX_CLASSES, title: str | None = None, notes: Sequence[dict] = ()) -> dict:
    """Everything the template shows, as plain strings, numbers and data URIs.

    ``notes``: extra tables from the caller, shown after the finding, each ``{"title", "text",
    "header": [...], "rows": [[...], ...]}`` (the demo shows accuracy with and without the tag).
    """
    groups = run.store.group_names
    group = group or groups[0]
    if group not in groups:
        raise ValueError(f"no explanation group {group!r} in {run.url!r}; groups: {groups}")
    rows = run.classes(group)
    flagged = [r for r in rows if r["flagged"]]
    shown = _shown_classes(rows, max_classes)
    region_names = run.aggregates.summary.get("regions", {}).get("names", [])

    flagged_cards = []
    for row in flagged[:max_classes]:
        panel = _class_panels(run, group, [row])[0]
        flagged_cards.append({**panel, "reason": row["reason"], "bias_score": _fmt(row["bias_score"]),
                              "cue_score": _fmt(row["cue_score"]), "context_score": _fmt(row["context_score"]),
                              "context_share": _pct(row["context_share"]), "rank": row["bias_rank"],
                              "evidence": _evidence(run, group, row)})
    headline = None
    if flagged_cards:
        top = flagged_cards[0]
        headline = {"name": top["name"], "flag": top["flag"], "reason": top["reason"], "overlay": top["overlay"],
                    "evidence": top["evidence"][0] if top["evidence"] else None, "others": len(flagged) - 1}

    fractions = np.array([[r.get(f"fraction_{name}", np.nan) for name in region_names] for r in shown])
    pools = {
        "chart": fig.pools_chart([r["class_name"] for r in shown], fractions[None], region_names) if shown else None,
        "regions": region_names,
        "rows": [{"name": r["class_name"], "flag": r["flag"],
                  "fractions": [_pct(r.get(f"fraction_{name}", np.nan)) for name in region_names],
                  "conserved": f"{r['n_conserved']}/{r['n_ok']}", "all_conserved": r["n_conserved"] == r["n_ok"],
                  "max_residual": _fmt(r["max_region_residual"])} for r in shown],
    }
    context_reference = np.nanmedian([r["context_share"] for r in rows]) if any(
        np.isfinite(r["context_share"]) for r in rows) else np.nan
    context = {
        "available": any(np.isfinite(r["context_share"]) for r in rows),
        "chart": None,
        "rows": [{"name": r["class_name"], "flag": r["flag"], "images": r["n_images"], "accuracy": _pct(r["accuracy"]),
                  "context_share": _pct(r["context_share"]), "context_usage": _fmt(r.get("context_usage_median")),
                  "object_area": _pct(r["object_area"]), "spot_share": _pct(r["spot_share"]),
                  "spot_images": _pct(r["spot_image_fraction"])} for r in shown],
    }
    if context["available"]:
        context["chart"] = fig.context_chart([r["class_name"] for r in shown], [r["context_share"] for r in shown],
                                             [r["flagged"] for r in shown], context_reference)

    sweep = None
    if len(groups) > 1:
        sweep_rows = []
        per_group = {g: {r["class"]: r for r in run.classes(g)} for g in groups}
        for row in shown:
            image = run.class_image(group, row["class"])
            cells = []
            for g in groups:
                mean_map = run.class_map(g, row["class"])
                other = per_group[g].get(row["class"], {})
                cells.append({"overlay": fig.overlay_uri(image, mean_map) if mean_map is not None else None,
                              "flag": other.get("flag", ""), "spot": _pct(other.get("spot_share", np.nan))})
            sweep_rows.append({"name": row["class_name"], "cells": cells})
        sweep = {"groups": [{"name": g, "setting": _setting_text(run.store.group(g).setting),
                             "top": next((r["class_name"] for r in run.classes(g) if r["flagged"]), "none")}
                            for g in groups], "rows": sweep_rows}

    comparison = _comparison(run, compare, group, shown, region_names) if compare is not None else None

    residuals = [_residuals(run, g) for g in groups]
    status_counts, failed = _failures(run, groups)
    summary = run.aggregates.summary
    return {
        "title": title or "lrp-audit report",
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "store": run.url, "model": run.label, "group": group,
        "group_setting": _setting_text(run.store.group(group).setting),
        "headline": headline, "n_flagged": len(flagged),
        "notes": [{"title": n.get("title", ""), "text": n.get("text", ""), "header": list(n.get("header", [])),
                   "rows": [[str(v) for v in row] for row in n.get("rows", [])]} for n in notes],
        "config_rows": _config_rows(run),
        "config_json": json.dumps(run.store.config, indent=2, sort_keys=True, default=str),
        "dataset": {"classes": len(run.store.class_names), "rows": run.store.n_rows,
                    "ok": summary.get("groups", {}).get(group, {}).get("ok", 0),
                    "images": sum(r["n_images"] for r in rows), "groups": len(groups),
                    "class_rows": [{"name": r["class_name"], "images": r["n_images"], "ok": r["n_ok"],
                                    "accuracy": _pct(r["accuracy"]), "score": _fmt(r["mean_score"]),
                                    "flag": r["flag"]} for r in shown]},
        "hidden_classes": max(0, len(rows) - len(shown)),
        "flagged": flagged_cards,
        "classes": _class_panels(run, group, shown),
        "pools": pools, "context": context, "sweep": sweep, "comparison": comparison,
        "residuals": [{k: v for k, v in r.items() if k != "relative"} for r in residuals],
        "residual_chart": fig.residual_chart({r["group"]: r["relative"] for r in residuals}),
        "status_counts": status_counts, "status_names": [STATUS_NAMES[c] for c in sorted(STATUS_NAMES)],
        "failed": failed,
        "settings": summary.get("settings", {}),
    }


def _comparison(run: AuditRun, other: AuditRun, group: str, shown: list[dict], region_names: list[str]) -> dict:
    """Side by side: the same classes under two models (same dataset, same explanation setting if present)."""
    other_group = group if group in other.store.group_names else other.store.group_names[0]
    by_name = {r["class_name"]: r for r in other.classes(other_group)}
    same_data = (run.store.config.get("dataset_fingerprint") is not None
                 and run.store.config.get("dataset_fingerprint") == other.store.config.get("dataset_fingerprint"))
    rows, fractions = [], np.full((2, len(shown), len(region_names)), np.nan)
    for i, row in enumerate(shown):
        mine_map = run.class_map(group, row["class"])
        twin = by_name.get(row["class_name"])
        their_map = other.class_map(other_group, twin["class"]) if twin else None
        image = run.class_image(group, row["class"])
        fractions[0, i] = [row.get(f"fraction_{n}", np.nan) for n in region_names]
        if twin:
            fractions[1, i] = [twin.get(f"fraction_{n}", np.nan) for n in region_names]
        rows.append({
            "name": row["class_name"],
            "a": fig.overlay_uri(image, mine_map, spot=_spot(row)) if mine_map is not None else None,
            "b": fig.overlay_uri(image, their_map, spot=_spot(twin)) if their_map is not None else None,
            "a_flag": row["flag"], "b_flag": twin["flag"] if twin else "",
            "a_accuracy": _pct(row["accuracy"]), "b_accuracy": _pct(twin["accuracy"]) if twin else "–",
            "a_context": _pct(row["context_share"]), "b_context": _pct(twin["context_share"]) if twin else "–",
        })
    return {
        "a": run.label, "b": other.label, "a_url": run.url, "b_url": other.url, "group_b": other_group,
        "same_data": same_data, "rows": rows,
        "chart": fig.pools_chart([r["class_name"] for r in shown], fractions, region_names,
                                 titles=[f"A: {run.label}", f"B: {other.label}"]) if shown else None,
    }


def environment() -> jinja2.Environment:
    """Jinja2 with autoescape on for every template: dataset strings are text, never markup."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def render_html(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


def render_report(store_url: str, out: str | None = None, *, compare: str | None = None, group: str | None = None,
                  aggregates_dir: str | None = None, compare_aggregates_dir: str | None = None,
                  max_classes: int = MAX_CLASSES, title: str | None = None, scheduler: str | None = None,
                  notes: Sequence[dict] = (), evaluation: str | None = None) -> str:
    """Write the report of ``store_url`` (optionally beside a second store ``compare``); returns its path.

    ``evaluation``: a folder written by ``lrp-audit evaluate`` (default: beside the store, when there is one).
    """
    run = open_run(store_url, aggregates_dir, scheduler=scheduler)
    other = open_run(compare, compare_aggregates_dir, scheduler=scheduler) if compare else None
    if other is not None and other.label == run.label:
        run.label, other.label = f"{run.label} [{Path(str(store_url).rstrip('/')).name}]", \
            f"{other.label} [{Path(str(compare).rstrip('/')).name}]"
    context = build_context(run, other, group=group, max_classes=max_classes, title=title, notes=notes)
    store_config = run.store.config if isinstance(run.store.config, dict) else {}
    context["evaluation"] = aopc.report_section(evaluation or aopc.default_evaluation_dir(store_url),
                                                store_config=store_config)
    page = render_html(context)
    out = out or (str(store_url).rstrip("/").removesuffix(".zarr") + ".report.html")
    with fsspec.open(out, "w", encoding="utf-8") as handle:
        handle.write(page)
    return out


def headline_text(store_url: str, aggregates_dir: str | None = None, group: str | None = None) -> str:
    """One line for the terminal: the top flagged class and why (or that none is flagged)."""
    aggregates = load(aggregates_dir or default_out_dir(store_url))
    rows = sorted((r for r in aggregates.classes.to_pylist()
                   if r["group"] == (group or aggregates.classes["group"][0].as_py())), key=lambda r: r["bias_rank"])
    flagged = [r for r in rows if r["flagged"]]
    if not flagged:
        return "no class is flagged: no cue outside the objects and no unusual context use"
    top = flagged[0]
    return f"top flagged class {top['class_name']!r} ({top['flag']}): {top['reason']}"


__all__ = ["AuditRun", "ImageReader", "build_context", "headline_text", "open_run", "render_html", "render_report"]
