"""Run an iterator a bounded number of items ahead of its consumer, in one thread of its own.

The explain actor's stages overlap through this: while the model explains batch k, the thread decodes and
stages batch k+1 (decode, preprocessing, the host-to-device copy). A queue of ``depth`` items is the
backpressure: the producer blocks once ``depth`` batches wait, so memory stays bounded however slow the model.
A thread rather than a process: decoded tensors then need no copy between processes, and the heavy parts
(Pillow's decoder, torch kernels, nvJPEG) release the GIL.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()
_POLL = 0.1  # seconds between checks of the stop flag while the queue is full


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


class Ahead(Generic[T]):
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead; errors re-raise in the consumer.

    Use as a context manager (or call :meth:`close`) so a consumer that stops early also stops the thread.
    """

    def __init__(self, items: Iterable[T], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._items, self._queue = items, queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        iterator = iter(self._items)
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Raised(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator is closed in the thread that runs it
                close()

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the producer and wait for it (it finishes the item it is working on)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Ahead[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
