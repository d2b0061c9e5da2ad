"""Store faults without Ray: torn shard objects (a writer killed on a non-atomic filesystem) and part writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers.stores import example_store, shard_block
from pipeline.store import STATUS_FAILED, STATUS_OK, STATUS_PENDING, open_store


def tear(path: Path) -> None:
    """What a kill mid-write leaves on a filesystem without atomic writes: the first half of the object."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_torn_relevance_shard_is_rewritten_whole(tmp_path):
    """The sharding codec reads an existing shard object on a write; a torn one fails its checksum (plain chunks of
    the metadata arrays are overwritten without a read, so only the sharded arrays can get stuck)."""
    url = str(tmp_path / "s.zarr")
    store = example_store(url)
    group = store.group("eps")
    for shard in range(store.n_shards):
        group.write_block(*shard_block(store, shard)[:1], **shard_block(store, shard)[1])
    tear(tmp_path / "s.zarr" / "explanations" / "eps" / "relevance" / "c" / "1" / "0" / "0")
    with pytest.raises(ValueError, match="checksum"):  # the torn object really is unreadable
        group.read("relevance", 4, 8)

    start, block = shard_block(store, 1, seed=7)
    group.write_block(start, **block)  # the rerun's whole-shard rewrite
    reread = open_store(url).group("eps")
    np.testing.assert_array_equal(reread.relevance[4:8].compute(), block["relevance"])
    np.testing.assert_array_equal(reread.read("output", 4, 8), block["output"])
    assert (reread.status == STATUS_OK).all()


def test_write_failed_on_a_torn_shard_fails_its_rows(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = example_store(url)
    group = store.group("eps")
    start, block = shard_block(store, 1)
    group.write_block(start, **block)
    tear(tmp_path / "s.zarr" / "explanations" / "eps" / "relevance" / "c" / "1" / "0" / "0")
    group.write_failed(start, 4, "gave up", path=["a", "b", "c", "d"])
    assert open_store(url).group("eps").status[4:8].tolist() == [STATUS_FAILED] * 4


def test_a_part_write_keeps_the_other_rows_of_the_shard(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = example_store(url)
    group = store.group("eps")
    start, first = shard_block(store, 1)
    group.write_rows(start, 4, np.array([True, True, False, False]), status=np.full(4, STATUS_OK), **first)
    start, second = shard_block(store, 1, seed=3)
    group.write_rows(start, 4, np.array([False, False, False, True]), status=np.full(4, STATUS_OK), **second)
    reread = open_store(url).group("eps")
    assert reread.status[4:8].tolist() == [STATUS_OK, STATUS_OK, STATUS_PENDING, STATUS_OK]
    relevance = reread.relevance[4:8].compute()
    np.testing.assert_array_equal(relevance[:2], first["relevance"][:2])
    np.testing.assert_array_equal(relevance[3], second["relevance"][3])
    assert np.isnan(relevance[2]).all()
    rows = reread.rows().slice(4, 4).to_pydict()
    assert rows["path"] == ["img/4.png", "img/5.png", "", "img/7.png"]
    assert rows["residual"][3] == pytest.approx(rows["relevance_sum"][3] - second["output"][3])
