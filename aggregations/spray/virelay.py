"""A relevance store and its SpRAy results as a ViRelAy project (the layout ViRelAy 1.0's ``model.py`` reads).

ViRelAy (Anders et al. 2021) is the field's viewer for SpRAy: it shows each class's spectral and t-SNE
embeddings coloured by cluster next to the images and heatmaps. It reads HDF5 files, written here with h5py::

    <out>/label-map.json              [{index, word_net_id, name}]; word_net_id is the class index as %08d
    <out>/dataset.h5                  data uint8 (N, 3, H, W) images in map geometry, label uint32 (N,),
                                      row int64 (N,) the store row of each entry
    <out>/<group>-attribution.h5      index uint32 (n,) dataset entry of each ok row, attribution float32
                                      (n, C, H, W), label uint32 (n,), prediction float32 (n, classes) one-hot
    <out>/<group>-analysis.h5         per clustered class "%08d": index uint32, embedding/spectral (n, m) with
                                      attrs eigenvalue, embedding/tsne (n, 2), cluster/<method>-<K>
    <out>/<group>.yaml                the project: open it with ``python -m virelay <out>/<group>.yaml``

The attributions are the store's per-channel maps when it kept them, else the map in channel 0 and a zero
channel 1 (ViRelAy sums the channels; it cannot render one). One project per explanation group (ViRelAy
knows one attribution method per project); all of them share the dataset file. Dataset entries are the store
rows of the exported classes, so images repeat when a store has several rows per image (target mode
``classes``). Images are read in blocks through the run's own preprocessing (as the report reads them); an
unreadable image is stored black and counted.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import h5py
import numpy as np
import yaml

from aggregations.spray.run import SprayResult
from pipeline.store import STATUS_OK, RelevanceStore

BLOCK = 256  # rows read, converted and written at once: memory stays at one block of images and maps


def category(target: int) -> str:
    """The analysis group / WordNet id of a class: ViRelAy's convention for datasets without WordNet ids."""
    return f"{int(target):08d}"


