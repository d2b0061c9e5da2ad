"""Class-average heatmaps: hand-computed means, regrouping, float64, aggregate conservation."""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from aggregations import heatmaps
from helpers import reductions


def constant_maps(values, height=2, width=3) -> np.ndarray:
    """Row i is a map filled with values[i]."""
    return np.asarray(values, np.float32)[:, None, None] * np.ones((1, height, width), np.float32)


def test_group_means_by_hand_across_chunks():
    maps = constant_maps([0, 1, 2, 3, 4, 5])
    keys = np.array([[0], [1], [0], [1], [1], [0]])  # not contiguous, and split over chunks of 4
    select = np.array([True, True, True, True, True, False])  # row 5 (a failed row) stays out
    result = reductions.grouped_sums(da.from_array(maps, chunks=(4, 2, 3)), keys, ["target"], select).compute()
    np.testing.assert_array_equal(result.keys, [[0], [1]])
    np.testing.assert_array_equal(result.counts, [2, 3])
    np.testing.assert_array_equal(result.means()[0], np.full((2, 3), (0 + 2) / 2))
    np.testing.assert_array_equal(result.means()[1], np.full((2, 3), (1 + 3 + 4) / 3))


def test_regroup_sums_finer_groups_and_drops_unknown_keys():
    maps = constant_maps([1, 2, 3, 4])
    keys = np.array([[0, 0], [0, 1], [1, 1], [1, -1]])  # (target, correct); -1 = unknown
    fine = reductions.grouped_sums(da.from_array(maps, chunks=2), keys, ["target", "correct"]).compute()
    by_target = fine.regroup(["target"])
    np.testing.assert_array_equal(by_target.counts, [2, 2])
    np.testing.assert_array_equal(by_target.means()[:, 0, 0], [1.5, 3.5])
    by_correct = fine.regroup(["correct"])  # the row with correct = -1 is in no group
    np.testing.assert_array_equal(by_correct.keys, [[0], [1]])
    np.testing.assert_array_equal(by_correct.counts, [1, 2])
    np.testing.assert_array_equal(by_correct.means()[:, 0, 0], [1.0, 2.5])


def test_means_accumulate_in_float64():
    # float32 accumulation: 2**24 + 1 == 2**24, the ones would be lost
    maps = constant_maps([2.0**24] + [1.0] * 999, 1, 1)
    result = reductions.grouped_sums(da.from_array(maps, chunks=100), np.zeros((1000, 1)), ["target"]).compute()
    assert result.sums[0, 0, 0] == 2.0**24 + 999


def test_unselected_chunks_are_never_read():
    good = da.from_array(constant_maps([1, 2]), chunks=2)

    def unreadable():
        raise AssertionError("a chunk without a selected row was read")

    bad = da.from_delayed(dask.delayed(unreadable)(), shape=(2, 2, 3), dtype=np.float32)
    maps = da.concatenate([good, bad])
    result = reductions.grouped_sums(maps, np.zeros((4, 1)), ["target"], select=np.array([1, 1, 0, 0], bool)).compute()
    np.testing.assert_array_equal(result.means()[0], np.full((2, 3), 1.5))


def test_no_selected_row_gives_no_group():
    maps = da.from_array(constant_maps([1, 2]), chunks=1)
    result = reductions.grouped_sums(maps, np.zeros((2, 1)), ["target"], select=np.zeros(2, bool)).compute()
    assert result.sums.shape == (0, 2, 3) and result.counts.shape == (0,)


def test_summary_reports_conservation_beside_the_mean_score():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((7, 4, 5)).astype(np.float32)
    keys = np.array([0, 0, 0, 1, 1, 1, 1])[:, None]
    totals = maps.sum(axis=(1, 2), dtype=np.float64)
    scores = totals - 0.5  # explanations that absorbed 0.5 of each score
    grouped = reductions.grouped_sums(da.from_array(maps, chunks=3), keys, ["target"]).compute()
    table = heatmaps.summary(grouped, keys, np.ones(7, bool), totals, scores).to_pydict()
    np.testing.assert_allclose(table["mean_total"], [totals[:3].mean(), totals[3:].mean()])
    np.testing.assert_allclose(table["heatmap_sum"], table["mean_total"], rtol=1e-12)  # sum_p E[R_p] = E[sum_p R_p]
    np.testing.assert_allclose(table["aggregation_gap"], 0, atol=1e-12)
    np.testing.assert_allclose(table["explanation_gap"], 0.5, rtol=1e-9)
    np.testing.assert_allclose(table["mean_score"], [scores[:3].mean(), scores[3:].mean()])


def test_key_columns_must_match_names():
    with pytest.raises(ValueError, match="key columns"):
        reductions.grouped_sums(da.zeros((2, 1, 1), chunks=1), np.zeros((2, 2)), ["target"])
