"""The actor's one store-writer thread: shard writes leave the engine's critical path, one shard at a time.

A GPU explain actor runs two shard tasks at once (:meth:`pipeline.actors.ExplainActor.concurrency`): while one task
explains its shard under the engine lock, the other hands its finished shard to this thread and waits for the
write. Every write goes through the one thread, so writes never interleave, and each shard is still written by the
one task that owns it. :meth:`ShardWriter.write` returns only once the write is done and re-raises its error, so a
task never reports a row that is not in the store.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ShardWriter:
    """A single writer thread; ``write(fn, *args)`` runs ``fn(*args)`` there and returns its result."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")

    def write(self, fn: Callable[..., T], *args) -> T:
        """Block until ``fn(*args)`` has run in the writer thread; its exception surfaces here."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
