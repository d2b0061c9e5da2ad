"""The explain actor: loads the model once, then turns whole store shards into relevance rows.

One actor per GPU (or per ``cpus_per_actor`` CPUs). A task is one shard of the store (or, while a shard that
kills its actor is bisected, a part of one): the actor decodes the shard's images a bounded window ahead of the
model (:class:`pipeline.batches.ShardReader`), explains them batch by batch with every configured setting
(:func:`explain_batch`, a pure function of the explainers and the batch), and writes the shard to each group itself
(:class:`ShardBuffers`): the driver never touches pixels or relevance.

The stages overlap: a thread stages the next batches (:class:`pipeline.prefetch.Ahead`: decode, preprocessing,
pinned host-to-device copy, or batched nvJPEG decoding with ``decode: auto``, :mod:`pipeline.gpu_decode`) while the
model explains this one, and on a GPU the actor runs two shard tasks at once (``concurrency``) so one task's shard is
written by the actor's writer thread (:class:`pipeline.writer.ShardWriter`) while the other explains under the engine
lock.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

import lrp

from .batches import Batch, Sample, ShardReader, load_sample
from .config import RunConfig
from .datasets import _read_bytes, read_image, read_mask
from .decode_workers import DecodeWorkers, WorkerReader
from .gpu_decode import DecodedBatch, Encoded, decode_encoded_batch, decode_on_device
from .models import best_device, build_model
from .prefetch import Ahead
from .preprocess import Preprocess
from .secrets import redact
from .store import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, RelevanceStore, open_store
from .writer import ShardWriter

PREFETCH_BATCHES = 2  # staged batches waiting for the model: enough to hide a slow batch, bounded memory


@dataclass
class ActorJob:
    """What every actor needs to know, resolved once by the driver's plan."""

    config: RunConfig
    target_mode: str  # label, prediction, classes or labels (never auto)
    num_classes: int
    max_boxes: int
    with_mask: bool
    with_labels: bool


def claim_cpus(cpus_per_actor: int, decode_workers: int = 0) -> tuple[torch.device, int]:
    """(device, decoding threads) of an actor that owns ``cpus_per_actor`` CPUs, ``decode_workers`` of them for its
    decoding processes (:mod:`pipeline.decode_workers`).

    Decoding runs in 2-4 threads beside the model: more do not help, as torchvision's per-image transforms hold the
    GIL (on a 16-core H100 node, reading + preprocessing 224 px JPEGs peaked at 4 threads: 670 images/s, 440 with 16).
    A CPU actor gives its CPUs to torch for the engine. A GPU actor sets torch to one thread per op, since torch's
    default (every core of the node, in every actor) oversubscribes the cores: +30% preprocessing throughput there.
    A GPU actor's process is GIL-bound near 220 images/s; ``actors_per_gpu`` runs several processes per GPU.
    """
    cpus = max(1, int(cpus_per_actor) - int(decode_workers))
    device = best_device()
    torch.set_num_threads(1 if device.type == "cuda" else cpus)
    return device, min(4, max(2, cpus))


class Staged(NamedTuple):
    """A batch ready for the model: its rows' inputs on the device (None when no row decoded)."""

    batch: Batch
    x: torch.Tensor | None
    failures: dict[int, str]
    fallbacks: list[tuple[str, str]]


