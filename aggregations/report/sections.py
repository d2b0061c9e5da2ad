"""The sections of the report, one function each: the template's data for one part of the page.

Every function returns plain strings, numbers and data URIs (figures come from
:mod:`aggregations.report.figures`); :func:`aggregations.report.render.build_context` puts them together.
A new section is one function here, one block in ``templates/report.html.j2`` and one line in
``build_context`` (docs/extending.md).
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregations.report import figures as fig
from aggregations.report.runs import AuditRun
from pipeline.store import STATUS_NAMES, STATUS_OK

EVIDENCE_IMAGES = 5


# ---- formatting ----------------------------------------------------------------------------------------------

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
    stored = rows_table["relevance_sum"].to_numpy()
    picks = list(zip(row.get("top_rows") or [], row.get("top_spot_shares") or []))
    caption = "{:.0%} of its positive relevance in the spot"
    if not picks:  # a context flag: the images with the most positive relevance outside the object
        regions = run.aggregates.regions
        of_class = pc.and_(pc.equal(regions["group"], group), pc.equal(regions["target"], row["class"]))
        mine = regions.filter(pc.and_(of_class,
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
        explanation.check_maps(np.array([index]), relevance.sum(dtype=np.float64)[None],  # damaged since aggregated?
                               np.abs(relevance).sum(dtype=np.float64)[None], stored[index:index + 1])
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
        kind = config.get("dataset_kind", dataset.get("kind", "?"))
        rows.append(("dataset", f"{dataset.get('source', '?')} ({kind})"))
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


# ---- the sections, in page order -----------------------------------------------------------------------------

def header_section(run: AuditRun, group: str, title: str | None) -> dict:
    """The page title and what was audited."""
    return {
        "title": title or "lrp-audit report",
        "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "store": run.url, "model": run.label, "group": group,
        "group_setting": _setting_text(run.store.group(group).setting),
    }


def nothing_audited(summary: dict, group: str) -> dict | None:
    """When the group has no ok row: its counts and one sentence saying nothing could be audited; else None.

    "No class is flagged" would be a finding about a model; with no ok row there is no finding at all."""
    counts = summary.get("groups", {}).get(group)
    if counts is None or counts.get("ok", 0) > 0:
        return None
    rows = counts.get("rows", 0)
    excluded = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("failed", "nonfinite", "pending") if counts.get(k, 0))
    text = (f"nothing could be audited in {group!r}: 0 ok rows of {rows}" + (f" ({excluded})" if excluded else "")
            + "; no class was judged, so this is no evidence that the model has no shortcut")
    return {"ok": 0, "rows": rows, "excluded": excluded, "text": text}


def finding_section(run: AuditRun, group: str, rows: list[dict], max_classes: int) -> dict:
    """The headline (the top flagged class with its best evidence) and one card per flagged class; ``empty`` when
    no row of the group is ok (the page then says that nothing could be audited, not that nothing is flagged)."""
    flagged = [r for r in rows if r["flagged"]]
    cards = []
    for row in flagged[:max_classes]:
        panel = _class_panels(run, group, [row])[0]
        cards.append({**panel, "reason": row["reason"], "bias_score": _fmt(row["bias_score"]),
                      "cue_score": _fmt(row["cue_score"]), "context_score": _fmt(row["context_score"]),
                      "context_share": _pct(row["context_share"]), "rank": row["bias_rank"],
                      "evidence": _evidence(run, group, row)})
    headline = None
    if cards:
        top = cards[0]
        headline = {"name": top["name"], "flag": top["flag"], "reason": top["reason"], "overlay": top["overlay"],
                    "evidence": top["evidence"][0] if top["evidence"] else None, "others": len(flagged) - 1}
    return {"headline": headline, "n_flagged": len(flagged), "flagged": cards,
            "empty": nothing_audited(run.aggregates.summary, group)}


def notes_section(notes: Sequence[dict]) -> dict:
    """The caller's extra tables, as text."""
    return {"notes": [{"title": n.get("title", ""), "text": n.get("text", ""), "header": list(n.get("header", [])),
                       "rows": [[str(v) for v in row] for row in n.get("rows", [])]} for n in notes]}


