"""pipeline/store.py ``write_shards``, the explain actors' write path: the very bytes zarr writes for the same rows."""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.store import RelevanceStore, ShardReader, write_shards

SHARD = 4


def _pair(url: str, name: str, shape: tuple, dtype: str, fill) -> tuple[zarr.Array, zarr.Array]:
    """Two arrays of the store's layout (one-row zstd chunks in shards of ``SHARD`` rows): ours, zarr's."""
    root = zarr.open_group(url, mode="w", zarr_format=3)
    return tuple(root.create_array(f"{name}-{who}", shape=shape, dtype=dtype, fill_value=fill,
                                   chunks=(1, *shape[1:]), shards=(SHARD, *shape[1:])) for who in ("ours", "zarr"))


def _objects(array: zarr.Array) -> dict[str, bytes]:
    """Every shard object of ``array``, by key."""
    keys = sync(_list(array))
    prototype = default_buffer_prototype()
    return {key: sync(array.store.get(key, prototype)).to_bytes() for key in keys}


async def _list(array: zarr.Array) -> list[str]:
    return sorted([key async for key in array.store.list_prefix(f"{array.path}/c/")])


def _relevance(rows: int, *rest: int) -> np.ndarray:
    values = np.random.default_rng(rows).normal(size=(rows, *rest)).astype(np.float32)
    values[1] = np.nan  # a row of fill: no inner chunk
    values[2, 0] = np.nan  # partly NaN: stored as it is
    values[SHARD:2 * SHARD] = np.nan  # a whole shard of fill: no object at all
    return values


@pytest.mark.parametrize("where", ["path", "memory"])
@pytest.mark.parametrize("shape", [(11, 6, 5), (11, 3, 6, 5)])  # relevance; relevance_channels; a short last shard
def test_the_same_objects_as_zarr(tmp_path, where, shape):
    url = str(tmp_path / "a.zarr") if where == "path" else f"memory://shard-writer-{os.getpid()}-{len(shape)}/a.zarr"
    ours, theirs = _pair(url, "relevance", shape, "float32", np.nan)
    values = _relevance(*shape)
    assert write_shards(ours, 0, values)
    theirs[:] = values
    mine, zarrs = _objects(ours), _objects(theirs)
    assert len(zarrs) == 2 and [k.replace("-ours", "") for k in mine] == [k.replace("-zarr", "") for k in zarrs]
    assert list(mine.values()) == list(zarrs.values())  # byte for byte: chunks, index, checksum
    np.testing.assert_array_equal(ours[:], values)  # NaN equal to NaN
    np.testing.assert_array_equal(ShardReader(ours).rows(np.arange(shape[0])), values)


def test_bool_masks_and_a_rewrite_that_empties_a_shard(tmp_path):
    ours, theirs = _pair(str(tmp_path / "m.zarr"), "mask", (8, 6, 5), "bool", False)
    mask = np.random.default_rng(0).random((8, 6, 5)) < 0.3
    mask[0] = False
    for values in (mask, np.zeros_like(mask)):  # the second write leaves no object, as zarr's does
        assert write_shards(ours, 0, values)
        theirs[:] = values
        assert list(_objects(ours).values()) == list(_objects(theirs).values())
        np.testing.assert_array_equal(ours[:], values)
    assert _objects(ours) == {}


def test_other_layouts_and_unaligned_starts_are_left_to_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=3)
    plain = root.create_array("plain", shape=(8, 6, 5), dtype="float32", fill_value=np.nan, chunks=(4, 6, 5))
    assert not write_shards(plain, 0, np.zeros((8, 6, 5), np.float32))
    ours, _ = _pair(str(tmp_path / "q.zarr"), "relevance", (8, 6, 5), "float32", np.nan)
    assert not write_shards(ours, 2, np.zeros((4, 6, 5), np.float32))  # not at a shard's first row
    assert not write_shards(ours, 0, np.zeros((2, 6, 5), np.float32))  # ends inside a shard that is not the last
    assert not write_shards(ours, 4, np.zeros((8, 6, 5), np.float32))  # past the array's end
    assert not write_shards(ours, 0, np.zeros((4, 5, 6), np.float32))  # rows of another shape
    assert not write_shards(ours, 0, np.float32(1.0))
    assert _objects(ours) == {}


def test_a_zero_fill_is_compared_bit_for_bit_and_arrays_at_the_root(tmp_path):
    """-0.0 is not a 0.0 fill (zarr keeps its sign); an array at a store's root has keys without a leading slash."""
    values = np.zeros((4, 3, 2), np.float32)
    values[1] = -0.0
    values[2, 0, 0] = 1.0
    ours, theirs = _pair(str(tmp_path / "z.zarr"), "zeros", (4, 3, 2), "float32", 0.0)
    assert write_shards(ours, 0, values)
    theirs[:] = values
    assert list(_objects(ours).values()) == list(_objects(theirs).values())
    assert np.signbit(ours[1]).all()
    root = zarr.create_array(f"memory://root-array-{os.getpid()}", shape=(4, 3, 2), dtype="float32",
                             fill_value=np.nan, chunks=(1, 3, 2), shards=(4, 3, 2))
    assert write_shards(root, 0, values)
    np.testing.assert_array_equal(root[:], values)
    np.testing.assert_array_equal(ShardReader(root).rows(np.arange(4)), values)


def test_store_write_block_goes_through_it(tmp_path, monkeypatch):
    """``ExplanationGroup.write_block`` writes relevance, channels and masks by ``write_shards``; zarr reads them."""
    import pipeline.store as store_module

    written = []
    real = store_module.write_shards

    def recorded(array, start, values):
        done = real(array, start, values)
        if done:
            written.append(array.basename)
        return done

    monkeypatch.setattr(store_module, "write_shards", recorded)
    store = RelevanceStore.create(str(tmp_path / "s.zarr"), config={"test": "writer"}, class_names=["a"], groups=["g"],
                                  n_rows=6, height=6, width=5, rows_per_shard=SHARD, channels=3, with_mask=True)
    relevance = _relevance(6, 6, 5)[:, None].repeat(3, axis=1)
    group = store.group("g")
    group.write_block(0, relevance=relevance.sum(axis=1), relevance_channels=relevance,
                      mask=relevance[:, 0] > 0, target=np.zeros(6, np.int64), output=np.zeros(6))
    assert {"relevance", "relevance_channels", "mask"} <= set(written)
    np.testing.assert_array_equal(group.read("relevance_channels"), relevance)
    np.testing.assert_array_equal(group.read("relevance"), relevance.sum(axis=1))
