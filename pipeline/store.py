"""The Zarr v3 relevance store: the one module that reads and writes it.

Layout (documented in docs/store-format.md, readable with plain ``zarr``/``xarray``)::

    <root>                      attrs: lrp_audit_format, config, class_names, software, layout
      explanations/<name>/      attrs: setting (composite + parameters of this group)
        relevance     (N,H,W)   float32, channel-summed; chunks (1,H,W) in shards (S,H,W)
        relevance_channels (N,C,H,W) float32, optional
        output, relevance_sum, residual        (N,) float64
        target, label, prediction, sample_id   (N,) int64, -1 = none
        path, error   (N,) string
        status        (N,) int8: 0 pending, 1 ok, 2 failed, 3 nonfinite
        labels (N,L) bool, boxes (N,K,4) float32 NaN-padded, mask (N,H,W) bool   (optional)

Every array is cut along rows into the same shards of S rows (``rows_per_shard``). A writer always
writes whole shards, so two writers never touch one shard object (zarr-python loses data when they do),
and it writes ``status`` last, so a row only reads as done once all of its arrays are on storage:
a writer killed half-way leaves the shard pending and a rerun rewrites the whole shard.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np
import pyarrow as pa
import zarr

from .lease import LEASE

FORMAT_VERSION = 1

STATUS_PENDING = 0
STATUS_OK = 1
STATUS_FAILED = 2
STATUS_NONFINITE = 3
STATUS_NAMES = {STATUS_PENDING: "pending", STATUS_OK: "ok", STATUS_FAILED: "failed", STATUS_NONFINITE: "nonfinite"}

EXPLANATIONS = "explanations"
CREATING = "lrp_audit_creating"  # root attribute while a store is being laid out

# name -> (dtype, fill value); the per-row scalar arrays every group has
_ROW_ARRAYS: dict[str, tuple[Any, Any]] = {
    "sample_id": ("int64", -1),
    "path": (str, ""),
    "target": ("int64", -1),
    "label": ("int64", -1),
    "prediction": ("int64", -1),
    "output": ("float64", np.nan),
    "relevance_sum": ("float64", np.nan),
    "residual": ("float64", np.nan),
    "error": (str, ""),
    "status": ("int8", STATUS_PENDING),
}
ROW_COLUMNS = ["row", *_ROW_ARRAYS]


class StoreError(ValueError):
    """A store that cannot be opened or written as asked; the message says what to do."""


class StoreConfigMismatch(StoreError):
    """The store at this URL was made by a run with a different configuration."""


def canonical_json(value: Any) -> str:
    """One spelling per config, so that equal configs compare equal however they were built."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{where}: not in the store, {new[key]!r} now")
            elif key not in new:
                lines.append(f"{where}: {old[key]!r} in the store, missing now")
            else:
                lines += config_differences(old[key], new[key], where)
        return lines
    if canonical_json(old) != canonical_json(new):
        return [f"{prefix or 'config'}: {old!r} in the store, {new!r} now"]
    return []


def _open_root(url: str, mode: str, storage_options: Mapping[str, Any] | None,
               attributes: dict | None = None) -> zarr.Group:
    options = dict(storage_options or {})
    if str(url).startswith("file://"):  # fsspec's local filesystem makes no parent folders unless asked
        options.setdefault("auto_mkdir", True)
    return zarr.open_group(str(url), mode=mode, zarr_format=3, storage_options=options or None, attributes=attributes)


