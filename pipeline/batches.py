"""From the rows of one shard to decoded batches: the loop both actor kinds (explain, evaluate) share.

Rows of one image are consecutive (``targets: labels`` gives an image several rows), so each image is decoded
once, in a small thread pool a bounded window ahead of the model (:func:`prefetch`), and its sample goes into
the batch once per row. A row whose image cannot be read becomes a failure with its reason, never a batch row.

:class:`ShardReader` is a plain generator of :class:`Batch` objects, pulled by the model loop; a deeper bounded
prefetch (staging the next *batch* in a thread while this one is explained, :class:`pipeline.prefetch.Ahead`)
wraps the iterator without touching either side.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from .datasets import read_image, read_mask
from .preprocess import Preprocess


class Sample(NamedTuple):
    """One decoded image in model geometry."""

    x: torch.Tensor  # (C, H, W) model input
    boxes: np.ndarray | None = None  # (K, 4) boxes in relevance-map pixels
    box_classes: np.ndarray | None = None  # (K,) class of each box, -1 when unknown
    mask: torch.Tensor | None = None  # (H, W) bool region mask


def load_sample(row: dict, preprocess: Preprocess, storage_options=None, normalize: bool = True) -> Sample | str:
    """The row's image in model geometry (boxes, box classes, mask with it), or the reason it failed.

    ``normalize=False`` leaves the image as uint8 pixels (a decode worker's batch is normalised on the device)."""
    try:
        image = read_image(row["path"], storage_options)
        mask = read_mask(row["mask_path"], storage_options) if row["mask_path"] else None
        x, boxes, mask = preprocess(image, row["boxes"] or None, mask, normalize=normalize)
        return Sample(x, boxes, np.asarray(row["box_classes"], dtype=np.int64), mask)
    except FileNotFoundError as error:
        return f"missing file: {error}"
    except Exception as error:  # corrupt or unreadable: recorded as failed, the run goes on
        return f"{type(error).__name__}: {error}"


class Batch(NamedTuple):
    """Up to ``batch_size`` rows of a shard (offsets in the shard) and their decoded samples.

    ``pixels``: the rows' images as one (B, C, H, W) uint8 tensor in model geometry, stacked by a decode worker
    (:mod:`pipeline.decode_workers`); the samples then carry boxes and masks only, and :meth:`inputs` normalises."""

    rows: np.ndarray
    samples: list[Sample]
    pixels: torch.Tensor | None = None

    def inputs(self, device: torch.device | str, normalize: Callable | None = None) -> torch.Tensor:
        """The batch's inputs on ``device``. A host batch bound for CUDA is stacked straight into pinned memory (torch's
        caching host allocator: no second copy as with ``pin_memory()``), so the copy to the device is asynchronous.
        A batch of ``pixels`` is copied as uint8 (a quarter of the bytes) and normalised there by ``normalize``."""
        if self.pixels is not None:
            return normalize(_to_device(self.pixels, device))
        xs = [sample.x for sample in self.samples]
        if torch.device(device).type == "cuda" and xs[0].device.type == "cpu":
            pinned = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=True)
            return torch.stack(xs, out=pinned).to(device, non_blocking=True)
        return torch.stack(xs).to(device, non_blocking=True)


def _to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; bound for CUDA through pinned memory, so the copy is asynchronous."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu":
        pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return pinned.copy_(x).to(device, non_blocking=True)
    return x.to(device)


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


class ShardReader:
    """Iterate the batches of one shard's rows ``[lo, hi)``; ``failures`` maps the rows that could not be read
    to their reason once iteration is over. ``load(record)`` returns a :class:`Sample` or the reason (a str)."""

    def __init__(self, records: Sequence[dict], load: Callable[[dict], Any], batch_size: int, threads: int,
                 rows: tuple[int, int] | None = None):
        self.records, self.load, self.batch_size, self.threads = records, load, batch_size, threads
        self.lo, self.hi = rows if rows is not None else (0, len(records))
        self.failures: dict[int, str] = {}
        self.notes: list[str] = []  # nothing here; the decode workers' reader notes a fallback

    def _spans(self) -> list[tuple[int, int]]:
        """[first, stop) of the rows of each image, in order."""
        ids = [self.records[i]["sample_id"] for i in range(self.lo, self.hi)]
        firsts = [self.lo + j for j in range(len(ids)) if j == 0 or ids[j] != ids[j - 1]]
        return list(zip(firsts, firsts[1:] + [self.hi]))

    def __iter__(self) -> Iterator[Batch]:
        spans = self._spans()
        decoded = prefetch(((lambda i=first: self.load(self.records[i])) for first, _ in spans),
                           window=2 * self.batch_size, threads=self.threads)
        rows: list[int] = []
        samples: list[Sample] = []
        for (first, stop), sample in zip(spans, decoded):
            for i in range(first, stop):
                if isinstance(sample, str):
                    self.failures[i] = sample
                else:
                    rows.append(i)
                    samples.append(sample)
            while len(rows) >= self.batch_size or (stop == self.hi and rows):
                yield Batch(np.asarray(rows[: self.batch_size]), samples[: self.batch_size])
                rows, samples = rows[self.batch_size:], samples[self.batch_size:]
