"""``ExplanationGroup.read_shard``: the one-request shard read gives exactly what zarr's own slicing gives."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from helpers.stores import make_store
from pipeline.store import StoreError, open_store


def _maps(n, seed=0):
    maps = np.random.default_rng(seed).normal(size=(n, 5, 7)).astype(np.float32)
    maps[3, 1, 2] = np.nan  # a nonfinite row is stored as it came
    return maps


@pytest.mark.parametrize("url", ["local", "memory"])
def test_read_shard_equals_zarr_slicing_also_for_a_short_last_shard(tmp_path, url):
    path = str(tmp_path / "s.zarr") if url == "local" else f"memory://shard-read-{os.getpid()}/s.zarr"
    maps = _maps(11)
    make_store(path, maps, target=np.arange(11) % 3, rows_per_shard=4)
    group = open_store(path).group("lrp")
    plain = zarr.open_array(path + "/explanations/lrp/relevance", mode="r") if url == "local" else None
    for shard, (start, stop) in enumerate([(0, 4), (4, 8), (8, 11)]):
        got = group.read_shard("relevance", shard)
        assert got.dtype == np.float32 and got.shape == (stop - start, 5, 7)
        np.testing.assert_array_equal(got, maps[start:stop])  # NaN equal to NaN
        if plain is not None:
            np.testing.assert_array_equal(got, plain[start:stop])
    # an array of another layout (not sharded) reads through zarr's slicing, with the same answer
    np.testing.assert_array_equal(group.read_shard("target", 2), np.arange(8, 11) % 3)


def test_a_shard_never_written_reads_as_fill_and_a_torn_one_is_refused(tmp_path):
    from pipeline.store import RelevanceStore

    path = str(tmp_path / "s.zarr")
    store = RelevanceStore.create(path, config={}, class_names=["a"], groups=["lrp"], n_rows=8, height=5, width=7,
                                  rows_per_shard=4)
    store.group("lrp").write_block(0, relevance=_maps(4), target=np.zeros(4, np.int64))
    group = open_store(path).group("lrp")
    assert np.isnan(group.read_shard("relevance", 1)).all()  # pending: zarr's fill value, NaN
    shard = tmp_path / "s.zarr" / "explanations" / "lrp" / "relevance" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte in the shard index
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        group.read_shard("relevance", 0)
