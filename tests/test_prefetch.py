"""The actor's stage overlap: the bounded prefetch thread (pipeline.prefetch) and the writer thread
(pipeline.writer)."""
from __future__ import annotations

import threading
import time

import pytest

from pipeline.prefetch import Ahead
from pipeline.writer import ShardWriter


def test_ahead_yields_in_order_and_reraises_the_producers_error_after_the_items_before_it():
    def items():
        yield from range(5)
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"), Ahead(items(), depth=2) as ahead:
        for item in ahead:
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_ahead_is_bounded_the_producer_waits_for_the_consumer():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    with Ahead(items(), depth=3) as ahead:
        deadline = time.monotonic() + 30
        while len(produced) < 4 and time.monotonic() < deadline:  # 3 queued + 1 in the producer's hand
            time.sleep(0.01)
        time.sleep(0.3)  # an unbounded producer would be far past 4 by now
        assert len(produced) == 4
        iterator = iter(ahead)
        assert [next(iterator) for _ in range(10)] == list(range(10))
        assert len(produced) <= 10 + 4


def test_closing_early_stops_the_thread_and_closes_the_generator_in_it():
    closed = threading.Event()

    def items():
        try:
            yield from range(1000)
        finally:
            closed.set()

    ahead = Ahead(items(), depth=1)
    assert next(iter(ahead)) == 0
    ahead.close()
    assert closed.is_set() and not ahead._thread.is_alive()


def test_ahead_refuses_a_depth_below_one():
    with pytest.raises(ValueError, match="depth"):
        Ahead([], depth=0)


def test_the_writer_runs_every_write_in_its_one_thread_and_surfaces_errors():
    writer = ShardWriter()
    names = []

    def write(i):
        names.append(threading.current_thread().name)
        return i * 2

    callers = [threading.Thread(target=lambda i=i: writer.write(write, i)) for i in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert writer.write(write, 21) == 42
    assert len(names) == 5 and len(set(names)) == 1 and names[0].startswith("shard-writer")

    def broken():
        raise PermissionError("store is read-only")

    with pytest.raises(PermissionError, match="read-only"):
        writer.write(broken)
    writer.close()
