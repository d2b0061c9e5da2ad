"""The explain actor: loads the model once, then turns whole store shards into relevance rows.

One actor per GPU (or per ``cpus_per_actor`` CPUs). A task is one shard of the store: the actor reads
and decodes the shard's images in a small thread pool (a bounded window ahead of the model, so decoding
overlaps compute and memory stays flat), explains them batch by batch with every configured setting,
and writes the shard to each group itself: the driver never touches pixels or relevance.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

import lrp

from .config import RunConfig
from .datasets import read_image, read_mask
from .models import best_device, build_model
from .preprocess import Preprocess
from .store import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, open_store


@dataclass
class ActorJob:
    """What every actor needs to know, resolved once by the driver's plan."""

    config: RunConfig
    target_mode: str  # label, prediction, classes or labels (never auto)
    num_classes: int
    max_boxes: int
    with_mask: bool
    with_labels: bool


def prefetch(jobs, window: int, threads: int):
    """Yield the results of callables in order, with at most ``window`` of them decoded ahead."""
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        queue = deque()
        for job in jobs:
            queue.append(pool.submit(job))
            if len(queue) >= window:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def claim_cpus(cpus_per_actor: int) -> tuple[torch.device, int]:
    """(device, decoding threads) of an actor that owns ``cpus_per_actor`` CPUs.

    Decoding runs in 2-4 threads beside the model: more do not help, as torchvision's per-image transforms hold the
    GIL (on a 16-core H100 node, reading + preprocessing 224 px JPEGs peaked at 4 threads: 670 images/s, 440 with 16).
    A CPU actor gives its CPUs to torch for the engine. A GPU actor sets torch to one thread per op, since torch's
    default (every core of the node, in every actor) oversubscribes the cores: +30% preprocessing throughput there.
    A GPU actor's process is GIL-bound near 220 images/s; ``actors_per_gpu`` runs several processes per GPU.
    """
    cpus = max(1, int(cpus_per_actor))
    device = best_device()
    torch.set_num_threads(1 if device.type == "cuda" else cpus)
    return device, min(4, max(2, cpus))


