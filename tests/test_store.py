"""The Zarr relevance store: layout, shard-aligned writes, config refusal, resume bookkeeping."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xarray as xr
import zarr

from helpers.stores import STORE_CONFIG, example_store, shard_block
from pipeline.store import (
    FORMAT_VERSION, STATUS_FAILED, STATUS_NONFINITE, STATUS_OK,
    StoreConfigMismatch, StoreError, open_store,
)

def test_roundtrip_through_api_xarray_and_plain_zarr(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = example_store(url)
    group = store.group("eps")
    blocks = [shard_block(store, shard) for shard in range(store.n_shards)]
    for start, block in blocks:
        group.write_block(start, **block)

    store = open_store(url)
    assert store.format_version == FORMAT_VERSION
    assert store.config == STORE_CONFIG and store.class_names == ["cat", "dog", "car"]
    assert store.group_names == ["eps"] and store.n_shards == 3 and store.shard_rows(2) == (8, 10)
    group = store.group("eps")
    expected = np.concatenate([block["relevance"] for _, block in blocks])
    np.testing.assert_array_equal(group.relevance.compute(), expected)
    assert group.relevance.chunks[0] == (4, 4, 2)  # one dask chunk per shard
    rows = group.rows()
    assert rows.column_names == ["row", "sample_id", "path", "target", "label", "prediction", "output",
                                 "relevance_sum", "residual", "error", "status"]
    assert rows["path"].to_pylist()[9] == "img/9.png"
    assert set(rows["status"].to_pylist()) == {STATUS_OK}
    sums = expected.sum(axis=(1, 2), dtype=np.float64)
    np.testing.assert_allclose(rows["relevance_sum"].to_numpy(), sums)
    outputs = np.concatenate([block["output"] for _, block in blocks])
    np.testing.assert_allclose(rows["residual"].to_numpy(), sums - outputs)
    assert group.boxes.shape == (10, 2, 4) and np.isnan(group.boxes).all()
    assert group.labels.shape == (10, 3) and group.mask.shape == (10, 4, 5)

    ds = xr.open_zarr(url, group="explanations/eps", consolidated=False)
    assert ds.relevance.dims == ("row", "y", "x")
    np.testing.assert_array_equal(ds.relevance.values, expected)
    assert zarr.open_group(url, mode="r").attrs["lrp_audit_format"] == FORMAT_VERSION


def test_nonfinite_rows_are_flagged_and_explicit_status_kept(tmp_path):
    store = example_store(str(tmp_path / "s.zarr"), n_rows=4)
    start, block = shard_block(store, 0)
    block["relevance"][1, 0, 0] = np.nan
    block["output"][2] = np.inf
    block["status"] = [STATUS_OK, STATUS_OK, STATUS_OK, STATUS_FAILED]
    store.group("eps").write_block(start, **block)
    assert store.group("eps").status.tolist() == [STATUS_OK, STATUS_NONFINITE, STATUS_NONFINITE, STATUS_FAILED]


def test_writes_must_cover_whole_shards(tmp_path):
    store = example_store(str(tmp_path / "s.zarr"))
    _, block = shard_block(store, 1)
    with pytest.raises(StoreError, match="whole shards"):
        store.group("eps").write_block(2, **block)


def test_different_config_is_refused_same_config_reopens(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = example_store(url)
    start, block = shard_block(store, 0)
    store.group("eps").write_block(start, **block)

    other = {**STORE_CONFIG, "model": {"name": "resnet50"}}
    with pytest.raises(StoreConfigMismatch, match=r"model\.name: 'tiny' in the store, 'resnet50' now"):
        example_store(url, config=other)
    with pytest.raises(StoreConfigMismatch, match="layout.height"):
        example_store(url, height=8)

    reopened = example_store(url)  # same config: resume, the written shard is still there
    assert reopened.group("eps").pending_shards() == [1, 2]
    np.testing.assert_array_equal(reopened.group("eps").relevance[:4].compute(), block["relevance"])


def test_pending_shards_and_a_truncated_status_chunk(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = example_store(url)
    group = store.group("eps")
    for shard in range(3):
        start, block = shard_block(store, shard)
        if shard == 2:
            block["status"] = [STATUS_OK, STATUS_FAILED]
        group.write_block(start, **block)
    assert group.pending_shards() == [] and group.pending_shards(retry_failed=True) == [2]
    # a writer killed while writing shard 1's status chunk leaves a truncated object: redo that shard
    chunk = tmp_path / "s.zarr" / "explanations" / "eps" / "status" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:3])
    assert group.pending_shards() == [1]
    assert group.shard_status(0).tolist() == [STATUS_OK] * 4


def test_parallel_writers_on_separate_shards_lose_nothing(tmp_path):
    store = example_store(str(tmp_path / "s.zarr"), n_rows=40, rows_per_shard=4, with_mask=False, max_boxes=0)
    blocks = [shard_block(store, shard) for shard in range(store.n_shards)]

    def write(item):
        start, block = item
        open_store(store.url, mode="r+").group("eps").write_block(start, **block)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, blocks))
    group = open_store(store.url).group("eps")
    assert (group.status == STATUS_OK).all()
    np.testing.assert_array_equal(group.relevance.compute(), np.concatenate([b["relevance"] for _, b in blocks]))


def test_fsspec_url_store():
    url = f"memory://lrp-audit-test-{os.getpid()}/s.zarr"
    store = example_store(url, n_rows=4)
    start, block = shard_block(store, 0)
    store.group("eps").write_block(start, **block)
    assert open_store(url).group("eps").rows()["path"].to_pylist() == [f"img/{i}.png" for i in range(4)]


def test_open_errors_say_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="run 'lrp-audit explain'"):
        open_store(str(tmp_path / "missing.zarr"))
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(StoreError, match="not an lrp-audit"):
        open_store(str(tmp_path / "plain.zarr"))
    with pytest.raises(StoreError, match="not an lrp-audit store"):
        example_store(str(tmp_path / "plain.zarr"))
    store = example_store(str(tmp_path / "s.zarr"))
    zarr.open_group(store.url, mode="r+").attrs["lrp_audit_format"] = FORMAT_VERSION + 1  # a newer writer
    with pytest.raises(StoreError, match="upgrade lrp-audit"):
        open_store(store.url)


def test_a_path_holding_other_files_is_never_cleared(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "important.txt").write_text("keep me")
    with pytest.raises(StoreError, match="holds other files"):
        example_store(str(folder))
    with pytest.raises(StoreError, match="is a file"):
        example_store(str(folder / "important.txt"))
    legacy = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    legacy.create_array("x", shape=(2,), dtype="int8")
    with pytest.raises(StoreError, match="holds other files"):
        example_store(str(tmp_path / "v2.zarr"))
    assert (folder / "important.txt").read_text() == "keep me"
    assert zarr.open_group(str(tmp_path / "v2.zarr"), mode="r")["x"].shape == (2,)


def test_a_creation_cut_short_is_redone_not_resumed(tmp_path):
    url = str(tmp_path / "s.zarr")
    example_store(url)
    root = zarr.open_group(url, mode="r+")
    # what a kill during creation leaves: the marker set, the format attribute not yet, an array missing
    root.attrs.update({"lrp_audit_creating": True})
    del root.attrs["lrp_audit_format"]
    del root["explanations/eps/status"]
    with pytest.raises(StoreError, match="not an lrp-audit"):
        open_store(url)
    store = example_store(url)
    assert store.group("eps").pending_shards() == [0, 1, 2]
    assert "lrp_audit_creating" not in zarr.open_group(url, mode="r").attrs


def test_file_url_store(tmp_path):
    url = f"file://{tmp_path}/nested/s.zarr"
    store = example_store(url, n_rows=4)
    start, block = shard_block(store, 0)
    store.group("eps").write_block(start, **block)
    assert example_store(url, n_rows=4).group("eps").pending_shards() == []
    np.testing.assert_array_equal(open_store(str(tmp_path / "nested" / "s.zarr")).group("eps").relevance.compute(),
                                  block["relevance"])


def test_write_failed_keeps_rows_that_are_ok(tmp_path):
    store = example_store(str(tmp_path / "s.zarr"))
    group = store.group("eps")
    start, block = shard_block(store, 1)
    block["status"] = [STATUS_OK, STATUS_FAILED, STATUS_OK, STATUS_NONFINITE]
    group.write_block(start, **block)
    group.write_failed(start, 4, "gave up", path=[f"new/{i}" for i in range(4)], target=[9, 9, 9, 9])
    reread = open_store(store.url).group("eps")
    rows = reread.rows().slice(start, 4).to_pydict()
    assert rows["status"] == [STATUS_OK, STATUS_FAILED, STATUS_OK, STATUS_FAILED]
    assert rows["error"] == ["", "gave up", "", "gave up"]
    assert rows["path"] == ["img/4.png", "new/1", "img/6.png", "new/3"]
    assert rows["target"] == [block["target"][0], 9, block["target"][2], 9]
    relevance = reread.relevance[start:start + 4].compute()
    np.testing.assert_array_equal(relevance[[0, 2]], block["relevance"][[0, 2]])
    assert np.isnan(relevance[[1, 3]]).all() and np.isnan(reread.read("output", start + 1, start + 2)[0])
    # a shard never written: every row fails
    group.write_failed(8, 2, "no actor", path=["a", "b"])
    assert reread.rows().slice(8, 2)["status"].to_pylist() == [STATUS_FAILED] * 2


def test_check_maps_compares_each_map_with_the_stored_sum_it_is_given(tmp_path):
    """The sums the reader computed against the ``relevance_sum`` the caller read: equal passes; a moved sum, a NaN
    map and a NaN stored sum (its chunk deleted since the rows were checked) are refused, naming the row."""
    from helpers.stores import make_store

    relevance = np.random.default_rng(0).normal(size=(8, 4, 4)).astype(np.float32)
    group = open_store(make_store(tmp_path / "s.zarr", relevance, target=[0] * 8)).group("lrp")
    rows, stored = np.arange(8), group.read("relevance_sum")
    totals, magnitudes = relevance.sum(axis=(1, 2), dtype=np.float64), np.abs(relevance).sum(axis=(1, 2), dtype=float)
    group.check_maps(rows, totals, magnitudes, stored)
    for what, (t, s) in {"does not add up": (totals + np.eye(8)[3], stored),
                         "no finite relevance map": (np.where(rows == 3, np.nan, totals), stored),
                         "does not add up to its stored": (totals, np.where(rows == 3, np.nan, stored))}.items():
        with pytest.raises(StoreError, match=f"1 row\\(s\\) with status ok but .*{what}.*: rows 3 "):
            group.check_maps(rows, t, magnitudes, s)
