"""Orchestration of an explain run: plan (validate everything), then store shards to a pool of Ray actors.

The dispatch loop (actor pool, bounded in-flight tasks, retry of a dead actor's shard, progress) is
:class:`pipeline.dispatch.ShardPool`, shared with the evaluation; this module says what a shard is for explain
(:class:`ExplainTask`): a block of store rows, written by the actor, or recorded as failed by the driver.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .actors import ActorJob, ExplainActor
from .config import ConfigError, RunConfig
from .datasets import DatasetError, DatasetIndex, load_index
from .dispatch import Part, PoolAborted, ShardPool
from .lease import LeaseHeld, StoreLease
from .paths import normalise_url, os_reason, path_problem
from .secrets import redact
from .models import ModelError, build_model, count_classes, model_class_names, weights_digest
from .store import (STATUS_FAILED, STATUS_NAMES, STATUS_NONFINITE, STATUS_OK, STATUS_PENDING,
                    RelevanceStore, StoreError, open_store)

#: errors of a storage that cannot take more writes: the run stops instead of failing shard after shard
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


@dataclass
class RunPlan:
    """Everything resolved before any work: the rows to explain and the store they go to."""

    config: RunConfig
    index: DatasetIndex
    rows: pa.Table  # row, sample_id, path, target, label, labels, boxes, box_classes, mask_path
    class_names: list[str]
    target_mode: str
    height: int
    width: int
    store_config: dict

    @property
    def job(self) -> ActorJob:
        return ActorJob(self.config, self.target_mode, len(self.class_names), self.index.max_boxes,
                        self.index.has_masks, self.target_mode == "labels" or self.index.multi_label)


def software_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("lrp-audit", "torch", "torchvision", "zarr", "ray", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def plan_run(config: RunConfig) -> RunPlan:
    """Validate the config against the model and the dataset, and lay out the rows; raises ConfigError."""
    import lrp

    problem = path_problem(config.store, "store")  # a file where the store goes, or a parent that is a file
    if problem:
        raise ConfigError(problem)
    for setting in config.explanations:
        try:
            lrp.make_composite(setting.composite, **setting.params)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"explanation {setting.name!r}: {error}") from error
    step = "reading model.weights"
    try:
        digest = weights_digest(config.model)
        step = "reading model.class_names"
        names = model_class_names(config.model)
        step = f"indexing the dataset {redact(str(config.dataset.source))!r}"
        index = load_index(config.dataset.source, config.dataset.kind, names, config.dataset.split,
                           config.dataset.storage_options)
        step = "building the model"
        model = build_model(config.model, "cpu", download=False)
        height, width = config.preprocess.output_size()
        num_classes = count_classes(model, 3, (height, width))
    except (ModelError, DatasetError) as error:
        raise ConfigError(str(error)) from error
    except (OSError, pa.ArrowException, json.JSONDecodeError, ElementTree.ParseError, UnicodeError) as error:
        # a file the readers above do not name themselves (their own errors are DatasetError / ModelError)
        raise ConfigError(f"{step} failed: {type(error).__name__}: {error}") from error
    except RuntimeError as error:  # a forward pass that does not fit the input size or channels
        raise ConfigError(f"the model cannot run on a {3}x{height}x{width} input: {error}") from error
    _dry_run(model, config, height, width)

    if names and index.class_names is not None and list(index.class_names) != list(names):
        # the dataset's labels index its own class list: read against the model's names they would be wrong
        missing = [name for name in index.class_names if name not in names]
        raise ConfigError(
            f"the {index.kind} dataset's classes do not match the model's class names"
            + (f" ({', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''} are not among them)"
               if missing else " (same names, another order)")
            + ": rename the class folders to the model's class names, give model.class_names in the dataset's "
              "order, or use a manifest whose labels are the model's class indices or names")
    class_names = names or index.class_names or [str(i) for i in range(num_classes)]
    source = "model.class_names" if isinstance(config.model.class_names, (str, list)) else (
        "the weights' meta" if names else "the dataset")
    if len(class_names) != num_classes:
        raise ConfigError(
            f"class count mismatch: the model has {num_classes} outputs but {source} lists {len(class_names)} "
            f"classes; set model.kwargs.num_classes to {len(class_names)} or give matching model.class_names"
        )
    mode = config.targets if config.targets != "auto" else ("labels" if index.multi_label else "label")
    rows = _rows(index, mode, config.classes, class_names)
    store_config = config.identity() | {
        "weights_digest": digest,
        "dataset_fingerprint": index.fingerprint(),
        "dataset_kind": index.kind,
        "target_mode": mode,
        "class_names": class_names,
    }
    return RunPlan(config, index, rows, class_names, mode, height, width, store_config)


DRY_RUN_BATCH = 2  # rows of the zero batch every explainer runs once on the driver before any actor starts


def _dry_run(model, config: RunConfig, height: int, width: int) -> None:
    """Build every explainer and run it once on a small zero batch, so that a setting that fails only on the first
    batch (a box of the wrong length, a shape the engine cannot fold) is a configuration error before any work."""
    import lrp
    import torch

    x = torch.zeros(DRY_RUN_BATCH, 3, height, width)
    target = torch.zeros(DRY_RUN_BATCH, dtype=torch.long)
    for setting in config.explanations:
        try:
            explainer = lrp.Explainer(model, setting.composite, **setting.params)
        except (ValueError, TypeError, NotImplementedError, lrp.UnsupportedLayerError) as error:
            raise ConfigError(f"explanation {setting.name!r} cannot explain this model: {error}") from error
        try:
            explainer(x, target)
        except Exception as error:  # any failure here would fail every batch of the run
            raise ConfigError(
                f"explanation {setting.name!r} fails on a {DRY_RUN_BATCH}x3x{height}x{width} zero batch (the dry run "
                f"before any actor starts): {type(error).__name__}: {error}") from error


def _rows(index: DatasetIndex, mode: str, classes: list, class_names: list[str]) -> pa.Table:
    """One row per (image, target), image-major, so the row count is known before the run."""
    samples = index.samples
    n_classes = len(class_names)

    def first_bad(mask, what):
        bad = pc.filter(samples["path"], mask)
        if len(bad):
            raise ConfigError(f"{len(bad)} image(s) {what}, e.g. {bad[0].as_py()!r}")

    if mode == "label":
        labels = samples["label"]
        first_bad(pc.less(labels, 0), "have no single label: use targets: prediction, or labels for multi-label data")
        first_bad(pc.greater_equal(labels, n_classes), f"have a label outside the model's {n_classes} classes")
        take, targets = np.arange(len(samples)), labels.to_numpy()
    elif mode == "prediction":
        take, targets = np.arange(len(samples)), np.full(len(samples), -1)
    elif mode == "labels":
        lists = samples["labels"].to_pylist()
        first_bad(pa.array([not labels for labels in lists]), "have no labels: use targets: label or prediction")
        for path, labels in zip(samples["path"].to_pylist(), lists):
            if any(not 0 <= label < n_classes for label in labels):
                raise ConfigError(f"image {path!r} has labels {labels}, not all among the model's {n_classes} classes "
                                  f"0..{n_classes - 1}")
        take = np.repeat(np.arange(len(samples)), [len(labels) for labels in lists])
        targets = np.asarray([label for labels in lists for label in labels], np.int64)
    elif mode == "classes":
        indices = []
        for value in classes:
            if isinstance(value, str):
                if value not in class_names:
                    raise ConfigError(f"classes: {value!r} is not a class name (e.g. {class_names[:5]})")
                value = class_names.index(value)
            if not 0 <= value < n_classes:
                raise ConfigError(f"classes: target {value} is outside the model's classes 0..{n_classes - 1}")
            if value in indices:
                raise ConfigError(f"classes: class {value} ({class_names[value]!r}) is listed twice: every image would "
                                  "be explained twice for it")
            indices.append(value)
        take = np.repeat(np.arange(len(samples)), len(indices))
        targets = np.tile(np.asarray(indices, np.int64), len(samples))
    else:
        raise ConfigError(f"unknown target mode {mode!r}")
    rows = samples.take(pa.array(take, pa.int64()))
    return rows.append_column("target", pa.array(np.asarray(targets, np.int64))) \
               .add_column(0, "row", pa.array(np.arange(len(take), dtype=np.int64)))


#: config paths that a resume may spell otherwise (relative or absolute, a trailing ``/``, through a symlink): what
#: they hold is compared by the dataset fingerprint and the weights digest, which are in the config too
RESPELLABLE = (("dataset", "source"), ("model", "weights"))


def as_recorded(config: dict, recorded: dict) -> dict:
    """``config`` with ``recorded``'s spelling of each path that names the same location as its own, so that a
    resume with ``data/`` for ``/home/me/data`` finds the same configuration."""
    respelled = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for section, key in RESPELLABLE:
        old = recorded.get(section, {}).get(key) if isinstance(recorded.get(section), dict) else None
        new = respelled.get(section, {}).get(key) if isinstance(respelled.get(section), dict) else None
        if isinstance(old, str) and isinstance(new, str) and old != new \
                and normalise_url(old) == normalise_url(new):
            respelled[section][key] = old
    return respelled


def _store_spelling(store_config: dict, url: str, storage_options: dict) -> dict:
    """``store_config`` as :func:`as_recorded` in the store already at ``url``, if there is one."""
    try:
        recorded = open_store(url, storage_options=storage_options).config
    except (StoreError, OSError):  # no store yet, or not a readable one: create() says what is wrong
        return store_config
    return as_recorded(store_config, recorded if isinstance(recorded, dict) else {})


def create_store(plan: RunPlan) -> RelevanceStore:
    """Create the store, or reopen it when the config is the same (a resume)."""
    config = plan.config
    store_config = _store_spelling(plan.store_config, config.store, config.storage_options)
    try:
        return RelevanceStore.create(
            config.store, config=store_config, class_names=plan.class_names,
            groups={s.name: s.to_dict() for s in config.explanations}, n_rows=plan.rows.num_rows,
            height=plan.height, width=plan.width, rows_per_shard=config.rows_per_shard,
            max_boxes=plan.index.max_boxes, with_mask=plan.index.has_masks,
            num_labels=len(plan.class_names) if plan.job.with_labels else None,
            channels=3 if config.per_channel else None, software=software_versions(),
            storage_options=config.storage_options,
        )
    except StoreError as error:
        raise ConfigError(str(error)) from error
    except OSError as error:
        raise ConfigError(f"cannot write the store {config.store!r}: {os_reason(error)}") from error



# ---- the run --------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    store: str
    rows: int
    groups: dict[str, dict[str, int]]
    residual: dict[str, dict[str, float]]
    failures: list[tuple[str, str]]
    computed_rows: int = 0
    seconds: float = 0.0
    retries: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(counts["ok"] == self.rows for counts in self.groups.values())

    @property
    def exit_code(self) -> int:
        return 0 if self.complete else 1

    def format(self) -> str:
        rate = self.computed_rows / self.seconds if self.seconds > 0 else 0.0
        lines = [f"store {self.store}: {self.rows} rows per group, computed {self.computed_rows} rows this run "
                 f"in {self.seconds:.1f}s ({rate:.1f} images/s), {self.retries} shard retries"]
        for name, counts in self.groups.items():
            res = self.residual.get(name, {})
            lines.append(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                         + (f"; residual sum R - f(x): mean {res['mean']:.3g}, mean |.| {res['mean_abs']:.3g}, "
                            f"max |.| {res['max_abs']:.3g}, median |.|/|f(x)| {res['median_rel']:.3g}" if res else ""))
        if self.failures:
            lines.append(f"failed images ({len(self.failures)}):")
            lines += [f"  {path}: {reason}" for path, reason in self.failures[:20]]
            if len(self.failures) > 20:
                lines.append(f"  ... and {len(self.failures) - 20} more (status == 2 in the store)")
        lines += self.messages
        return "\n".join(lines)


def summarize(store: RelevanceStore) -> RunSummary:
    """Counts, conservation residuals and failures, read back from the store (so a resumed run is whole)."""
    groups, residual, failures = {}, {}, {}
    for group in store.groups():
        rows = group.rows()
        status = rows["status"].to_numpy()
        groups[group.name] = {STATUS_NAMES[code]: int((status == code).sum())
                              for code in (STATUS_OK, STATUS_FAILED, STATUS_NONFINITE, STATUS_PENDING)}
        ok = status == STATUS_OK
        if ok.any():
            r = rows["residual"].to_numpy()[ok]
            f = rows["output"].to_numpy()[ok]
            residual[group.name] = {"mean": float(r.mean()), "mean_abs": float(np.abs(r).mean()),
                                    "max_abs": float(np.abs(r).max()),
                                    "median_rel": float(np.median(np.abs(r) / np.maximum(np.abs(f), 1e-12)))}
        failed = np.flatnonzero(status == STATUS_FAILED)
        paths, errors = rows["path"].to_pylist(), rows["error"].to_pylist()
        for i in failed:
            failures.setdefault(paths[i], errors[i])
    return RunSummary(store.url, store.n_rows, groups, residual, sorted(failures.items()))


class ExplainTask:
    """Explain's shards for the :class:`~pipeline.dispatch.ShardPool`: store row blocks, each written by one actor
    to the groups that still miss rows there; a shard the actors cannot finish is recorded failed by the driver."""

    bisect = True  # a part of a shard is written as the whole shard with the other rows kept (write_rows)

    def __init__(self, plan: RunPlan, store: RelevanceStore, todo: dict[int, list[str]]):
        self.plan, self.store, self.todo = plan, store, todo

    def _rows(self, shard: int) -> tuple[int, pa.Table]:
        start, stop = self.store.shard_rows(shard)
        return start, self.plan.rows.slice(start, stop - start)

    def submit(self, actor, part: Part):
        start, rows = self._rows(part.shard)
        return actor.explain_shard.remote(start, rows, self.todo[part.shard], None if part.whole else part[1:3])

    def size(self, shard: int) -> int:
        start, stop = self.store.shard_rows(shard)
        return int(stop - start)

    @staticmethod
    def fatal(error: BaseException) -> str | None:
        """A full or read-only store ends the run at once: every other shard would fail the same way."""
        while error is not None:
            if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
                return f"the store cannot be written ({os.strerror(error.errno)}): {redact(str(error))}"
            error = error.__cause__ or error.__context__
        return None

    def fail(self, part: Part, reason: str) -> None:
        """The part's rows that are not ok become failed with the reason (rows already ok keep their values)."""
        start, rows = self._rows(part.shard)
        mine = np.zeros(rows.num_rows, bool)
        mine[part.lo:part.hi] = True
        for name in self.todo[part.shard]:
            self.store.group(name).write_failed(
                start, rows.num_rows, redact(reason), mine, path=[redact(path) for path in rows["path"].to_pylist()],
                sample_id=rows["sample_id"].to_numpy(),
                target=rows["target"].to_numpy(), label=rows["label"].to_numpy())