def safe_name(group: str) -> str:
    """An explanation group's name as a file name (group names carry '=' and '.' from their parameters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group)


def _chunked(n: int, chunk: tuple[int, ...]) -> dict:
    """One entry a chunk, gzip'ed; an empty dataset (a group without an ok row) is left contiguous, as HDF5 allows
    no chunk larger than the data."""
    return {"chunks": chunk, "compression": "gzip"} if n else {}


def exported_rows(store: RelevanceStore, groups: Sequence[str], classes: Sequence[int] | None) -> np.ndarray:
    """The store rows that become dataset entries: every row whose target is an exported class."""
    target = store.group(groups[0]).read("target")
    present = np.unique(target[target >= 0])
    if classes is not None:
        missing = sorted(set(int(c) for c in classes) - set(present.tolist()))
        if missing:
            raise ValueError(f"--classes {missing}: no row of the store has such a target (targets: "
                             f"{', '.join(map(str, present.tolist()[:20]))}{', ...' if len(present) > 20 else ''})")
    return np.flatnonzero(np.isin(target, present if classes is None else np.asarray(classes)))


def _dataset_label(store: RelevanceStore, group: str, rows: np.ndarray) -> np.ndarray:
    """True label per entry; rows without one (-1) get their explained target, as ViRelAy needs a class."""
    label, target = store.group(group).read("label")[rows], store.group(group).read("target")[rows]
    return np.where(label >= 0, label, target).astype(np.uint32)


def write_label_map(path: str, class_names: Sequence[str]) -> None:
    entries = [{"index": i, "word_net_id": category(i), "name": str(name)} for i, name in enumerate(class_names)]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=2)


def write_dataset(path: str, store: RelevanceStore, group: str, rows: np.ndarray) -> int:
    """The images of ``rows`` in map geometry as uint8 (N, 3, H, W); returns how many could not be read."""
    from aggregations.report.runs import ImageReader  # the report's reader: the run's preprocessing, undone

    paths = store.group(group).read("path")
    missing = 0
    with h5py.File(path, "w") as out:
        data = out.create_dataset("data", (len(rows), 3, store.height, store.width), dtype="uint8",
                                  **_chunked(len(rows), (1, 3, store.height, store.width)))
        out.create_dataset("label", data=_dataset_label(store, group, rows))
        out.create_dataset("row", data=rows.astype(np.int64))
        for start in range(0, len(rows), BLOCK):
            reader = ImageReader(store)  # a fresh cache per block: memory stays bounded
            block = np.zeros((min(BLOCK, len(rows) - start), 3, store.height, store.width), np.uint8)
            for i, row in enumerate(rows[start:start + BLOCK]):
                image = reader(str(paths[row]))
                if image is None:
                    missing += 1
                    continue
                block[i] = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(2, 0, 1)
            data[start:start + len(block)] = block
    return missing


def write_attributions(path: str, store: RelevanceStore, group: str, rows: np.ndarray) -> np.ndarray:
    """The ok rows' relevance maps; ``index`` is their dataset entry. Returns the store rows written.

    Each block of maps is checked as it is read (``ExplanationGroup.check_maps``: a missing shard reads as NaN, an
    edited one no longer adds up to its ``relevance_sum``), so a damaged store raises a StoreError here, never an
    export of NaN maps, and the maps are read once."""
    explanation = store.group(group)
    status = explanation.read("status")[rows]
    ok = rows[status == STATUS_OK]
    stored = explanation.read("relevance_sum")[ok]
    entry = np.flatnonzero(status == STATUS_OK)
    prediction = explanation.read("prediction")[ok]
    with h5py.File(path, "w") as out:
        out.create_dataset("index", data=entry.astype(np.uint32))
        out.create_dataset("label", data=_dataset_label(store, group, ok))
        # the store keeps the argmax, not every logit: one-hot, so ViRelAy shows the predicted class
        onehot = np.zeros((len(ok), len(store.class_names)), np.float32)
        known = (prediction >= 0) & (prediction < len(store.class_names))
        onehot[np.flatnonzero(known), prediction[known]] = 1.0
        out.create_dataset("prediction", data=onehot)
        channels = explanation.has("relevance_channels")
        shape = (store.height, store.width)
        depth = explanation.lazy("relevance_channels").shape[1] if channels else 2
        maps = out.create_dataset("attribution", (len(ok), depth, *shape), dtype="float32",
                                  **_chunked(len(ok), (1, depth, *shape)))
        name = "relevance_channels" if channels else "relevance"
        reader = explanation.shard_reader(name)  # batched per shard, as the store's other readers
        for start in range(0, len(ok), BLOCK):
            block, part = reader.rows(ok[start:start + BLOCK]), slice(start, start + BLOCK)
            axes = tuple(range(1, block.ndim))
            explanation.check_maps(ok[part], block.sum(axis=axes, dtype=np.float64),
                                   np.abs(block).sum(axis=axes, dtype=np.float64), stored[part], name)
            if channels:
                maps[part] = block
                continue
            # ViRelAy sums an attribution's channels and cannot render a single one (an IndexError in its
            # image_processing): the map goes in channel 0 beside a zero channel, so the sum is the map exactly
            maps[part, 0] = block
            maps[part, 1] = 0.0
    return ok


def _group_columns(spray: SprayResult, group: str) -> dict:
    """One group's assignment columns as numpy, read once (an ImageNet run has 1.3 M rows), with the spectral
    embedding (row-aligned with them, docs/spray.md)."""
    table = spray.assignments
    in_group = table["group"].to_numpy(zero_copy_only=False) == group
    columns = {k: table[k].to_numpy()[in_group] for k in ("row", "target", "cluster", "x", "y")}
    columns["spectral"] = spray.zarr_group[group]["spectral"]
    return columns


def _class_node(out: h5py.File, spray: SprayResult, group: str, row: dict, columns: dict, where: tuple) -> None:
    """One class's group: index, embedding/spectral (unit rows, as CoRelAy's normalize=True), the 2-D picture
    when it was computed, the clustering. ``where``: (the class's slice of ``columns``, its dataset entries)."""
    mine, entries = where
    c, k, settings = int(row["target"]), int(row["n_clusters"]), spray.summary.get("settings", {})
    eigenvalues = spray.eigenvalues(group, c)
    node = out.create_group(category(c))
    node.create_dataset("index", data=entries.astype(np.uint32))
    vectors = columns["spectral"][mine, : len(eigenvalues)]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    spectral = node.create_dataset("embedding/spectral", data=vectors / np.where(norms > 0, norms, 1))
    spectral.attrs["eigenvalue"] = eigenvalues.astype(np.float32)
    xy = np.stack([columns["x"][mine], columns["y"][mine]], axis=1)
    if np.isfinite(xy).all():
        picture = node.create_dataset(f"embedding/{settings.get('embedding', 'tsne')}", data=xy.astype(np.float32))
        picture.attrs.update({"embedding": "spectral", "index": np.array([0, 1])})
    labels = node.create_dataset(f"cluster/{settings.get('method', 'kmeans')}-{k:02d}",
                                 data=columns["cluster"][mine].astype(np.int64))
    labels.attrs.update({"embedding": "spectral", "k": k})


def write_analysis(path: str, spray: SprayResult, group: str, rows: np.ndarray) -> list[int]:
    """One HDF5 group per clustered class among the exported rows. Returns the classes written.

    A class's rows are consecutive in assignments.parquet (it is written class by class), so each class is a
    slice of the group's columns."""
    position = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, np.int64)
    position[rows] = np.arange(len(rows))
    columns = _group_columns(spray, group)
    starts = np.flatnonzero(np.r_[True, columns["target"][1:] != columns["target"][:-1]]) if len(columns["target"]) \
        else np.zeros(0, np.int64)  # a group without an ok row has no assignments
    bounds = dict(zip(columns["target"][starts].tolist(), zip(starts, np.r_[starts[1:], len(columns["target"])])))
    written = []
    with h5py.File(path, "w") as out:
        for row in spray.classes.to_pylist():
            c = int(row["target"])
            if row["group"] != group or row["status"] != "clustered" or c not in bounds:
                continue
            mine = slice(*(int(b) for b in bounds[c]))
            store_rows = columns["row"][mine]
            entries = position[store_rows] if store_rows.max() < len(position) else np.array([-1])
            if (entries < 0).any():
                continue  # a class not exported (not among --classes)
            _class_node(out, spray, group, row, columns, (mine, entries))
            written.append(c)
    return written


