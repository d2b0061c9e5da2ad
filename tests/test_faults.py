"""Fault injection with real Ray and real Zarr: killed drivers and actors, a row that kills its actor, a lost node.

Every test ends with the store compared array by array with an uninterrupted run of the same data (same pixels,
same weights): relevance bit-identical on CPU, every per-row array equal, no row missing or written twice.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.run import run
from pipeline.store import STATUS_FAILED, STATUS_OK, open_store
from tests.test_pipeline import fifo_dataset, holders, manifest, save_image, values, wait_for

N_IMAGES = 12
COLUMNS = ("sample_id", "target", "label", "prediction", "output", "relevance_sum", "residual", "status", "error")


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> str:
    """An uninterrupted run of the data every fault test uses."""
    folder = tmp_path_factory.mktemp("reference")
    summary = run(config_from_dict(values(folder, manifest(folder, N_IMAGES))))
    assert summary.exit_code == 0
    return str(folder / "run.zarr")


def assert_same_store(reference: str, other: str, rows: slice | list = slice(None), rtol: float = 0.0) -> None:
    """Equal array by array on ``rows``: relevance bit-identical (``rtol`` 0), every per-row array equal, boxes equal.

    A row explained in a batch of another size differs in the last bits (CPU kernels depend on the batch size):
    bisected shards are compared with ``rtol``."""
    a, b = open_store(reference), open_store(other)
    assert a.group_names == b.group_names and a.n_rows == b.n_rows
    for name in a.group_names:
        ga, gb = a.group(name), b.group(name)
        np.testing.assert_allclose(ga.relevance.compute()[rows], gb.relevance.compute()[rows], rtol=rtol, atol=0)
        np.testing.assert_array_equal(ga.boxes[rows], gb.boxes[rows])
        ra, rb = ga.rows(), gb.rows()
        for column in COLUMNS:
            x, y = (r[column].to_numpy(zero_copy_only=False)[rows] for r in (ra, rb))
            if rtol and x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=rtol, err_msg=column)
            else:
                np.testing.assert_array_equal(x, y, err_msg=column)


class Killer:
    """Kills (SIGKILL) every process that opens ``path``, until stopped: a row whose image always kills its actor,
    as a decoder segfault or an out-of-memory image would."""

    def __init__(self, path: Path):
        self.path, self.kills, self.stop = path, 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            for pid in holders(self.path):
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.mark.slow
def test_a_row_that_kills_its_actor_is_found_by_bisection_and_only_it_fails(reference, tmp_path):
    source, fifo = fifo_dataset(tmp_path, N_IMAGES, blocked_row=4)  # shard 1 holds rows 3, 4, 5
    writer = os.open(fifo, os.O_RDWR)
    try:
        with Killer(fifo) as killer:
            summary = run(config_from_dict(values(tmp_path, source, max_attempts=2)))
    finally:
        os.close(writer)
    group = open_store(str(tmp_path / "run.zarr")).group("ab")
    status, errors = group.status, group.rows()["error"].to_pylist()
    assert status[4] == STATUS_FAILED and re.search("the actor (died|became unavailable) on this row", errors[4])
    assert "tried 2 times" in errors[4]
    assert (np.delete(status, 4) == STATUS_OK).all() and summary.groups["ab"]["failed"] == 1
    assert killer.kills >= 3 and summary.retries >= 3  # the shard, then the half with row 4, then row 4 alone twice
    assert_same_store(reference, str(tmp_path / "run.zarr"), [i for i in range(N_IMAGES) if i != 4], rtol=1e-4)