def summary_section(run: AuditRun, group: str, rows: list[dict], shown: list[dict]) -> dict:
    """The run's configuration and the dataset's classes."""
    summary = run.aggregates.summary
    return {
        "config_rows": _config_rows(run),
        "config_json": json.dumps(run.store.config, indent=2, sort_keys=True, default=str),
        "dataset": {"classes": len(run.store.class_names), "rows": run.store.n_rows,
                    "ok": summary.get("groups", {}).get(group, {}).get("ok", 0),
                    "images": sum(r["n_images"] for r in rows), "groups": len(run.store.group_names),
                    "class_rows": [{"name": r["class_name"], "images": r["n_images"], "ok": r["n_ok"],
                                    "accuracy": _pct(r["accuracy"]), "score": _fmt(r["mean_score"]),
                                    "flag": r["flag"]} for r in shown]},
        "hidden_classes": max(0, len(rows) - len(shown)),
    }


def classes_section(run: AuditRun, group: str, shown: list[dict]) -> dict:
    """Per-class average heatmaps over the class-average image."""
    return {"classes": _class_panels(run, group, shown)}


def pools_section(shown: list[dict], region_names: list[str]) -> dict:
    """Region pools per class, with the conservation check of each class's pools."""
    fractions = np.array([[r.get(f"fraction_{name}", np.nan) for name in region_names] for r in shown])
    return {"pools": {
        "chart": fig.pools_chart([r["class_name"] for r in shown], fractions[None], region_names) if shown else None,
        "regions": region_names,
        "rows": [{"name": r["class_name"], "flag": r["flag"],
                  "fractions": [_pct(r.get(f"fraction_{name}", np.nan)) for name in region_names],
                  "conserved": f"{r['n_conserved']}/{r['n_ok']}", "all_conserved": r["n_conserved"] == r["n_ok"],
                  "max_residual": _fmt(r["max_region_residual"])} for r in shown],
    }}


def context_section(rows: list[dict], shown: list[dict]) -> dict:
    """How much of each class's positive relevance lies outside its objects."""
    available = any(np.isfinite(r["context_share"]) for r in rows)
    reference = np.nanmedian([r["context_share"] for r in rows]) if available else np.nan
    context = {
        "available": available,
        "chart": None,
        "rows": [{"name": r["class_name"], "flag": r["flag"], "images": r["n_images"], "accuracy": _pct(r["accuracy"]),
                  "context_share": _pct(r["context_share"]), "context_usage": _fmt(r.get("context_usage_median")),
                  "object_area": _pct(r["object_area"]), "spot_share": _pct(r["spot_share"]),
                  "spot_images": _pct(r["spot_image_fraction"])} for r in shown],
    }
    if available:
        context["chart"] = fig.context_chart([r["class_name"] for r in shown], [r["context_share"] for r in shown],
                                             [r["flagged"] for r in shown], reference)
    return {"context": context}


def sweep_section(run: AuditRun, group: str, shown: list[dict]) -> dict:
    """Several explanation groups of one store side by side (Figs. 4-5 of Binder et al. 2016); None for one group."""
    groups = run.store.group_names
    if len(groups) < 2:
        return {"sweep": None}
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
    return {"sweep": {"groups": [{"name": g, "setting": _setting_text(run.store.group(g).setting),
                                  "top": next((r["class_name"] for r in run.classes(g) if r["flagged"]), "none")}
                                 for g in groups], "rows": sweep_rows}}


def failures_section(run: AuditRun) -> dict:
    """Conservation residuals per group, and the rows that are not ok."""
    groups = run.store.group_names
    residuals = [_residuals(run, g) for g in groups]
    status_counts, failed = _failures(run, groups)
    return {
        "residuals": [{k: v for k, v in r.items() if k != "relative"} for r in residuals],
        "residual_chart": fig.residual_chart({r["group"]: r["relative"] for r in residuals}),
        "status_counts": status_counts, "status_names": [STATUS_NAMES[c] for c in sorted(STATUS_NAMES)],
        "failed": failed,
        "settings": run.aggregates.summary.get("settings", {}),
    }


def comparison_section(run: AuditRun, other: AuditRun | None, group: str, shown: list[dict],
                       region_names: list[str]) -> dict:
    """A second store of the same data beside this one (§4.2); None without one."""
    return {"comparison": None if other is None else _comparison(run, other, group, shown, region_names)}


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
