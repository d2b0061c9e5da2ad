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
dies (a decoder crashing on a hostile file) breaks the pool: the rows in flight are decoded again one at a time in a
single-worker process (a fresh one after each death), so only a row that kills that process too fails, and the
actor (its model, its CUDA context) lives on; without workers such a row ends the actor, and the pool's bisection
finds it in several restarts.

Driven in-process from a script rather than through Ray (benchmarks, tests), the script needs the usual
``if __name__ == "__main__":`` guard of any ``spawn`` pool: a spawned worker imports the parent's main module.
"""
from __future__ import annotations

import multiprocessing
import threading
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
    """A pool of ``workers`` decoding processes for one actor, started on first use and again after it breaks.

    The actor's two shard tasks (on a GPU) share it; :meth:`pool` and :meth:`broken` are safe from both threads."""

    def __init__(self, workers: int, spec: PreprocessSpec, storage_options=None):
        if workers < 1:
            raise ValueError(f"decode workers must be at least 1, got {workers}")
        self.workers, self.spec, self.options = workers, spec, dict(storage_options or {})
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        #: set once a worker could not be started: later shards are decoded in the actor at once, without new spawns
        self.unavailable = False

    def pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = torch.multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start,
                                                 initargs=(self.spec.to_dict(), self.options))
            return self._pool

    def start(self, wait: bool = False) -> None:
        """Start the workers now (each imports torch: seconds), so they start while the actor builds its model
        rather than when the first shard arrives; ``wait``: return once every one is up (benchmarks)."""
        pool = self.pool()
        started = [submit(pool, _ready) for _ in range(self.workers)]
        for future in started if wait else ():
            future.result()

    def broken(self, pool: ProcessPoolExecutor) -> None:
        """Forget ``pool``, which a dead worker broke; the next :meth:`pool` starts a fresh one (a pool that the other
        task has already replaced stays)."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def submit(pool: ProcessPoolExecutor, fn, *args):
    """``pool.submit``, where a pool that broke under it raises :class:`BrokenProcessPool` however it shows: a submit
    that spawns a replacement worker while the pool's manager thread closes the pipes of the broken one raises
    OSError ("handle is closed"), and one after the other task shut the broken pool down raises RuntimeError."""
    try:
        return pool.submit(fn, *args)
    except BrokenProcessPool:
        raise
    except (OSError, RuntimeError) as error:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a spawned process still importing a script without the main guard: it must die, not decode in itself
            raise
        raise BrokenProcessPool(f"the decode pool broke during a submit: {error}") from error


DIED = "the decode worker process died on this image (its decoder crashed, or it was killed)"


class WorkerReader:
    """The batches of one shard's rows ``[lo, hi)`` decoded by ``workers``; the same interface as
    :class:`pipeline.batches.ShardReader` (``failures`` once iterated, and ``notes``).

    When a worker dies, the rows in flight are decoded again one at a time in a single-worker process (a fresh one
    after each death): a row whose image kills that process too fails (:data:`DIED`), the others are read, and the
    actor lives on. Only if a process cannot even be started are the rest of the shard's rows (and every later
    shard's) decoded in the actor, by ``load`` in ``threads`` threads (:class:`pipeline.batches.ShardReader`)."""

    def __init__(self, records: Sequence[dict], workers: DecodeWorkers, batch_size: int, load: Callable,
                 threads: int, rows: tuple[int, int] | None = None):
        self.records, self.workers, self.batch_size = records, workers, batch_size
        self.load, self.threads = load, threads
        self.lo, self.hi = rows if rows is not None else (0, len(records))
        self.failures: dict[int, str] = {}
        self.notes: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        start = self.lo
        if self.workers.unavailable:
            yield from self._in_actor(start, "decode workers could not be started for an earlier shard")
            return
        while start < self.hi:
            pool, span = self.workers.pool(), [start, start]  # span: the rows submitted and not yet yielded
            try:
                yield from self._pipelined(pool, start, span)
                return
            except BrokenProcessPool:
                self.workers.broken(pool)
            first, end = span[0], max(span[1], min(span[0] + self.batch_size, self.hi))  # always some progress
            stopped = yield from self._one_at_a_time(first, end)
            if stopped is not None:  # no process could be started: the actor decodes the rest itself
                self.workers.unavailable = True
                yield from self._in_actor(stopped, "decode workers could not be started")
                return
            killers = sum(self.failures.get(i) == DIED for i in range(first, end))
            if killers:
                self.notes.append(f"a decode worker died on {killers} of the {end - first} images from "
                                  f"{self.records[first]['path']} on: decoded again one at a time, {killers} killed "
                                  "a fresh worker too and failed, the others were read")
            else:  # the row that broke the pool was another shard's (the actor's other task), or a kill from outside
                self.notes.append(f"the decode pool broke (a worker died) while decoding the {end - first} images "
                                  f"from {self.records[first]['path']} on: decoded again one at a time, none failed")
            start = end

    def _in_actor(self, start: int, why: str) -> Iterator[Batch]:
        """Rows ``[start, hi)`` decoded in the actor's threads (:class:`pipeline.batches.ShardReader`), with a note."""
        self.notes.append(f"{why} (the reason is in the actor's log): {self.hi - start} images from "
                          f"{self.records[start]['path']} on were decoded in the actor")
        fallback = ShardReader(self.records, self.load, self.batch_size, self.threads, (start, self.hi))
        yield from fallback
        self.failures.update(fallback.failures)

    def _pipelined(self, pool: ProcessPoolExecutor, start: int, span: list[int]) -> Iterator[Batch]:
        """Batches from ``start`` on, ``workers + 1`` decoding at once; ``span`` tracks the rows in flight."""
        pending: deque = deque()
        try:
            for first in range(start, self.hi, self.batch_size):
                stop = min(first + self.batch_size, self.hi)
                pending.append(submit(pool, decode_rows, [self.records[i] for i in range(first, stop)], first))
                span[1] = stop
                if len(pending) > self.workers.workers:
                    yield from self._take(pending.popleft(), span)
            while pending:
                yield from self._take(pending.popleft(), span)
        finally:
            for future in pending:
                future.cancel()

    def _take(self, future, span: list[int]) -> Iterator[Batch]:
        rows, pixels, samples, failures = future.result()  # a dead worker raises here
        self.failures.update(failures)
        span[0] = min(span[0] + self.batch_size, self.hi)
        if len(rows):
            yield Batch(rows, samples, pixels)

    def _one_at_a_time(self, first: int, end: int):
        """Rows ``[first, end)`` each decoded alone by a fresh single worker; returns the row from which no worker
        could be started, else None. A worker is known to be up (it answered) before its row is given to it, so a
        death after that is the row's doing."""
        single = DecodeWorkers(1, self.workers.spec, self.workers.options)
        rows, pixels, samples = [], [], []
        try:
            for i in range(first, end):
                pool = single.pool()
                try:
                    submit(pool, _ready).result()
                except BrokenProcessPool:
                    single.broken(pool)
                    if rows:
                        yield Batch(np.concatenate(rows), samples, torch.cat(pixels))
                    return i
                try:
                    got = submit(pool, decode_rows, [self.records[i]], i).result()
                except BrokenProcessPool:
                    single.broken(pool)
                    self.failures[i] = DIED
                    continue
                self.failures.update(got[3])
                if len(got[0]):
                    rows.append(got[0])
                    pixels.append(got[1])
                    samples += got[2]
                if len(samples) == self.batch_size:
                    yield Batch(np.concatenate(rows), samples, torch.cat(pixels))
                    rows, pixels, samples = [], [], []
            if rows:
                yield Batch(np.concatenate(rows), samples, torch.cat(pixels))
            return None
        finally:
            single.close()