def run(config: RunConfig, use_gpu: bool | None = None) -> RunSummary:
    """Explain every missing row of the store; resumable, idempotent, and never holds images in the driver."""
    plan = plan_run(config)  # every config error surfaces here, before any work
    lease = StoreLease(config.store, config.storage_options)
    try:
        lease.acquire()  # one driver per store: a second one is refused, naming the first
    except LeaseHeld as error:
        raise ConfigError(str(error)) from None
    except OSError as error:  # a parent that is a file, no permission, a read-only filesystem
        raise ConfigError(f"cannot write the store {config.store!r}: {os_reason(error)}") from error
    try:
        store = create_store(plan)
        lease.renew()  # a store laid out anew cleared its folder, the lease with it
        summary = _explain_pending(plan, store, use_gpu)
    finally:
        lease.release()
    if plan.index.skipped:  # an ImageFolder's non-image files: said again where the run's outcome is read
        summary.messages.append(f"warning: skipped {len(plan.index.skipped)} file(s) of the dataset that are not "
                                f"images by their extension, e.g. {plan.index.skipped[0]!r}")
    if lease.lost is not None:
        summary.messages.append(f"warning: another driver took the store's lease over during this run: "
                                f"{lease.lost.describe()}")
    return summary


def _explain_pending(plan: RunPlan, store: RelevanceStore, use_gpu: bool | None) -> RunSummary:
    config = plan.config
    todo: dict[int, list[str]] = {}
    for group in store.groups():
        for shard in group.pending_shards(retry_failed=config.retry_failed):
            todo.setdefault(shard, []).append(group.name)
    if not todo:
        summary = summarize(store)
        tried = sum(counts["failed"] + counts["nonfinite"] for counts in summary.groups.values())
        if tried:
            summary.messages.append(f"nothing to do: every row has been tried; {tried} failed or nonfinite rows are "
                                    "kept as they are: rerun with --retry-failed to try them again")
        else:
            summary.messages.append("nothing to do: every row of the store is already computed")
        return summary

    try:
        result = ShardPool("explain", ExplainActor, plan.job, config, use_gpu).run(todo, ExplainTask(plan, store, todo))
    except PoolAborted as error:
        summary = summarize(store)
        summary.messages.append(f"error: {error}. The run stopped; the rows not written are pending, none is marked "
                                "ok that is not stored: free space or make the store writable, then run the same "
                                "command again")
        return summary
    summary = summarize(store)
    summary.computed_rows, summary.seconds, summary.retries = result.computed_rows, result.seconds, result.retries
    if result.notes:  # images the GPU decoder refused, decoded on the CPU instead (decode: auto)
        summary.messages += [f"notes ({len(result.notes)}):"] + [f"  {note}" for note in result.notes[:20]]
    return summary