def _refuse_foreign_content(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Creating a store clears its path: refuse a path that holds anything but an unfinished lrp-audit store."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise StoreError(f"{url!r} is a file, not a relevance store: choose another path")
    entries = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    entries = [entry for entry in entries if entry != LEASE]  # the lease of the driver about to create the store
    if entries and "zarr.json" not in entries:
        raise StoreError(f"{url!r} is a folder that holds other files ({', '.join(sorted(entries)[:5])}): "
                         "a new store needs an empty or new path")


def open_store(url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> RelevanceStore:
    """Open an existing store at a local path or any fsspec URL (``s3://...``); read-only by default."""
    from zarr.errors import ContainsArrayError

    try:
        root = _open_root(url, mode, storage_options)
    except FileNotFoundError as error:
        raise StoreError(_no_store(url, storage_options)) from error
    except ContainsArrayError as error:
        raise StoreError(f"{url!r} is a Zarr array, not an lrp-audit relevance store (a Zarr group)") from error
    except (ValueError, TypeError, KeyError) as error:  # zarr.json truncated, not JSON, or not Zarr metadata
        raise StoreError(f"{url!r}: its zarr.json cannot be read ({_reason(error)}): "
                         "not a relevance store, or a damaged one") from error
    version = root.attrs.get("lrp_audit_format")
    if version is None:
        raise StoreError(f"{url!r} is a Zarr group but not an lrp-audit relevance store (no 'lrp_audit_format')")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"store {url!r} has format {version!r}, not a format version (1, 2, ...): a damaged store")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"store {url!r} has format {version}, this lrp-audit reads up to {FORMAT_VERSION}: upgrade lrp-audit"
        )
    return RelevanceStore(root, str(url))


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _no_store(url: str, storage_options: Mapping[str, Any] | None) -> str:
    """Why there is no store at ``url``: nothing there, or a folder of something else (a Zarr v2 store, files)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
        entries = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    except (OSError, ValueError):  # nothing there (or unlistable): the plain message
        entries = []
    if ".zgroup" in entries or ".zarray" in entries:
        return f"{url!r} is a Zarr v2 store, not an lrp-audit relevance store (Zarr v3, with a zarr.json)"
    if entries:
        listed = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return f"{url!r} is a folder without a zarr.json ({listed}): not an lrp-audit relevance store"
    return f"no relevance store at {url!r}: run 'lrp-audit explain' to create it"


def _check_root(attrs: Mapping[str, Any], url: str) -> None:
    """Refuse root attributes that are not those of docs/store-format.md (an edited or damaged zarr.json) before
    anything reads by them: a layout of the wrong kind, class names that are not a list of names."""
    layout = attrs.get("layout")
    kind = "missing" if layout is None else f"a {type(layout).__name__}, not a mapping"
    problem = None if isinstance(layout, Mapping) else f"'layout' is {kind}"
    for key, least in (("n_rows", 0), ("height", 1), ("width", 1), ("rows_per_shard", 1), ("max_boxes", 0)):
        value = layout.get(key, 0) if problem is None else 0
        if problem is None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            problem = f"layout {key!r} is {value!r}, not an integer >= {least}"
    groups = layout.get("groups") if problem is None else []
    if problem is None and (not isinstance(groups, list) or not groups
                            or not all(isinstance(g, str) and g and "/" not in g for g in groups)):
        problem = f"layout 'groups' is {groups!r}, not a list of group names"
    names = attrs.get("class_names", [])
    if problem is None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        problem = f"'class_names' is {names!r:.60}, not a list of names"
    if problem is None and not isinstance(attrs.get("config", {}), Mapping):
        problem = f"'config' is a {type(attrs['config']).__name__}, not a mapping"
    if problem:
        raise StoreError(f"store {url!r}: the root attribute {problem}: the store's zarr.json is damaged or was "
                         "edited (docs/store-format.md)")


class RelevanceStore:
    """A relevance store: shared run attributes plus one :class:`ExplanationGroup` per setting."""

    def __init__(self, root: zarr.Group, url: str):
        self._group = root
        self.url = url
        attrs = root.attrs.asdict()
        _check_root(attrs, url)
        self.format_version = int(attrs["lrp_audit_format"])
        self.config: dict = attrs.get("config", {})
        self.class_names: list[str] = list(attrs.get("class_names", []))
        self.software: dict = attrs.get("software", {})
        layout = attrs["layout"]
        self.n_rows = int(layout["n_rows"])
        self.height = int(layout["height"])
        self.width = int(layout["width"])
        self.rows_per_shard = int(layout["rows_per_shard"])
        self.group_names: list[str] = list(layout["groups"])
        self.layout: dict = dict(layout)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        config: Mapping[str, Any],
        class_names: Sequence[str],
        groups: Sequence[str] | Mapping[str, Mapping[str, Any]],
        n_rows: int,
        height: int,
        width: int,
        rows_per_shard: int = 256,
        max_boxes: int = 0,
        with_mask: bool = False,
        num_labels: int | None = None,
        channels: int | None = None,
        software: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> RelevanceStore:
        """Create the store, or reopen it for resuming when it was made with the same config.

        ``groups`` names the explanation settings (a dict maps each name to its setting, kept in the
        group's attrs). ``channels`` adds per-channel relevance (N,C,H,W); ``max_boxes`` K > 0 adds
        boxes (N,K,4); ``num_labels`` adds multi-label targets (N,L); ``with_mask`` adds masks (N,H,W).
        A store made with a different config is refused, never overwritten.

        Many parameters because: the keywords are the layout, one each.
        Long because: validating, comparing with an existing store and laying out a new one stay together here so
        that the order of those writes (docs/store-format.md) is in one place.
        """
        settings = dict(groups) if isinstance(groups, Mapping) else {name: {} for name in groups}
        if not settings:
            raise StoreError("a store needs at least one explanation group")
        for name in settings:
            if not name or "/" in name:
                raise StoreError(f"group name {name!r} must be non-empty and contain no '/'")
        if n_rows < 0 or height <= 0 or width <= 0 or rows_per_shard <= 0:
            raise StoreError(
                f"bad store shape: n_rows={n_rows}, height={height}, width={width}, rows_per_shard={rows_per_shard}"
            )
        config = json.loads(canonical_json(config))  # what reads back from JSON attrs, for comparisons
        layout = {
            "n_rows": int(n_rows), "height": int(height), "width": int(width),
            "rows_per_shard": int(rows_per_shard), "groups": list(settings),
            "max_boxes": int(max_boxes), "with_mask": bool(with_mask),
            "num_labels": None if num_labels is None else int(num_labels),
            "channels": None if channels is None else int(channels),
        }
        _refuse_foreign_content(url, storage_options)
        existing = cls._existing(url, storage_options)
        if existing is not None:
            differences = config_differences(existing.attrs.get("config", {}), config)
            old_layout = existing.attrs.get("layout", {})
            differences += config_differences(old_layout, layout, "layout")
            if differences:
                raise StoreConfigMismatch(
                    f"the store at {url!r} was made by a run with a different configuration:\n  "
                    + "\n  ".join(differences)
                    + "\nTo resume it, run with the values it was made with (the store's 'config' in its zarr.json); "
                      "to keep it and start another, write to a new store path."
                )
            return cls(existing, str(url))

        # the format attribute is written last: a creation cut short (a kill) leaves a store marked as still
        # being created, which the next run recreates instead of resuming into missing arrays
        root = _open_root(url, "w", storage_options, attributes={  # one write: the marker is there from the start
            CREATING: True,
            "config": config,
            "class_names": [str(name) for name in class_names],
            "software": dict(software or {}),
            "layout": layout,
            "status_codes": {str(code): name for code, name in STATUS_NAMES.items()},
        })
        explanations = root.require_group(EXPLANATIONS)
        for name, setting in settings.items():
            cls._create_group(explanations.require_group(name), dict(setting), layout)
        root.attrs.update({"lrp_audit_format": FORMAT_VERSION})
        root.attrs.pop(CREATING, None)
        return cls(root, str(url))

    @staticmethod
    def _existing(url: str, storage_options: Mapping[str, Any] | None) -> zarr.Group | None:
        try:
            root = _open_root(url, "r+", storage_options)
        except FileNotFoundError:  # zarr's GroupNotFoundError is one too
            return None
        if "lrp_audit_format" not in root.attrs:
            if root.attrs.get(CREATING):  # an lrp-audit creation that was cut short: no row was written yet
                return None
            raise StoreError(f"{url!r} holds a Zarr group that is not an lrp-audit store: choose another path")
        return root

    @staticmethod
    def _create_group(group: zarr.Group, setting: dict, layout: dict) -> None:
        group.attrs["setting"] = json.loads(canonical_json(setting))
        rows = _shard_rows(layout)
        for name, shape, dtype, fill, dims, inner in _array_specs(layout):
            kwargs = dict(chunks=(rows, *shape[1:]))
            if inner is not None:  # many small chunks packed into one shard object per row block
                kwargs = dict(chunks=inner, shards=(rows, *shape[1:]))
            group.create_array(name, shape=shape, dtype=dtype, fill_value=fill, dimension_names=dims, **kwargs)

    # ---- shards -------------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of one shard: the unit of writing, resuming and retrying."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.n_shards - 1}")
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    def group(self, name: str) -> ExplanationGroup:
        """The group ``name``, its arrays checked against the layout (:func:`_check_group`): one metadata read each."""
        if name not in self.group_names:
            raise KeyError(f"no explanation group {name!r} in {self.url!r}; groups: {self.group_names}")
        where = f"{EXPLANATIONS}/{name}"
        try:
            node = self._group[where]
        except KeyError as error:
            raise StoreError(f"store {self.url!r}: the group {where!r} of its layout is missing (no {where}/zarr.json)"
                             ": the store is damaged") from error
        except (ValueError, TypeError) as error:
            raise StoreError(f"store {self.url!r}: {where}/zarr.json cannot be read ({_reason(error)}): the store is "
                             "damaged") from error
        if not isinstance(node, zarr.Group):
            raise StoreError(f"store {self.url!r}: {where!r} is a Zarr array, not a group: the store is damaged")
        _check_group(node, self.layout, self.url)
        return ExplanationGroup(node, name, self.rows_per_shard, url=self.url)

    def groups(self) -> list[ExplanationGroup]:
        return [self.group(name) for name in self.group_names]

    def __repr__(self) -> str:
        return (f"RelevanceStore({self.url!r}, rows={self.n_rows}, map={self.height}x{self.width}, "
                f"groups={self.group_names})")


def _shard_rows(layout: Mapping[str, Any]) -> int:
    """Rows of one shard (chunk along ``row``) of every array: zarr wants chunks >= 1 even for an empty array."""
    return max(min(int(layout["rows_per_shard"]), int(layout["n_rows"])), 1)


def _array_specs(layout: Mapping[str, Any]) -> list[tuple]:
    """(name, shape, dtype, fill value, dimension names, inner chunk or None) of every array a group of this layout
    has: what :meth:`RelevanceStore.create` makes and what opening a group checks."""
    n, h, w = (int(layout[key]) for key in ("n_rows", "height", "width"))
    specs = [("relevance", (n, h, w), "float32", np.nan, ("row", "y", "x"), (1, h, w))]
    specs += [(name, (n,), dtype, fill, ("row",), None) for name, (dtype, fill) in _ROW_ARRAYS.items()]
    if layout.get("channels"):
        c = int(layout["channels"])
        specs.append(("relevance_channels", (n, c, h, w), "float32", np.nan, ("row", "channel", "y", "x"),
                      (1, c, h, w)))
    if layout.get("num_labels"):
        specs.append(("labels", (n, int(layout["num_labels"])), "bool", False, ("row", "class"), None))
    if layout.get("max_boxes"):
        specs.append(("boxes", (n, int(layout["max_boxes"]), 4), "float32", np.nan, ("row", "box", "corner"), None))
    if layout.get("with_mask"):
        specs.append(("mask", (n, h, w), "bool", False, ("row", "y", "x"), (1, h, w)))
    return specs


def _array_problem(array: zarr.Array, shape: tuple, dtype: Any, fill: Any, rows: int) -> str | None:
    """How ``array`` differs from what the layout makes it (shape, data type, rows per shard, fill value), or None."""
    if tuple(array.shape) != shape:
        return f"has shape {tuple(array.shape)}, the store's layout says {shape}"
    have = np.dtype(array.dtype)
    if (have.kind not in "TUO") if dtype is str else (have != np.dtype(dtype)):
        return f"has data type {array.dtype}, the store's format says {'string' if dtype is str else dtype}"
    if (array.shards or array.chunks)[0] != rows:
        return f"is cut into shards of {(array.shards or array.chunks)[0]} rows, the store's layout says {rows}"
    if dtype is not str:
        stored, wanted = np.asarray(array.fill_value, have), np.asarray(fill, have)
        if not (stored == wanted or (have.kind == "f" and np.isnan(wanted) and np.isnan(stored))):
            return f"has fill value {stored.item()!r}, the store's format says {fill!r}"
    return None


def _check_group(node: zarr.Group, layout: Mapping[str, Any], url: str) -> None:
    """Refuse a group whose arrays are not those its layout makes: one missing (its zarr.json deleted), unreadable,
    or of another shape, data type, shard size or fill value (an edited zarr.json, or arrays of different lengths).
    zarr would read such arrays as other values, or read a missing chunk as a fill value that is not the format's
    (NaN relevance, pending status), so the read side would audit wrong numbers instead of failing."""
    rows = _shard_rows(layout)
    for name, shape, dtype, fill, _, _ in _array_specs(layout):
        where = f"{node.path}/{name}"
        try:
            array = node[name]
        except KeyError:
            raise StoreError(f"store {url!r}: the array {where!r} is missing (no {where}/zarr.json): the store is "
                             "damaged") from None
        except (ValueError, TypeError) as error:
            raise StoreError(f"store {url!r}: {where}/zarr.json cannot be read ({_reason(error)}): the store is "
                             "damaged") from error
        problem = "is a group, not an array" if not isinstance(array, zarr.Array) else _array_problem(
            array, shape, dtype, fill, rows)
        if problem:
            raise StoreError(f"store {url!r}: the array {where!r} {problem}: its zarr.json is damaged or was edited")


class RowReader:
    """A zarr array behind a plain object: ``reader[key]`` and ``reader.rows(indices)`` (only those rows).

    A plain object because Ray's Dask scheduler rebuilds every dataclass among a task's arguments
    through its ``__init__`` (ray/util/dask/common.py, ``unpack_object_refs``), and zarr 3 arrays are
    dataclasses with init=False fields, so the rebuild fails.
    """

    def __init__(self, array: zarr.Array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, np.dtype(array.dtype), array.ndim

    def __getitem__(self, key):
        return self.array[key]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Just these rows (sorted), one read per run of consecutive rows: the store's inner chunks are
        single rows, so this decompresses nothing else (zarr's ``oindex`` is slower for scattered rows)."""
        indices = np.asarray(indices, np.int64)
        runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1) if len(indices) else []
        parts = [_read(self.array, slice(run[0], run[-1] + 1)) for run in runs]
        return np.concatenate(parts) if parts else np.zeros((0, *self.shape[1:]), self.dtype)