def write_project(path: str, store: RelevanceStore, group: str, name: str) -> None:
    """The project YAML, file names relative to it (ViRelAy resolves them from the YAML's folder)."""
    setting = store.group(group).setting or {}
    mode = store.config.get("target_mode", "label") if isinstance(store.config, dict) else "label"
    model = store.config.get("model", {}) if isinstance(store.config, dict) else {}
    project = {"project": {
        "name": name, "model": str(model.get("factory") or model.get("name") or "unknown"),
        "label_map": "label-map.json",
        "dataset": {"name": os.path.basename(str(store.url).rstrip("/")), "type": "hdf5", "path": "dataset.h5",
                    "input_width": store.width, "input_height": store.height,
                    "up_sampling_method": "none", "down_sampling_method": "none"},
        "attributions": {"attribution_method": str(setting.get("composite", group)),
                         "attribution_strategy": "predicted_label" if mode == "prediction" else "true_label",
                         "sources": [f"{safe_name(group)}-attribution.h5"]},
        "analyses": [{"analysis_method": "spray", "sources": [f"{safe_name(group)}-analysis.h5"]}],
    }}
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(project, handle, sort_keys=False)


def export(store_url: str, out_dir: str, *, spray_dir: str | None = None, groups: Sequence[str] | None = None,
           classes: Sequence[int] | None = None, name: str | None = None) -> dict:
    """Write the ViRelAy project of a store and its SpRAy results (``lrp-audit spray``) into ``out_dir`` (a
    local folder: h5py writes local files). Returns what was written: project files, rows, missing images."""
    from aggregations.run import changes_since, default_out_dir, same_location
    from aggregations.spray.run import load
    from pipeline.store import open_store

    store = open_store(store_url)
    spray_dir = spray_dir or default_out_dir(store_url)
    spray = load(spray_dir)
    recorded = spray.summary.get("store_state")
    if recorded is not None:  # results of another store, or older than this one, would be attached to its maps
        changes = changes_since(recorded, store)
        if changes and not same_location(spray.summary, store_url):  # rerunning into spray_dir would overwrite them
            raise ValueError(f"the SpRAy results in {spray_dir!r} were made from {spray.summary.get('store')!r}, not "
                             f"{store_url!r} ({'; '.join(changes)}): pass the --spray folder of {store_url!r}, or run "
                             f"'lrp-audit spray {store_url}' to make its own")
        if changes:
            raise ValueError(f"the SpRAy results in {spray_dir!r} do not describe the store {store_url!r} as it is "
                             f"({'; '.join(changes)}): run 'lrp-audit spray {store_url} --out {spray_dir}' again")
    done = sorted(set(spray.classes["group"].to_pylist()))
    names = list(groups or done)
    unknown = sorted(set(names) - set(done))
    if unknown:
        raise ValueError(f"no SpRAy results for group(s) {unknown}: the SpRAy run has {done}")
    stems = [safe_name(group) for group in names]
    clash = sorted({group for group, stem in zip(names, stems) if stems.count(stem) > 1})
    if clash:  # one group's project would overwrite the other's files
        raise ValueError(f"groups {clash} share the file name {safe_name(clash[0])!r} in a ViRelAy project: export "
                         "them one at a time (--group) into different folders")
    rows = exported_rows(store, names, classes)
    for group in names:
        store.group(group).checked_rows()  # damaged row arrays are refused before anything is written
    files = ["label-map.json", "dataset.h5"] + [stem + end for stem in stems
                                                for end in ("-attribution.h5", "-analysis.h5", ".yaml")]
    os.makedirs(out_dir, exist_ok=True)
    # each file is written beside its final name and renamed once all are: an export refused midway (a damaged map
    # found while writing) or interrupted leaves an earlier export in out_dir as it was, and no half-written file
    partial = {file: os.path.join(out_dir, f".{file}.partial") for file in files}
    try:
        write_label_map(partial["label-map.json"], store.class_names)
        for group, stem in zip(names, stems):  # the maps first: a damaged one is found before the images are decoded
            write_attributions(partial[f"{stem}-attribution.h5"], store, group, rows)
        missing = write_dataset(partial["dataset.h5"], store, names[0], rows)
        analysed = {}
        for group, stem in zip(names, stems):
            analysed[group] = write_analysis(partial[f"{stem}-analysis.h5"], spray, group, rows)
            write_project(partial[f"{stem}.yaml"], store, group, f"{name or 'lrp-audit'}: {group}")
    except BaseException:
        for path in partial.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    for file, path in partial.items():
        os.replace(path, os.path.join(out_dir, file))
    projects = [os.path.join(out_dir, f"{stem}.yaml") for stem in stems]
    return {"projects": projects, "rows": len(rows), "missing_images": missing, "classes": analysed}
