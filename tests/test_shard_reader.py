"""pipeline/store.py ShardReader, the aggregation's read path, against zarr's own reads of the same store."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import RelevanceStore, ShardReader, open_store

ROWS, SHARD, H, W = 14, 4, 6, 5  # the last shard holds 2 rows


def _store(url: str, written=(0, 1, 3)) -> RelevanceStore:
    """Shards ``written`` written (random maps, masks, some NaN rows), shard 2 left pending (no objects)."""
    rng = np.random.default_rng(3)
    store = RelevanceStore.create(url, config={"test": "shard reader"}, class_names=["a", "b"], groups=["g"],
                                  n_rows=ROWS, height=H, width=W, rows_per_shard=SHARD, with_mask=True)
    group = store.group("g")
    for shard in written:
        start, stop = store.shard_rows(shard)
        relevance = rng.standard_normal((stop - start, H, W)).astype(np.float32)
        relevance[0, 1, 2] = np.nan  # a nonfinite row reads back as stored
        group.write_block(start, relevance=relevance, mask=rng.random((stop - start, H, W)) < 0.3,
                          target=np.arange(start, stop) % 2, output=np.zeros(stop - start))
    return store


@pytest.mark.parametrize("where", ["path", "memory"])
def test_whole_shards_and_rows_equal_zarr(tmp_path, where):
    url = str(tmp_path / "s.zarr") if where == "path" else f"memory://shard-reader-{os.getpid()}/s.zarr"
    _store(url)
    group = open_store(url).group("g")
    for name in ("relevance", "mask"):
        reader = group.shard_reader(name)
        assert reader._zstd is not None  # the fast path, not zarr's fallback
        np.testing.assert_array_equal(group.lazy_shards(name).compute(), group.lazy(name).compute())
        np.testing.assert_array_equal(reader[4:8], group.read(name, 4, 8))
        rng = np.random.default_rng(0)
        for share in (0.0, 0.5, 1.0):  # whole objects, the default, byte ranges only
            reader.whole_share = share
            for size in (0, 1, 3, 9, ROWS):
                rows = np.sort(rng.choice(ROWS, size, replace=False))
                np.testing.assert_array_equal(reader.rows(rows), group.read_rows(name, rows))
    assert np.isnan(group.shard_reader("relevance")[8:12]).all()  # the pending shard reads as fill


def test_other_layouts_read_through_zarr(tmp_path):
    _store(str(tmp_path / "s.zarr"))
    group = open_store(str(tmp_path / "s.zarr")).group("g")
    reader = group.shard_reader("target")  # plain chunks, not shards of one-row chunks
    assert reader._zstd is None
    np.testing.assert_array_equal(reader.rows(np.array([1, 2, 9])), group.read("target")[[1, 2, 9]])
    np.testing.assert_array_equal(reader[0:4], group.read("target", 0, 4))


def test_a_torn_shard_fails_its_checksum_as_in_zarr(tmp_path):
    _store(str(tmp_path / "s.zarr"))
    shard = Path(tmp_path / "s.zarr" / "explanations" / "g" / "relevance" / "c" / "1" / "0" / "0")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    group = open_store(str(tmp_path / "s.zarr")).group("g")
    with pytest.raises(ValueError, match="checksum"):
        group.read("relevance", 4, 8)
    reader = group.shard_reader("relevance")
    with pytest.raises(ValueError, match="checksum"):
        reader[4:8]
    with pytest.raises(ValueError, match="checksum"):
        reader.rows(np.array([5]))
    np.testing.assert_array_equal(reader[0:4], group.read("relevance", 0, 4))  # the other shards still read


def test_reader_is_a_plain_object_that_pickles(tmp_path):
    """Dask on Ray ships the reader to workers (see RowReader for why a plain object)."""
    import pickle

    _store(str(tmp_path / "s.zarr"))
    reader = open_store(str(tmp_path / "s.zarr")).group("g").shard_reader("relevance")
    assert not hasattr(ShardReader, "__dataclass_fields__")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(reader))[0:4], reader[0:4])


@pytest.mark.parametrize("dtype, shards", [(">f4", (3, 3)), ("<f4", (2, 6))])
def test_arrays_the_fast_path_cannot_read_fall_back_to_zarr(dtype, shards):
    """A big-endian dtype (stored little-endian by zarr's bytes codec) and shards wider than the array in the trailing
    dimensions are not the store's layout: the reader must give zarr's values, not decode them itself."""
    import zarr
    from zarr.storage import MemoryStore

    array = zarr.create_array(MemoryStore(), shape=(6, 3), chunks=(1, 3), shards=shards, dtype=dtype)
    array[:] = np.arange(18, dtype=np.float32).reshape(6, 3)
    reader = ShardReader(array)
    assert reader._zstd is None
    np.testing.assert_array_equal(reader[0:6], np.arange(18).reshape(6, 3))
    np.testing.assert_array_equal(reader.rows(np.array([1, 4])), np.arange(18).reshape(6, 3)[[1, 4]])


def test_keys_other_than_whole_rows_go_to_zarr_with_their_full_meaning(tmp_path):
    _store(str(tmp_path / "s.zarr"))
    group = open_store(str(tmp_path / "s.zarr")).group("g")
    reader, whole = group.shard_reader("relevance"), group.read("relevance")
    np.testing.assert_array_equal(reader[0:4, 0:H, 0:W], whole[0:4])
    np.testing.assert_array_equal(reader[0:4, 1:3], whole[0:4, 1:3])
    np.testing.assert_array_equal(reader[::2], whole[::2])
    np.testing.assert_array_equal(reader[5], whole[5])
