"""The page: the sections put together (:func:`build_context`), rendered with jinja2, written as one file."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fsspec
import jinja2

from aggregations import aopc
from aggregations.report import sections
from aggregations.report.evaluation import report_section as evaluation_section
from aggregations.report.runs import AuditRun, open_run
from aggregations.report.spray import report_section as spray_section
from aggregations.run import default_out_dir, load
from pipeline.paths import beside
from pipeline.store import open_store

TEMPLATES = Path(__file__).parent / "templates"
MAX_CLASSES = 40  # per-class galleries show at most this many classes (flagged and highest-scored first)


def build_context(run: AuditRun, compare: AuditRun | None = None, group: str | None = None,
                  max_classes: int = MAX_CLASSES, title: str | None = None, notes: Sequence[dict] = ()) -> dict:
    """Everything the template shows, as plain strings, numbers and data URIs: one dict per section, merged.

    ``notes``: extra tables from the caller, shown after the finding, each ``{"title", "text",
    "header": [...], "rows": [[...], ...]}`` (the demo shows accuracy with and without the tag).
    """
    groups = run.store.group_names
    group = group or groups[0]
    if group not in groups:
        raise ValueError(f"no explanation group {group!r} in {run.url!r}; groups: {groups}")
    rows = run.classes(group)
    shown = sections._shown_classes(rows, max_classes)
    region_names = run.aggregates.summary.get("regions", {}).get("names", [])
    return {
        **sections.header_section(run, group, title),
        **sections.finding_section(run, group, rows, max_classes),
        **sections.notes_section(notes),
        **sections.summary_section(run, group, rows, shown),
        **sections.classes_section(run, group, shown),
        **spray_section(run, group, max_classes),
        **sections.pools_section(shown, region_names),
        **sections.context_section(rows, shown),
        **sections.sweep_section(run, group, shown),
        **sections.comparison_section(run, compare, group, shown, region_names),
        **sections.failures_section(run),
    }


def environment() -> jinja2.Environment:
    """Jinja2 with autoescape on for every template: dataset strings are text, never markup."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


def render_report(store_url: str, out: str | None = None, *, compare: str | None = None, group: str | None = None,
                  aggregates_dir: str | None = None, compare_aggregates_dir: str | None = None,
                  max_classes: int = MAX_CLASSES, title: str | None = None, scheduler: str | None = None,
                  notes: Sequence[dict] = (), evaluation: str | None = None) -> str:
    """Write the report of ``store_url`` (optionally beside a second store ``compare``); returns its path.

    ``evaluation``: a folder written by ``lrp-audit evaluate`` (default: beside the store, when there is one).
    Many parameters because: the keyword options are those of ``lrp-audit report``, passed through one to one.
    """
    run = open_run(store_url, aggregates_dir, scheduler=scheduler)
    other = open_run(compare, compare_aggregates_dir, scheduler=scheduler) if compare else None
    if other is not None and other.label == run.label:
        run.label, other.label = f"{run.label} [{Path(str(store_url).rstrip('/')).name}]", \
            f"{other.label} [{Path(str(compare).rstrip('/')).name}]"
    context = build_context(run, other, group=group, max_classes=max_classes, title=title, notes=notes)
    store_config = run.store.config if isinstance(run.store.config, dict) else {}
    context["evaluation"] = evaluation_section(evaluation or aopc.default_evaluation_dir(store_url),
                                               store_config=store_config)
    page = render_html(context)
    out = out or beside(store_url, ".report.html")
    with fsspec.open(out, "w", encoding="utf-8") as handle:
        handle.write(page)
    return out


def headline_text(store_url: str, aggregates_dir: str | None = None, group: str | None = None) -> str:
    """One line for the terminal: the top flagged class and why, that none is flagged, or that nothing could be
    audited (no ok row in the group)."""
    aggregates = load(aggregates_dir or default_out_dir(store_url))
    if group is None:  # the store's first group, as the page leads with (summary.json's groups are sorted by name)
        aggregated = aggregates.summary.get("groups", {})
        group = next((name for name in open_store(store_url).group_names if name in aggregated), None)
    empty = sections.nothing_audited(aggregates.summary, group)
    if empty:
        return empty["text"]
    rows = sorted((r for r in aggregates.classes.to_pylist() if r["group"] == group), key=lambda r: r["bias_rank"])
    flagged = [r for r in rows if r["flagged"]]
    if not flagged:
        return "no class is flagged: no cue outside the objects and no unusual context use"
    top = flagged[0]
    return f"top flagged class {top['class_name']!r} ({top['flag']}): {top['reason']}"
