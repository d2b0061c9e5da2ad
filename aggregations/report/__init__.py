"""The audit report: one self-contained HTML file a person reads to find a model's shortcuts.

``render_report(store)`` reads a relevance store and its aggregates (computing them when missing),
and renders ``templates/report.html.j2`` with jinja2 (autoescape on: class names and paths come from
the dataset and are shown as text, never as markup). Images are embedded as base64 PNG and the page
carries a Content-Security-Policy that forbids scripts and remote resources, so the file is safe to
open and to mail around. Sections, most important first: the headline finding, the flagged classes
with their evidence, per-class average heatmaps over the class-average image, region pools with the
conservation check, context usage, parameter sweeps (several groups of one store side by side, as
Figs. 4-5 of Binder et al. 2016), a model comparison (a second store of the same data, §4.2), the
region-perturbation evaluation, and failures and conservation residuals.

Modules: ``runs`` (a store, its aggregates and its images), ``sections`` (one function per section),
``evaluation`` (the AOPC section), ``figures`` (PNG data URIs), ``render`` (the page).
"""
from aggregations.report.render import build_context, headline_text, render_html, render_report
from aggregations.report.runs import AuditRun, ImageReader, open_run

__all__ = ["AuditRun", "ImageReader", "build_context", "headline_text", "open_run", "render_html", "render_report"]
