"""One audited run as the report reads it: a store, its aggregates, and the pictures of its rows."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregations.bias import BiasSettings
from aggregations.run import (AggregateResult, aggregate, default_out_dir, load, same_location, state_changes,
                              store_state)
from pipeline.store import STATUS_OK, RelevanceStore, StoreError, open_store

CLASS_IMAGES = 24  # the class-average image is the mean of at most this many of the class's images


class AggregatesMismatch(StoreError):
    """Aggregates that do not describe the store: another store's, or older than it with compute off."""


class AggregatesNote(UserWarning):
    """Something the reader of a report should know about its aggregates (recomputed, of unknown age)."""


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
    """A store, its aggregates and a way to read its images: everything one report column needs.

    ``state``: the store's :func:`~aggregations.run.store_state`, read once when the run is opened, against which
    the aggregates and the SpRAy results are checked.
    """

    url: str
    store: RelevanceStore
    aggregates: AggregateResult
    images: ImageReader
    label: str
    state: dict = field(default_factory=dict)
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
    """A store and its aggregates; the aggregates are computed (and written) when they are missing.

    Aggregates of another store are refused (:class:`AggregatesMismatch`). Aggregates older than the store (rows
    written, retried or rewritten since: ``summary.json``'s ``store_state``) are recomputed with the settings they
    were made with, or refused when ``compute`` is off or those settings cannot be redone (mask regions).
    Aggregates from before ``store_state`` was recorded are used as they are, with an :class:`AggregatesNote`
    warning that their age is unknown.
    """
    store = open_store(url)
    state = store_state(store)
    out_dir = str(aggregates_dir or default_out_dir(url))
    try:
        aggregates = load(out_dir)
    except FileNotFoundError:
        if not compute:
            raise
        aggregates = aggregate(url, out_dir, scheduler=scheduler)
    else:
        aggregates = _current(url, state, out_dir, aggregates, compute, scheduler)
    return AuditRun(url, store, aggregates, ImageReader(store), label or model_label(store, url), state=state)


def _redo_options(summary: dict, group_names: list[str]) -> dict | None:
    """The keyword options of :func:`aggregate` that remake these aggregates, or None (mask regions)."""
    regions = summary.get("regions", {})
    if regions.get("kind") != "grid" or "row_edges" not in regions or "col_edges" not in regions:
        return None
    known = {f.name for f in fields(BiasSettings)}
    try:
        settings = BiasSettings(**{k: v for k, v in summary.get("settings", {}).items() if k in known})
    except (TypeError, ValueError):
        return None
    options = {"grid": (len(regions["row_edges"]) - 1, len(regions["col_edges"]) - 1), "settings": settings,
               "groups": [name for name in group_names if name in summary.get("groups", {})] or None}
    if "memory_budget" in summary:
        options["memory_budget"] = summary["memory_budget"]
    return options


def _current(url: str, state: dict, out_dir: str, aggregates: AggregateResult, compute: bool,
             scheduler: str | None) -> AggregateResult:
    """``aggregates`` if they describe the store as it is now (``state``: its :func:`store_state`); else
    recomputed, refused or noted.

    Many parameters because: the store (its URL and its state), the aggregates (their folder and contents)
    and what may be done about stale ones (compute, scheduler) are all needed here.
    """
    summary = aggregates.summary
    recorded = summary.get("store_state")
    if recorded is None:  # an older lrp-audit: used as they are (the folder may be read-only), with a note
        if not same_location(summary, url):
            raise AggregatesMismatch(
                f"the aggregates in {out_dir!r} were made from {summary.get('store')!r}, not {url!r}; pass the "
                f"aggregates folder of {url!r}, or run 'lrp-audit aggregate {url}' to make them")
        warnings.warn(AggregatesNote(
            f"the aggregates in {out_dir!r} were written by an older lrp-audit that did not record the store's state: "
            f"whether they are current cannot be told; run 'lrp-audit aggregate {url} --out {out_dir}' to be sure"),
            stacklevel=3)
        return aggregates
    changes = state_changes(recorded, state)
    if not changes:
        return aggregates  # the same rows, wherever the store was when they were made (a moved or copied store)
    if not same_location(summary, url):
        raise AggregatesMismatch(
            f"the aggregates in {out_dir!r} were made from {summary.get('store')!r}, not {url!r}, and do not match "
            f"it ({'; '.join(changes)}); pass the aggregates folder of {url!r}, or run 'lrp-audit aggregate {url}' "
            "to make them")
    what = f"the aggregates in {out_dir!r} are older than the store {url!r} ({'; '.join(changes)})"
    redo = _redo_options(summary, list(state["groups"])) if compute else None
    if redo is None:
        raise AggregatesMismatch(f"{what}: run 'lrp-audit aggregate {url} --out {out_dir}' with the options "
                                 "they were made with, then the report again")
    warnings.warn(AggregatesNote(f"{what}: recomputed with the settings they were made with"), stacklevel=3)
    return aggregate(url, out_dir, scheduler=scheduler, **redo)
