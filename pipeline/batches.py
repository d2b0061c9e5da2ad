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


class Sample(NamedTuple):
    """One decoded image in model geometry."""

    x: torch.Tensor  # (C, H, W) model input
    boxes: np.ndarray | None = None  # (K, 4) boxes in relevance-map pixels
    box_classes: np.ndarray | None = None  # (K,) class of each box, -1 when unknown
    mask: torch.Tensor | None = None  # (H, W) bool region mask


class Batch(NamedTuple):
    """Up to ``batch_size`` rows of a shard (offsets in the shard) and their decoded samples."""

    rows: np.ndarray
    samples: list[Sample]

    def inputs(self, device: torch.device | str) -> torch.Tensor:
        """The batch's inputs on ``device``. A host batch bound for CUDA is stacked straight into pinned memory (torch's
        caching host allocator: no second copy as with ``pin_memory()``), so the copy to the device is asynchronous."""
        xs = [sample.x for sample in self.samples]
        if torch.device(device).type == "cuda" and xs[0].device.type == "cpu":
            pinned = torch.empty((len(xs), *xs[0].shape), dtype=xs[0].dtype, pin_memory=True)
            return torch.stack(xs, out=pinned).to(device, non_blocking=True)
        return torch.stack(xs).to(device, non_blocking=True)


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