class ExplainActor:
    """A Ray actor class (wrapped with ``ray.remote`` by the driver); also usable in-process.

    ``overlap``: stage batches ahead in a thread and write through the writer thread; False is the sequential loop
    (decode, explain, write one after another). None (the default) chooses what was faster where it was measured
    (benchmarks/RESULTS.md, "Overlapped actor stages on the CPU" and "Stop 22 on a lent NVIDIA H200"): overlapped on
    a GPU that decodes on the CPU, where the CPU stages bound the actor (35-36% of the engine against 31-34%);
    sequential with nvJPEG (``decode: auto``), where the staging thread's per-image device kernels contend with the
    explanation's for the GIL and the stream (37-45% against 30-34%); sequential on a CPU, where every stage competes
    for the cores the pool already fills with one single-threaded actor per core. :meth:`concurrency` stays two on
    a GPU either way; with the sequential loop the second task waits for the engine lock, which it holds whole.
    """

    overlap: bool | None = None

    @staticmethod
    def overlaps(device: torch.device, gpu_decode: bool) -> bool:
        """The default of :attr:`overlap`: the stages overlap only on a GPU that decodes on the CPU (see the class)."""
        return device.type == "cuda" and not gpu_decode

    @staticmethod
    def concurrency(gpu: bool) -> int:
        """Shard tasks Ray runs at once in one actor (threads): on a GPU two, one explaining under the engine lock
        while the other's shard is written; on a CPU one, as the stages are not overlapped there (see the class).

        With two, the pool cannot tell which task ended the process when a row kills it: it blames neither and runs
        both alone from then on (:attr:`pipeline.dispatch.ShardPool.alone`), so only the culprit row fails
        (``tests/test_dispatch.py``)."""
        return 2 if gpu else 1

    def __init__(self, job: ActorJob):
        self.job = job
        config = job.config
        self.device, self.decode_threads = claim_cpus(config.cpus_per_actor, config.decode_workers)
        self.gpu_decode = decode_on_device(config.decode, self.device)
        self.workers = None
        if config.decode_workers and not self.gpu_decode:
            self.workers = DecodeWorkers(config.decode_workers, config.preprocess, config.dataset.storage_options)
            self.workers.start()  # they start while the model is built
        self.model = build_model(config.model, self.device)  # once per actor (and again after a restart)
        self.explainers = {s.name: lrp.Explainer(self.model, s.composite, tf32=config.tf32, autocast=config.autocast,
                                                 **s.params) for s in config.explanations}
        self.preprocess = Preprocess(config.preprocess)
        self.store = open_store(config.store, mode="r+", storage_options=config.storage_options)
        self.options = config.dataset.storage_options
        if self.overlap is None:
            self.overlap = self.overlaps(self.device, self.gpu_decode)
        self.engine = threading.Lock()  # one batch on the model at a time, whichever task it belongs to
        self.writer = ShardWriter()

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads()}

    # ---- decoding ---------------------------------------------------------------------------------------
    def _load(self, row: dict) -> Sample | str:
        """The row's image in model geometry (boxes, box classes, mask with it), or the reason it failed."""
        return load_sample(row, self.preprocess, self.options)

    def _read(self, row: dict) -> Encoded | str:
        """With GPU decoding: the row's file bytes (and mask), decoded later with its whole batch."""
        try:
            data = _read_bytes(row["path"], self.options)
            mask = read_mask(row["mask_path"], self.options) if row["mask_path"] else None
            return Encoded(data, row["path"], row["boxes"] or None, np.asarray(row["box_classes"], np.int64), mask)
        except FileNotFoundError as error:
            return f"missing file: {error}"
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    def _stage(self, batch: Batch) -> Staged:
        """The batch on the model's device: GPU-decoded when on, else stacked (pinned, copied asynchronously)."""
        decoded = DecodedBatch(batch, {}, [])
        if self.gpu_decode:
            decoded = decode_encoded_batch(batch, self.preprocess, self.device, lambda p: read_image(p, self.options))
        x = decoded.batch.inputs(self.device, self.preprocess.normalize) if len(decoded.batch.rows) else None
        return Staged(decoded.batch, x, decoded.failures, decoded.fallbacks)

    # ---- one shard --------------------------------------------------------------------------------------
    def explain_shard(self, start: int, rows: pa.Table, groups: list[str], part: tuple[int, int] | None = None) -> dict:
        """Explain and write one shard (rows ``start ...``) to every group in ``groups``; returns counts once the
        shard is in the store (a write error raises here).

        ``part`` ``(lo, hi)``: only the shard's rows ``[lo, hi)`` are explained (a retry bisecting a shard that
        killed its actor); the other rows keep what the store has."""
        began = time.perf_counter()
        config = self.job.config
        records = rows.to_pylist()
        if self.workers is not None:
            reader = WorkerReader(records, self.workers, config.batch_size, self._load, self.decode_threads, part)
        else:
            reader = ShardReader(records, self._read if self.gpu_decode else self._load, config.batch_size,
                                 self.decode_threads, part)
        buffers = ShardBuffers(start, rows.to_pydict(), groups, self.preprocess.size, self.job)
        explainers = {name: self.explainers[name] for name in groups}
        staged = (self._stage(batch) for batch in reader)
        if self.overlap:
            with Ahead(staged, PREFETCH_BATCHES) as ahead, self.engine:  # staging starts before the lock is ours
                fallbacks = self._explain(ahead, buffers, explainers)
            buffers.fail(reader.failures)  # complete: the staging thread has ended
            report = self.writer.write(buffers.write, self.store, groups, part)
        else:
            with self.engine:  # the whole task: one shard at a time, as before the stages overlapped
                fallbacks = self._explain(staged, buffers, explainers)
                buffers.fail(reader.failures)
                report = buffers.write(self.store, groups, part)
        report["notes"] = [redact(note) for note in [f"{path}: decoded on the CPU, {why}" for path, why in fallbacks]
                           + reader.notes]
        report["seconds"] = time.perf_counter() - began
        return report

    def _explain(self, batches, buffers: ShardBuffers, explainers: dict) -> list[tuple[str, str]]:
        """Explain every staged batch into ``buffers``; returns the images the CPU decoded instead of the GPU."""
        job, fallbacks = self.job, []
        for staged in batches:
            buffers.fail(staged.failures)
            fallbacks += staged.fallbacks
            if staged.x is None:
                continue
            explained = explain_batch(explainers, staged.x, buffers.target[staged.batch.rows],
                                      job.target_mode == "prediction", job.config.per_channel)
            buffers.add(staged.batch, explained)
        return fallbacks