class ShardReader:
    """Whole shards (and scattered rows) of a sharded array, one store request per shard, decoded here.

    zarr-python decodes a shard's inner chunks one asyncio task each; for the store's one-row chunks that overhead
    is several times the zstd decompression itself (benchmarks/bench_aggregate.py). This reader fetches the
    shard object (or, for a few rows, its index and those rows' byte ranges) through the array's own zarr store
    and decompresses the inner chunks into one preallocated block with numcodecs. It takes the fast path only for
    the layout this module writes (docs/store-format.md, "Reading fast"); any other array reads through zarr.
    The index checksum is verified as zarr does, so a torn shard fails the same way. A plain object, like
    :class:`RowReader`, so that Dask on Ray can ship it.
    """

    whole_share = 0.5  # fetch the whole shard object when more than this share of its rows is wanted

    def __init__(self, array: zarr.Array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, np.dtype(array.dtype), array.ndim
        self.rows_per_shard = array.shards[0] if array.shards else array.chunks[0]
        self._zstd = _fast_layout(array)

    def __getitem__(self, key):
        """``reader[start:stop]`` for whole shards (what ``dask.array.from_array`` asks with shard chunks)."""
        rows = key[0] if isinstance(key, tuple) else key
        rest = key[1:] if isinstance(key, tuple) else ()
        full = len(rest) < self.ndim and all(isinstance(k, slice) and (k == slice(None) or k == slice(0, n))
                                             for k, n in zip(rest, self.shape[1:]))
        if not (isinstance(rows, slice) and rows.step in (None, 1) and full):
            return self.array[key]
        start, stop, _ = rows.indices(self.shape[0])
        return self.rows(np.arange(start, stop))

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` (sorted), equal to :meth:`RowReader.rows`: per shard one request for the whole object
        when most of its rows are wanted, else one for its index and one batched request for the rows' bytes."""
        indices = np.asarray(indices, np.int64)
        if self._zstd is None:
            return RowReader(self.array).rows(indices)
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        shard_of = indices // self.rows_per_shard
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for part in np.split(np.arange(len(indices)), bounds) if len(indices) else []:
            shard = int(shard_of[part[0]])
            local = indices[part] - shard * self.rows_per_shard
            self._read_shard(shard, local, out[part[0]:part[-1] + 1])
        return out

    def _read_shard(self, shard: int, local: np.ndarray, out: np.ndarray) -> None:
        """Rows ``local`` (within the shard, sorted) of one shard into ``out``; a missing object or chunk is fill."""
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store, prototype = self.array.store, default_buffer_prototype()
        key = _shard_key(self.array, shard)
        index_bytes = 16 * self.rows_per_shard + 4
        whole = len(local) > self.whole_share * self.rows_per_shard
        data = sync(store.get(key, prototype, None if whole else SuffixByteRequest(index_bytes)))
        if data is None:
            out[...] = self.array.fill_value
            return
        data = data.as_numpy_array()
        index = _shard_index(data[len(data) - index_bytes:], key)[local]
        present = index[:, 0] != np.uint64(2**64 - 1)
        if whole:
            pieces = [data[int(o):int(o + n)] for o, n in index[present]]
        else:
            ranges = [(key, RangeByteRequest(int(o), int(o + n))) for o, n in index[present]]
            got = sync(store.get_partial_values(prototype, ranges))
            if any(piece is None for piece in got):  # the object went away between the index read and this one
                raise StoreError(f"shard {key!r} changed while it was read (rewritten by a writer?)")
            pieces = [piece.as_numpy_array() for piece in got]
        out[~present] = self.array.fill_value
        try:
            for row, piece in zip(np.flatnonzero(present), pieces):
                self._zstd.decode(piece, out=out[row])
        except Exception as error:  # an inner chunk overwritten under an intact index
            raise StoreError(f"store {str(store)!r}: shard {key!r} cannot be read ({_reason(error)}): the store is "
                             "damaged (an overwritten object); restore it from a copy") from error


def _read(array: zarr.Array, rows: slice, url: str | None = None) -> np.ndarray:
    """``array[rows]``; a chunk zarr cannot decode (truncated, overwritten) is a :class:`StoreError` naming it and
    the store ``url`` (by default as the array's store spells it)."""
    try:
        return array[rows]
    except Exception as error:  # zarr and numcodecs raise RuntimeError, ValueError, ... for a damaged object
        raise _damaged(array, rows, error, url) from error


def _damaged(array: zarr.Array, rows: slice, error: Exception, url: str | None) -> StoreError:
    """The StoreError of a read of ``rows`` that failed with ``error``: it names the first shard object of those rows
    that cannot be read alone (found on this error path only)."""
    step = (array.shards or array.chunks)[0]
    start, stop, _ = rows.indices(array.shape[0])
    key = None
    for shard in range(start // step, -(-stop // step)):
        try:
            array[shard * step:min((shard + 1) * step, array.shape[0])]
        except Exception:
            key = _shard_key(array, shard)
            break
    where = f"the object {key!r}" if key else f"rows [{start}, {stop}) of {array.path!r}"
    store = url or str(array.store)
    return StoreError(f"store {store!r}: {where} cannot be read ({_reason(error)}): the store is damaged (a truncated "
                      "or overwritten object); restore it from a copy, or explain the images into a new store")


def _exists(array: zarr.Array, key: str) -> bool | None:
    """Whether the object ``key`` is in the array's store (None when the store cannot tell)."""
    from zarr.core.sync import sync

    try:
        return bool(sync(array.store.exists(key)))
    except Exception:
        return None


def _fast_layout(array: zarr.Array):
    """The numcodecs Zstd that decodes this array's inner chunks when it has the store's own layout (shards of
    one-row chunks, bytes little-endian + zstd inside, a bytes + crc32c index at the end), else None."""
    from numcodecs import Zstd

    codecs = array.metadata.to_dict().get("codecs", []) if array.metadata.zarr_format == 3 else []
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    config = codecs[0]["configuration"]
    inner, index = config["codecs"], config["index_codecs"]
    dtype = np.dtype(array.dtype)  # stored little-endian and held little-endian in memory: decoded bytes fit as-is
    little = dtype.itemsize == 1 or (inner[0].get("configuration", {}).get("endian") == "little"
                                     and dtype.str[0] == "<")
    if (tuple(config["chunk_shape"]) != (1, *array.shape[1:]) or tuple(array.shards or ())[1:] != array.shape[1:]
            or config.get("index_location", "end") != "end"
            or [c["name"] for c in inner] != ["bytes", "zstd"] or not little
            or [c["name"] for c in index] != ["bytes", "crc32c"]
            or index[0].get("configuration", {}).get("endian", "little") != "little"):
        return None
    zstd = inner[1]["configuration"]
    return Zstd(level=zstd.get("level", 0), checksum=zstd.get("checksum", False))


def _shard_index(raw: np.ndarray, key: str) -> np.ndarray:
    """(S, 2) uint64 offsets and lengths of a shard's inner chunks, after the crc32c check zarr makes."""
    import google_crc32c

    body = raw[:-4]
    if google_crc32c.value(body.tobytes()).to_bytes(4, "little") != bytes(raw[-4:]):
        raise StoreError(f"shard {key!r}: stored and computed checksum of its index do not match (a torn write?)")
    return body.view("<u8").reshape(-1, 2)


def _empty_rows(values: np.ndarray, fill) -> np.ndarray:
    """Per row, whether it holds only the fill value, as zarr decides which inner chunks to leave out
    (``write_empty_chunks`` off, its default): NaN equals a NaN fill, anything else is compared bit for bit (a -0.0
    row is not a 0.0 fill)."""
    flat, fill = values.reshape(len(values), -1), np.asarray(fill, values.dtype)
    if fill.dtype.kind in "fc" and np.isnan(fill):
        return np.isnan(flat).all(axis=1)
    as_bytes = np.ascontiguousarray(flat).view(np.uint8).reshape(len(values), -1)
    return (as_bytes == np.frombuffer(np.full(flat.shape[1], fill).tobytes(), np.uint8)).all(axis=1)


def _shard_key(array: zarr.Array, shard: int) -> str:
    """The store key of shard ``shard`` (the first along the rows; the others axes are one shard) of ``array``."""
    key = array.metadata.encode_chunk_key((shard, *(0,) * (array.ndim - 1)))
    return f"{array.path}/{key}" if array.path else key


_ENCODERS: dict[int, ThreadPoolExecutor] = {}
_ENCODERS_LOCK = threading.Lock()


def _encoders() -> ThreadPoolExecutor:
    """The threads that compress shard rows (zstd releases the GIL): one per core this process may run on, at most 8,
    made anew in a forked child (whose copy of the parent's pool has no threads)."""
    pid = os.getpid()
    with _ENCODERS_LOCK:
        if pid not in _ENCODERS:
            _ENCODERS.clear()
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            _ENCODERS[pid] = ThreadPoolExecutor(max_workers=min(8, cores), thread_name_prefix="zstd-encode")
        return _ENCODERS[pid]


def _compress(zstd, rows: np.ndarray) -> list[bytes]:
    return [zstd.encode(row) for row in rows]


def write_shards(array: zarr.Array, start: int, values: np.ndarray) -> bool:
    """Write rows ``[start, start + len(values))``, whole shards, of an array with the store's own layout (one-row
    zstd chunks in shards, :func:`_fast_layout`) as zarr would, but encoded here: each row one numcodecs zstd frame,
    then the index (offset, length per row; 2^64-1 twice for a row left out because it is all fill) and its crc32c,
    one store request per shard, the rows compressed on :func:`_encoders` threads. zarr 3 writes the same bytes (a
    test compares them) with about twice the CPU time a row, from one asyncio task per row. Returns False (nothing
    written) for any other layout, for rows that are not whole shards inside the array, for values of another shape
    and with zarr's ``write_empty_chunks`` on: zarr's slicing then writes them (or refuses them) as before."""
    zstd = _fast_layout(array)
    if zstd is None or array.config.write_empty_chunks:
        return False
    values = np.asarray(values)
    stop, rows_per_shard = start + (len(values) if values.ndim else 0), array.shards[0]
    if (values.shape[1:] != array.shape[1:] or not len(values) or start % rows_per_shard or stop > array.shape[0]
            or (stop % rows_per_shard and stop != array.shape[0])):
        return False
    import google_crc32c
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    prototype = default_buffer_prototype()
    values = np.ascontiguousarray(values, dtype=array.dtype)
    empty = _empty_rows(values, array.fill_value)
    for first in range(0, len(values), rows_per_shard):
        block, skip = values[first:first + rows_per_shard], empty[first:first + rows_per_shard]
        key = _shard_key(array, (start + first) // rows_per_shard)
        if skip.all():  # zarr stores no object for a shard of fill values
            sync(array.store.delete(key))
            continue
        kept = block[~skip]
        parts = np.array_split(kept, min(_encoders()._max_workers, max(1, len(kept) // 16)))
        pieces = [piece for part in _encoders().map(_compress, [zstd] * len(parts), parts) for piece in part]
        index = np.full((rows_per_shard, 2), 2**64 - 1, "<u8")
        lengths = np.array([len(piece) for piece in pieces], np.uint64)
        index[np.flatnonzero(~skip), 0] = np.cumsum(lengths) - lengths
        index[np.flatnonzero(~skip), 1] = lengths
        body = index.tobytes()
        data = b"".join([*pieces, body, google_crc32c.value(body).to_bytes(4, "little")])
        sync(array.store.set(key, prototype.buffer.from_bytes(data)))
    return True


def _clear_shards(array: zarr.Array, shards: range) -> None:
    """Delete the objects of whole shards about to be rewritten. A shard object torn by a writer killed on a
    non-atomic filesystem (``file://``, plain local paths) would otherwise be read back by the sharding codec and
    fail its checksum, and the shard could never be written again."""
    from zarr.core.sync import sync

    for shard in shards:
        sync(array.store.delete(_shard_key(array, shard)))


class ExplanationGroup:
    """The rows of one explanation setting: lazy relevance (dask) plus per-row metadata."""

    def __init__(self, group: zarr.Group, name: str, rows_per_shard: int, url: str | None = None):
        self._group = group
        self.name = name
        self.rows_per_shard = rows_per_shard
        self.url = url or str(group.store)
        self.setting: dict = dict(group.attrs.get("setting", {}))
        self.n_rows: int = group["status"].shape[0]

    # ---- reading arrays (what aggregations and benchmarks use instead of the zarr group) -----------------
    def has(self, name: str) -> bool:
        """Whether this group has the array ``name`` (``labels``, ``boxes``, ``mask``, ``relevance_channels``)."""
        return name in self._group

    def lazy(self, name: str) -> da.Array | None:
        """The array ``name`` as a dask array read by zarr itself, one chunk per shard; None when the group has no
        such array. The aggregation reads through :meth:`lazy_shards` instead (faster, and shippable by Dask on Ray).
        """
        if name not in self._group:
            return None
        array = self._group[name]
        return da.from_zarr(array, chunks=(max(min(self.rows_per_shard, self.n_rows), 1), *array.shape[1:]))

    def row_reader(self, name: str) -> RowReader:
        """A picklable reader of the array ``name``: ``reader.rows(indices)`` reads just those rows."""
        return RowReader(self._group[name])

    def shard_reader(self, name: str) -> ShardReader:
        """A picklable reader of whole shards of ``name`` (``reader.rows(indices)`` batched per shard)."""
        return ShardReader(self._group[name])

    def lazy_shards(self, name: str) -> da.Array | None:
        """Like :meth:`lazy`, one chunk per shard, each read by a :class:`ShardReader`: one store request per shard
        and no zarr task per inner chunk (the aggregation's read path). Works on Dask's and on Ray's schedulers."""
        if name not in self._group:
            return None
        reader = self.shard_reader(name)
        chunks = (max(min(self.rows_per_shard, self.n_rows), 1), *reader.shape[1:])
        return da.from_array(reader, chunks=chunks, lock=False, meta=np.empty((0,) * reader.ndim, reader.dtype))

    def read_rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` (sorted) of the array ``name``, one read per run of consecutive rows."""
        return self.row_reader(name).rows(indices)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the array ``name`` (all rows by default)."""
        return _read(self._group[name], slice(start, stop), self.url)

    def read_shard(self, name: str, shard: int) -> np.ndarray:
        """All rows of one shard of the array ``name``, in one store request when the array has the layout this
        module writes (:class:`ShardReader`; SpRAy's store pass); else the same values through zarr's slicing."""
        start = shard * self.rows_per_shard
        return self.shard_reader(name)[start:min(start + self.rows_per_shard, self.n_rows)]

    def label_bits(self, columns: np.ndarray) -> np.ndarray:
        """Per row, the multi-label bit of class ``columns[row]`` (False where it is -1 or out of range).

        Read shard by shard, so memory stays at one shard of ``labels`` however many rows and classes.
        """
        labels = self._group["labels"]
        out = np.zeros(len(columns), bool)
        step = self.rows_per_shard
        for start in range(0, len(columns), step):
            block, picked = _read(labels, slice(start, start + step), self.url), columns[start:start + step]
            valid = (picked >= 0) & (picked < block.shape[1])
            out[start:start + step][valid] = block[np.flatnonzero(valid), picked[valid]]
        return out

    @property
    def relevance(self) -> da.Array:
        return self.lazy("relevance")

    @property
    def relevance_channels(self) -> da.Array | None:
        return self.lazy("relevance_channels")

    @property
    def mask(self) -> da.Array | None:
        return self.lazy("mask")

    @property
    def boxes(self) -> np.ndarray | None:
        return _read(self._group["boxes"], slice(None), self.url) if "boxes" in self._group else None

    @property
    def labels(self) -> np.ndarray | None:
        return _read(self._group["labels"], slice(None), self.url) if "labels" in self._group else None

    @property
    def status(self) -> np.ndarray:
        return _read(self._group["status"], slice(None), self.url)

    def rows(self) -> pa.Table:
        """Per-row metadata as one Arrow table (no relevance), e.g. to select rows for aggregation."""
        columns = {"row": pa.array(np.arange(self.n_rows, dtype=np.int64))}
        for name in _ROW_ARRAYS:
            values = _read(self._group[name], slice(None), self.url)
            columns[name] = pa.array(values.astype(object) if values.dtype.kind in "TUO" else values,
                                     type=pa.string() if values.dtype.kind in "TUO" else None)
        return pa.table(columns)

    def checked_rows(self) -> pa.Table:
        """:meth:`rows`, refused (a :class:`StoreError` naming the rows) where they break what every writer of the
        store guarantees: a status that is no status code, an ok row without a target, or ok rows without a sample
        id, prediction, path, finite output or residual where the other ok rows have them (``write_block`` lets a
        caller leave an array out, for every row), or a residual that is not relevance_sum - output. That is what a
        deleted or edited chunk of a row array looks like (zarr reads a missing chunk as its fill value: -1, NaN,
        ""), and the read side (aggregate, spray, export) would otherwise audit those rows as they read. Vectorised
        over the (N,) columns :meth:`rows` reads anyway."""
        table = self.rows()
        column = {name: table[name].to_numpy(zero_copy_only=False) for name in _ROW_ARRAYS}
        status, ok = column["status"], column["status"] == STATUS_OK
        codes = ~np.isin(status, list(STATUS_NAMES))
        if codes.any():
            raise self._rows_error(codes, f"a status that is no status code ({sorted(set(status[codes].tolist()))[:5]}"
                                          "; 0 pending, 1 ok, 2 failed, 3 nonfinite)", "status")
        out, total, residual = column["output"], column["relevance_sum"], column["residual"]
        with np.errstate(invalid="ignore"):
            off = np.abs(residual - (total - out)) > 1e-6 * (np.abs(total) + np.abs(out)) + 1e-12
        for name, missing, what in (("target", column["target"] < 0, "no target (a negative one)"),
                                    ("relevance_sum", ~np.isfinite(total), "no finite relevance_sum"),
                                    ("sample_id", column["sample_id"] < 0, "no sample id"),
                                    ("prediction", column["prediction"] < 0, "no prediction"),
                                    ("path", column["path"] == "", "no path"),
                                    ("output", ~np.isfinite(out), "no finite output f(x)"),
                                    ("residual", ~np.isfinite(residual), "no finite residual"),
                                    ("residual", off & np.isfinite(residual), "a residual that is not "
                                                                              "relevance_sum - output")):
            always = name in ("target", "relevance_sum") or what.startswith("a residual")  # the others: when mixed
            if (ok & missing).any() and (always or (ok & ~missing).any()):
                rest = "" if always else " where the other ok rows have one"
                raise self._rows_error(ok & missing, f"status ok but {what}{rest}", name)
        return table

    def check_maps(self, rows: np.ndarray, totals: np.ndarray, magnitudes: np.ndarray, stored: np.ndarray,
                   name: str = "relevance") -> None:
        """Refuse ok ``rows`` whose map of ``name``, as read, sums (``totals``, float64) to something not finite, or
        not to the ``relevance_sum`` the writer stored for it (``stored``, from the :meth:`checked_rows` the caller
        read) beyond float32 rounding (1e-3 of its ``magnitudes``, sum |R|, and of the stored sum). A missing shard
        object or inner chunk reads as NaN (its fill value), so an ok row without a finite map is a damaged store,
        never a map to audit; a map whose sum moved is one whose bytes changed. Free: a comparison of (n,) sums the
        reader computes and holds anyway, no read."""
        rows = np.asarray(rows, np.int64)
        if not rows.size:
            return
        stored = np.asarray(stored, np.float64)
        with np.errstate(invalid="ignore"):
            # not "within": a stored sum read as NaN (its chunk deleted since the caller checked the rows) is moved too
            moved = ~(np.abs(totals - stored) <= 1e-3 * (np.abs(magnitudes) + np.abs(stored)) + 1e-30)
        lost = ~np.isfinite(totals)
        for bad, what in ((lost, "no finite relevance map (NaN: its shard object or inner chunk is missing, or "
                                 "holds NaN)"),
                          (moved & ~lost, "a relevance map that does not add up to its stored relevance_sum")):
            if bad.any():
                mask = np.zeros(self.n_rows, bool)
                mask[rows[bad]] = True
                raise self._rows_error(mask, f"status ok but {what}", name)

    def _rows_error(self, bad: np.ndarray, what: str, array: str) -> StoreError:
        """A StoreError for the rows ``bad`` (a mask over the group's rows) of ``array``, with the shard objects that
        hold the first of them."""
        rows = np.flatnonzero(bad)
        shard = int(rows[0]) // self.rows_per_shard
        key = _shard_key(self._group[array], shard)
        there = "missing" if _exists(self._group[array], key) is False else "present"
        listed = ", ".join(map(str, rows[:5].tolist())) + (", ..." if rows.size > 5 else "")
        return StoreError(f"store {self.url!r}, group {self.name!r}: {rows.size} row(s) with {what}: rows {listed} "
                          f"(shard {shard}: its object {key!r} is {there}): the store is damaged (a deleted, truncated "
                          "or edited object); restore it from a copy, or explain the images into a new store")

    def shard_status(self, shard: int) -> np.ndarray | None:
        """Status of one shard's rows; None when its status chunk is unreadable (a write cut by a kill)."""
        start = shard * self.rows_per_shard
        try:
            return self._group["status"][start:min(start + self.rows_per_shard, self.n_rows)]
        except Exception:  # a truncated chunk from a killed writer: redo the shard
            return None

    def pending_shards(self, retry_failed: bool = False) -> list[int]:
        """Shards with a row still to compute (pending, or also failed/nonfinite with ``retry_failed``)."""
        n_shards = -(-self.n_rows // self.rows_per_shard)
        todo = []
        for shard in range(n_shards):
            status = self.shard_status(shard)
            redo = (status != STATUS_OK) if retry_failed else (status == STATUS_PENDING)
            if status is None or redo.any():
                todo.append(shard)
        return todo

    def write_block(self, start: int, *, relevance: np.ndarray, status: np.ndarray | None = None,
                    **arrays: Any) -> np.ndarray:
        """Write rows ``[start, start+n)`` covering whole shards; ``status`` goes last and is returned.

        Rows whose status is ok (the default) but whose relevance or output is NaN/Inf are stored as
        nonfinite. ``relevance_sum`` and ``residual`` are computed when not given.
        """
        relevance = np.asarray(relevance, dtype=np.float32)
        n = relevance.shape[0]
        stop = start + n
        if start % self.rows_per_shard or (stop % self.rows_per_shard and stop != self.n_rows) or stop > self.n_rows:
            raise StoreError(
                f"write_block rows [{start}, {stop}) are not whole shards of {self.rows_per_shard} rows "
                f"(store has {self.n_rows} rows): writers must write whole shards"
            )
        unknown = set(arrays) - set(_ROW_ARRAYS) - {"relevance_channels", "labels", "boxes", "mask"}
        if unknown:
            raise StoreError(f"write_block got unknown arrays {sorted(unknown)}")
        if "relevance_sum" not in arrays:
            arrays["relevance_sum"] = relevance.sum(axis=(1, 2), dtype=np.float64)
        if "residual" not in arrays and "output" in arrays:
            relevance_sum, output = (np.asarray(arrays[k], np.float64) for k in ("relevance_sum", "output"))
            arrays["residual"] = relevance_sum - output
        status = np.full(n, STATUS_OK, np.int8) if status is None else np.asarray(status, np.int8).copy()
        finite = np.isfinite(relevance).all(axis=(1, 2))
        for name in ("relevance_channels", "output"):
            if name in arrays:
                values = np.asarray(arrays[name], dtype=np.float64)
                finite &= np.isfinite(values.reshape(n, -1)).all(axis=1)
        status[(status == STATUS_OK) & ~finite] = STATUS_NONFINITE

        for name in arrays:
            if name not in self._group:
                raise StoreError(f"this store has no {name!r} array (create it with the matching option)")
        shards = range(start // self.rows_per_shard, -(-stop // self.rows_per_shard))
        _clear_shards(self._group["status"], shards)  # first: the rows read pending until status is back
        for name, values in {"relevance": relevance, **arrays}.items():
            array = self._group[name]
            values = np.asarray(values)
            if values.dtype.kind in "UO" or array.dtype.kind in "TUO":
                values = np.asarray(values, dtype=str)
            _clear_shards(array, shards)
            if not write_shards(array, start, values):
                array[start:stop] = values
        self._group["status"][start:stop] = status
        return status

    def _read_block(self, start: int, n: int) -> dict[str, np.ndarray]:
        """Every array's rows ``[start, start+n)``; an unreadable shard (torn by a kill) reads as fill values,
        pending."""
        try:
            return {name: np.array(self._group[name][start:start + n]) for name in self._group.array_keys()}
        except Exception:  # a torn object: nothing in it can be kept, and its rows are recomputed
            return {name: np.full((n, *self._group[name].shape[1:]), self._group[name].fill_value,
                                  dtype=object if self._group[name].dtype.kind in "TUO" else self._group[name].dtype)
                    for name in self._group.array_keys()}

    def write_rows(self, start: int, n: int, rows: np.ndarray, *, status: np.ndarray, **arrays: Any) -> np.ndarray:
        """Write the shard ``[start, start+n)`` where only ``rows`` (a boolean mask) take the new values; the other
        rows keep what the store has. This is how part of a shard is written (a bisected retry): still a whole-shard
        write, by the one writer of that shard. Returns the status of the shard as stored."""
        rows = np.asarray(rows, bool)
        current = self._read_block(start, n)
        if "relevance_sum" not in arrays:
            arrays["relevance_sum"] = np.asarray(arrays["relevance"], np.float64).sum(axis=(1, 2))
        if "output" in arrays and "residual" not in arrays:
            arrays["residual"] = (np.asarray(arrays["relevance_sum"], np.float64)
                                  - np.asarray(arrays["output"], np.float64))
        for name, values in {**arrays, "status": status}.items():
            if current[name].dtype.kind in "TUO":
                current[name] = current[name].astype(object)
            current[name][rows] = np.asarray(values, dtype=current[name].dtype)[rows]
        return self.write_block(start, **current)

    def write_failed(self, start: int, n: int, reason: str, rows: np.ndarray | None = None, **arrays: Any) -> None:
        """Record the rows ``[start, start+n)`` (whole shards) that are not ok as failed with ``reason``.

        Rows already ok (a ``--retry-failed`` run that gave up on their shard) keep everything they had, and so do
        rows outside ``rows`` (a boolean mask: the part of the shard that failed); ``arrays`` (e.g. ``path``,
        ``target``) fill in the metadata of the failed rows.
        """
        current = self._read_block(start, n)
        redo = current["status"] != STATUS_OK
        if rows is not None:
            redo &= np.asarray(rows, bool)
        for name, values in current.items():
            if values.dtype.kind in "TUO":
                values = current[name] = values.astype(object)
            values[redo] = self._group[name].fill_value
        for name, values in arrays.items():
            current[name][redo] = np.asarray(values, dtype=current[name].dtype)[redo]
        current["status"][redo] = STATUS_FAILED
        current["error"][redo] = reason
        self.write_block(start, **current)

    def __repr__(self) -> str:
        return f"ExplanationGroup({self.name!r}, rows={self.n_rows}, setting={self.setting})"
