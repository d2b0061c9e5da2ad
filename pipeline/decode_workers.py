"""Decoding in worker processes beside an actor: the per-image Python off the interpreter that drives the model.

One GPU actor is bound by the Python it runs for every image (reading, Pillow, torchvision's per-image transforms,
the batch assembly): 250-330 images/s on an H200 whatever the decoder, where the engine explains 710-770
(benchmarks/RESULTS.md, "Stop 22 on a lent NVIDIA H200"); threads do not help, as that Python holds the GIL. With
``decode_workers: N`` an actor starts N processes once (``spawn``: a process that holds a CUDA context and Ray's
threads is not forked), and each decodes and preprocesses a whole batch of rows, stacked as one uint8 tensor in
shared memory (torch.multiprocessing: only a file descriptor crosses the pipe). The actor copies a quarter of the
float bytes to the device and normalises the batch there (:meth:`pipeline.batches.Batch.inputs`); the values are the
same as decoding in the actor (tests/test_decode_workers.py).

At most ``workers + 1`` batches are decoded ahead (the backpressure). A batch is a fixed range of rows, so a row that
fails leaves its batch one row short rather than pulling in the next row, as the in-actor reader does. A worker that
dies (a decoder crashing on a hostile file) breaks the pool: the rest of the shard is decoded in the actor itself,
where a crash ends the actor and the pool's bisection finds the row as without workers (docs/pipeline.md), and the
workers start again for the next shard.

Driven in-process from a script rather than through Ray (benchmarks, tests), the script needs the usual
``if __name__ == "__main__":`` guard of any ``spawn`` pool: a spawned worker imports the parent's main module.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch
import torch.multiprocessing

from .batches import Batch, Sample, ShardReader, load_sample
from .preprocess import Preprocess, PreprocessSpec

_worker: dict = {}  # in each worker process: its Preprocess and storage options


def _start(spec: dict, storage_options: dict) -> None:
    torch.set_num_threads(1)  # one image at a time per process; the processes are the parallelism
    _worker["preprocess"] = Preprocess(PreprocessSpec(**spec))
    _worker["options"] = storage_options


def _ready() -> bool:
    return True


def decode_rows(records: list[dict], first: int) -> tuple[np.ndarray, torch.Tensor | None, list[Sample], dict]:
    """In a worker: rows ``first, first + 1, ...`` as (rows read, their pixels stacked in shared memory, samples with
    boxes and masks only, failures by row). Consecutive rows of one image decode it once."""
    preprocess, options = _worker["preprocess"], _worker["options"]
    rows, images, samples, failures = [], [], [], {}
    previous_id, sample = None, None
    for i, record in enumerate(records, first):
        if sample is None or record["sample_id"] != previous_id:
            sample = load_sample(record, preprocess, options, normalize=False)
            previous_id = record["sample_id"]
        if isinstance(sample, str):
            failures[i] = sample
            continue
        rows.append(i)
        images.append(sample.x)
        samples.append(sample._replace(x=None))
    pixels = None
    if images:
        pixels = torch.empty((len(images), *images[0].shape), dtype=torch.uint8).share_memory_()
        torch.stack(images, out=pixels)
    return np.asarray(rows, np.int64), pixels, samples, failures


class DecodeWorkers:
    """A pool of ``workers`` decoding processes for one actor, started on first use and again after it breaks."""

    def __init__(self, workers: int, spec: PreprocessSpec, storage_options=None):
        if workers < 1:
            raise ValueError(f"decode workers must be at least 1, got {workers}")
        self.workers, self.spec, self.options = workers, spec, dict(storage_options or {})
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = torch.multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start,
                                             initargs=(self.spec.to_dict(), self.options))
        return self._pool

    def start(self, wait: bool = False) -> None:
        """Start the workers now (each imports torch: seconds), so they start while the actor builds its model
        rather than when the first shard arrives; ``wait``: return once every one is up (benchmarks)."""
        pool = self.pool()
        started = [pool.submit(_ready) for _ in range(self.workers)]
        for future in started if wait else ():
            future.result()

    def broken(self) -> None:
        """Forget a pool a dead worker broke; the next :meth:`pool` starts a fresh one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class WorkerReader:
    """The batches of one shard's rows ``[lo, hi)`` decoded by ``workers``; the same interface as
    :class:`pipeline.batches.ShardReader` (``failures`` once iterated, and ``notes``), which it falls back to, with
    ``load`` in ``threads`` threads of the actor, for the rest of the shard when a worker dies."""

    def __init__(self, records: Sequence[dict], workers: DecodeWorkers, batch_size: int, load: Callable,
                 threads: int, rows: tuple[int, int] | None = None):
        self.records, self.workers, self.batch_size = records, workers, batch_size
        self.load, self.threads = load, threads
        self.lo, self.hi = rows if rows is not None else (0, len(records))
        self.failures: dict[int, str] = {}
        self.notes: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        starts = iter(range(self.lo, self.hi, self.batch_size))
        pending: deque = deque()
        pool = self.workers.pool()
        try:
            for start in starts:
                pending.append((start, self._submit(pool, start)))
                if len(pending) > self.workers.workers:
                    yield from self._take(pending)
            while pending:
                yield from self._take(pending)
        except BrokenProcessPool as error:
            self.workers.broken()
            first = pending[0][0] if pending else self.lo
            self.notes.append(f"a decode worker died ({error}) on rows {first}-{self.hi - 1} of the shard: "
                              "decoded in the actor instead")
            pending.clear()
            fallback = ShardReader(self.records, self.load, self.batch_size, self.threads, (first, self.hi))
            yield from fallback
            self.failures.update(fallback.failures)
        finally:
            for _, future in pending:
                future.cancel()

    def _submit(self, pool: ProcessPoolExecutor, start: int):
        stop = min(start + self.batch_size, self.hi)
        return pool.submit(decode_rows, [self.records[i] for i in range(start, stop)], start)

    def _take(self, pending: deque) -> Iterator[Batch]:
        rows, pixels, samples, failures = pending[0][1].result()  # a dead worker raises here, the batch still pending
        pending.popleft()
        self.failures.update(failures)
        if len(rows):
            yield Batch(rows, samples, pixels)