class Explained(NamedTuple):
    """What explaining one batch gives, per group name: numpy arrays with the batch's rows first."""

    target: np.ndarray
    prediction: np.ndarray
    relevance: dict[str, np.ndarray]  # (B, H, W) float32, channel-summed
    relevance_sum: dict[str, np.ndarray]  # (B,) float64, summed over channels in float64
    output: dict[str, np.ndarray]  # (B,) float64 explained logit
    channels: dict[str, np.ndarray] | None  # (B, C, H, W) float32 with per_channel


def explain_batch(explainers: dict[str, lrp.Explainer], x: torch.Tensor, target: np.ndarray, predict: bool,
                  per_channel: bool) -> Explained:
    """Explain a batch with every explainer; ``predict``: the targets are the model's predictions, those of the
    first explainer's forward pass (no forward pass of their own).

    Nothing is read back to the host until every explainer has been queued: on a GPU the device then runs the
    settings back to back, and the targets (host arrays, checked and copied by the explainer without waiting) add no
    synchronisation either."""
    batch_target = None if predict else torch.as_tensor(np.asarray(target, np.int64))
    on_device, prediction = {}, None
    for name, explainer in explainers.items():
        result = explainer(x, batch_target)
        if prediction is None:  # the first explainer's forward pass
            prediction = result.logits.argmax(1)
            if predict:
                batch_target = prediction  # what the explainer explained for target None
        maps = result.relevance
        on_device[name] = (maps.sum(1).float(), maps.double().flatten(1).sum(1), result.output.double(),
                           maps.float() if per_channel else None)
    relevance, sums, outputs, channels = ({name: None if t is None else t.cpu().numpy() for name, t in
                                           zip(on_device, column)} for column in zip(*on_device.values()))
    prediction = prediction.cpu().numpy()
    return Explained(prediction if predict else np.asarray(target, np.int64), prediction, relevance, sums, outputs,
                     channels if per_channel else None)