class ExplainActor:
    """A Ray actor class (wrapped with ``ray.remote`` by the driver); also usable in-process."""

    def __init__(self, job: ActorJob):
        self.job = job
        config = job.config
        self.device, self.decode_threads = claim_cpus(config.cpus_per_actor)
        self.model = build_model(config.model, self.device)  # once per actor (and again after a restart)
        self.explainers = {s.name: lrp.Explainer(self.model, s.composite, tf32=config.tf32, **s.params) for s in config.explanations}
        self.preprocess = Preprocess(config.preprocess)
        self.store = open_store(config.store, mode="r+", storage_options=config.storage_options)
        self.options = config.dataset.storage_options

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads()}

    # ---- decoding ---------------------------------------------------------------------------------------
    def _load(self, row: dict):
        """(input, boxes (K,4), box classes, mask) in model geometry, or the reason the image failed."""
        try:
            image = read_image(row["path"], self.options)
            mask = read_mask(row["mask_path"], self.options) if row["mask_path"] else None
            x, boxes, mask = self.preprocess(image, row["boxes"] or None, mask)
            return x, boxes, np.asarray(row["box_classes"], dtype=np.int64), mask
        except FileNotFoundError as error:
            return f"missing file: {error}"
        except Exception as error:  # corrupt or unreadable: recorded as failed, the run goes on
            return f"{type(error).__name__}: {error}"

    # ---- one shard --------------------------------------------------------------------------------------
    def explain_shard(self, start: int, rows: pa.Table, groups: list[str]) -> dict:
        began = time.perf_counter()
        job, size = self.job, self.preprocess.size
        n = rows.num_rows
        meta = rows.to_pydict()
        records = rows.to_pylist()
        out = {name: {"relevance": np.full((n, *size), np.nan, np.float32), "output": np.full(n, np.nan),
                      "relevance_sum": np.full(n, np.nan)} for name in groups}
        channels = {name: np.full((n, 3, *size), np.nan, np.float32) for name in groups} if job.config.per_channel else None
        target = np.asarray(meta["target"], np.int64).copy()
        prediction = np.full(n, -1, np.int64)
        status = np.full(n, STATUS_OK, np.int8)
        errors = [""] * n
        boxes = np.full((n, job.max_boxes, 4), np.nan, np.float32) if job.max_boxes else None
        masks = np.zeros((n, *size), bool) if job.with_mask else None

        # rows of one image are consecutive: decode each image once, a bounded window ahead of the model
        firsts = [i for i in range(n) if i == 0 or meta["sample_id"][i] != meta["sample_id"][i - 1]]
        spans = zip(firsts, firsts[1:] + [n])
        decoded = prefetch(((lambda i=i: self._load(records[i])) for i in firsts),
                           window=2 * job.config.batch_size, threads=self.decode_threads)
        pending: list[tuple[int, tuple]] = []  # (row, decoded sample)
        for (first, stop), sample in zip(spans, decoded):
            for i in range(first, stop):
                if isinstance(sample, str):
                    status[i], errors[i] = STATUS_FAILED, sample
                else:
                    pending.append((i, sample))
            while len(pending) >= job.config.batch_size or (stop == n and pending):
                batch, pending = pending[: job.config.batch_size], pending[job.config.batch_size:]
                self._explain(batch, target, prediction, out, channels, boxes, masks)

        report = {"start": start, "rows": n, "ok": 0, "failed": 0, "nonfinite": 0,
                  "failures": [(meta["path"][i], errors[i]) for i in range(n) if status[i] == STATUS_FAILED]}
        for name in groups:
            arrays = dict(
                output=out[name]["output"], relevance_sum=out[name]["relevance_sum"], target=target,
                label=meta["label"], prediction=prediction, sample_id=meta["sample_id"], path=meta["path"], error=errors,
            )
            if channels is not None:
                arrays["relevance_channels"] = channels[name]
            if boxes is not None:
                arrays["boxes"] = boxes
            if masks is not None:
                arrays["mask"] = masks
            if job.with_labels:
                arrays["labels"] = _multi_hot(meta["labels"], job.num_classes)
            final = self.store.group(name).write_block(start, relevance=out[name]["relevance"], status=status, **arrays)
            report["ok"] += int((final == STATUS_OK).sum())
            report["failed"] += int((final == STATUS_FAILED).sum())
            report["nonfinite"] += int((final == STATUS_NONFINITE).sum())
        report["seconds"] = time.perf_counter() - began
        return report

    def _explain(self, batch, target, prediction, out, channels, boxes, masks):
        index = [i for i, _ in batch]
        samples = [sample for _, sample in batch]
        x = torch.stack([s[0] for s in samples]).to(self.device, non_blocking=True)
        rows = np.asarray(index)
        if self.job.target_mode == "prediction":
            with torch.no_grad():
                target[rows] = self.model(x).argmax(1).cpu().numpy()
        batch_target = torch.as_tensor(target[rows], device=self.device)
        for position, name in enumerate(out):
            result = self.explainers[name](x, batch_target)
            relevance = result.relevance
            out[name]["relevance"][rows] = relevance.sum(1).float().cpu().numpy()
            out[name]["relevance_sum"][rows] = relevance.double().flatten(1).sum(1).cpu().numpy()
            out[name]["output"][rows] = result.output.double().cpu().numpy()
            if channels is not None:
                channels[name][rows] = relevance.float().cpu().numpy()
            if position == 0:
                prediction[rows] = result.logits.argmax(1).cpu().numpy()
        for i, sample in zip(index, samples):
            if boxes is not None:
                selected = _boxes_for_target(sample[1], sample[2], int(target[i]))
                boxes[i, : len(selected)] = selected
            if masks is not None and sample[3] is not None:
                masks[i] = sample[3].cpu().numpy()


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
