"""One audited run as the report reads it: a store, its aggregates, and the pictures of its rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from aggregations.run import AggregateResult, aggregate, default_out_dir, load
from pipeline.store import STATUS_OK, RelevanceStore, open_store

CLASS_IMAGES = 24  # the class-average image is the mean of at most this many of the class's images



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