class ShardBuffers:
    """The arrays one shard is written from, filled batch by batch, then written to every group at once."""

    def __init__(self, start: int, meta: dict, groups: list[str], size: tuple[int, int], job: ActorJob):
        n = len(meta["path"])
        self.start, self.meta, self.job, self.n = start, meta, job, n
        self.relevance = {name: np.full((n, *size), np.nan, np.float32) for name in groups}
        self.output = {name: np.full(n, np.nan) for name in groups}
        self.relevance_sum = {name: np.full(n, np.nan) for name in groups}
        self.channels = {name: np.full((n, 3, *size), np.nan, np.float32) for name in groups} \
            if job.config.per_channel else None
        self.target = np.asarray(meta["target"], np.int64).copy()
        self.prediction = np.full(n, -1, np.int64)
        self.status = np.full(n, STATUS_OK, np.int8)
        self.errors = [""] * n
        self.boxes = np.full((n, job.max_boxes, 4), np.nan, np.float32) if job.max_boxes else None
        self.masks = np.zeros((n, *size), bool) if job.with_mask else None

    def add(self, batch: Batch, explained: Explained) -> None:
        rows = batch.rows
        self.target[rows], self.prediction[rows] = explained.target, explained.prediction
        for name in self.relevance:
            self.relevance[name][rows] = explained.relevance[name]
            self.relevance_sum[name][rows] = explained.relevance_sum[name]
            self.output[name][rows] = explained.output[name]
            if self.channels is not None:
                self.channels[name][rows] = explained.channels[name]
        for i, sample in zip(rows, batch.samples):
            if self.boxes is not None:
                selected = _boxes_for_target(sample.boxes, sample.box_classes, int(self.target[i]))
                self.boxes[i, : len(selected)] = selected
            if self.masks is not None and sample.mask is not None:
                self.masks[i] = sample.mask.cpu().numpy()

    def fail(self, failures: dict[int, str]) -> None:
        for i, reason in failures.items():
            self.status[i], self.errors[i] = STATUS_FAILED, reason

    def arrays(self, name: str) -> dict:
        """Everything ``write_block`` takes for group ``name`` (status aside)."""
        meta = self.meta
        arrays = dict(relevance=self.relevance[name], output=self.output[name],  # noqa: C408
                      relevance_sum=self.relevance_sum[name],
                      target=self.target, label=meta["label"], prediction=self.prediction,
                      sample_id=meta["sample_id"], path=[redact(path) for path in meta["path"]],
                      error=[redact(error) for error in self.errors])
        if self.channels is not None:
            arrays["relevance_channels"] = self.channels[name]
        if self.boxes is not None:
            arrays["boxes"] = self.boxes
        if self.masks is not None:
            arrays["mask"] = self.masks
        if self.job.with_labels:
            arrays["labels"] = _multi_hot(meta["labels"], self.job.num_classes)
        return arrays

    def write(self, store: RelevanceStore, groups: list[str], part: tuple[int, int] | None = None) -> dict:
        """Write the shard to every group (status last in each); the report counts the rows as stored.

        With ``part`` only rows ``[lo, hi)`` are new: the others keep the store's values (still one shard write)."""
        mine = np.zeros(self.n, bool)
        mine[slice(*part) if part is not None else slice(None)] = True
        report = {"start": self.start, "rows": int(mine.sum()), "ok": 0, "failed": 0, "nonfinite": 0,
                  "failures": [(redact(self.meta["path"][i]), redact(self.errors[i])) for i in np.flatnonzero(mine)
                               if self.status[i] == STATUS_FAILED]}
        for name in groups:
            group = store.group(name)
            if part is None:
                final = group.write_block(self.start, status=self.status, **self.arrays(name))
            else:
                final = group.write_rows(self.start, self.n, mine, status=self.status, **self.arrays(name))[mine]
            report["ok"] += int((final == STATUS_OK).sum())
            report["failed"] += int((final == STATUS_FAILED).sum())
            report["nonfinite"] += int((final == STATUS_NONFINITE).sum())
        return report


def _boxes_for_target(boxes: np.ndarray, classes: np.ndarray, target: int) -> np.ndarray:
    """The boxes of the explained class when the dataset says which class each box is; else all boxes."""
    if len(classes) and (classes >= 0).all():
        return boxes[classes == target]
    return boxes


def _multi_hot(labels: list[list[int]], num_classes: int) -> np.ndarray:
    hot = np.zeros((len(labels), num_classes), bool)
    for i, row in enumerate(labels):
        hot[i, [c for c in row if 0 <= c < num_classes]] = True
    return hot
