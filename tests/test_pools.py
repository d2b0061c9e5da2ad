"""Region pools: hand-computed sums, any grid conserves, masks tile, float64 accumulation."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregations import pools
from helpers import reductions


def rows_numbered(height: int, width: int) -> np.ndarray:
    """One map whose pixel (y, x) holds y + 1: row sums are easy to add by hand."""
    return np.repeat(np.arange(1, height + 1, dtype=np.float32)[:, None], width, axis=1)[None]


def test_thirds_by_hand():
    regions = pools.thirds(6, 4)
    assert regions.names == ("top", "middle", "bottom")
    # rows 1+2, 3+4, 5+6, four pixels each
    np.testing.assert_array_equal(regions.sums(rows_numbered(6, 4)), [[12.0, 28.0, 44.0]])


def test_grid_edges_and_names():
    assert pools.grid(7, 5, 3, 1).row_edges == (0, 2, 4, 7)
    assert pools.grid(4, 6, 1, 3).names == ("left", "center", "right")
    assert pools.grid(4, 4, 2, 2).names == ("r0c0", "r0c1", "r1c0", "r1c1")
    block = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    # quadrants: [0,1,4,5], [2,3,6,7], [8,9,12,13], [10,11,14,15]
    np.testing.assert_array_equal(pools.grid(4, 4, 2, 2).sums(block), [[10, 18, 42, 50]])


def test_parse_grid():
    assert pools.parse_grid("3x1") == (3, 1)
    assert pools.parse_grid(" 4X2 ") == (4, 2)
    for bad in ("3", "0x1", "axb", "3x1x2"):
        with pytest.raises(ValueError, match="ROWSxCOLS"):
            pools.parse_grid(bad)
    with pytest.raises(ValueError, match="does not fit"):
        pools.grid(4, 4, 5, 1)


def test_masks_get_the_rest_and_must_not_overlap():
    corner = np.zeros((4, 4), bool)
    corner[:2, :2] = True
    regions = pools.from_masks({"corner": corner})
    assert regions.names == ("corner", "rest")
    block = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(regions.sums(block), [[0 + 1 + 4 + 5, 120 - 10]])
    with pytest.raises(ValueError, match="overlap"):
        pools.from_masks({"a": corner, "b": corner})


def test_lazy_region_sums_over_chunks_match_numpy():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((10, 9, 8)).astype(np.float32)
    regions = pools.grid(9, 8, 3, 2)
    lazy = reductions.region_sums(da.from_array(maps, chunks=(3, 9, 8)), regions)
    expected = np.stack([[m[y0:y1, x0:x1].sum(dtype=np.float64)
                          for y0, y1 in zip(regions.row_edges[:-1], regions.row_edges[1:])
                          for x0, x1 in zip(regions.col_edges[:-1], regions.col_edges[1:])] for m in maps])
    np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-12)
    np.testing.assert_allclose(reductions.row_totals(da.from_array(maps, chunks=4)).compute(),
                               maps.sum(axis=(1, 2), dtype=np.float64), rtol=1e-12)


def test_sums_accumulate_in_float64():
    # 2**24 + 1 is not a float32: summed in float32 the thousand ones would vanish
    block = np.ones((1, 1, 1001), np.float32)
    block[0, 0, 0] = 2.0**24
    assert pools.grid(1, 1001, 1, 1).sums(block)[0, 0] == 2.0**24 + 1000
    assert reductions.row_totals(da.from_array(block)).compute()[0] == 2.0**24 + 1000


def test_conservation_flags_rows_that_do_not_add_up():
    sums = np.array([[1.0, 2.0], [1.0, 2.5]])
    residual, ok = pools.conservation(sums, totals=np.array([3.0, 3.0]), abs_totals=np.array([3.0, 3.0]))
    np.testing.assert_array_equal(residual, [0.0, 0.5])
    np.testing.assert_array_equal(ok, [True, False])


maps_and_grids = st.integers(1, 12).flatmap(lambda h: st.integers(1, 12).flatmap(lambda w: st.tuples(
    st.just(h), st.just(w), st.integers(1, h), st.integers(1, w), st.integers(0, 2**32 - 1))))


@settings(max_examples=60, deadline=None)
@given(maps_and_grids)
def test_any_grid_tiles_the_map_and_conserves(case):
    height, width, rows, cols, seed = case
    maps = np.random.default_rng(seed).standard_normal((3, height, width)).astype(np.float32) * 10
    regions = pools.grid(height, width, rows, cols)
    coverage = regions.mask_stack().sum(axis=0)
    assert (coverage == 1).all()  # every pixel in exactly one region
    sums = regions.sums(maps)
    totals = maps.sum(axis=(1, 2), dtype=np.float64)
    _, ok = pools.conservation(sums, totals, np.abs(maps).sum(axis=(1, 2), dtype=np.float64))
    assert ok.all()
    for r, mask in enumerate(regions.mask_stack()):  # each region is what its mask says
        np.testing.assert_allclose(sums[:, r], maps[:, mask].sum(axis=1, dtype=np.float64), rtol=1e-12, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10), st.integers(1, 10), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_any_disjoint_masks_conserve(height, width, n_labels, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels + 1, size=(height, width))  # label 0 is left to "rest"
    masks = {f"m{k}": labels == k for k in range(1, n_labels + 1)}
    regions = pools.from_masks(masks)
    maps = rng.standard_normal((2, height, width)).astype(np.float32)
    sums = regions.sums(maps)
    _, ok = pools.conservation(sums, maps.sum(axis=(1, 2), dtype=np.float64),
                               np.abs(maps).sum(axis=(1, 2), dtype=np.float64))
    assert ok.all()
    assert (regions.mask_stack().sum(axis=0) == 1).all()
