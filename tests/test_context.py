"""Box and mask pooling: the pixel convention, inside/total by hand, per-class distributions."""
from __future__ import annotations

import dask.array as da
import numpy as np

from aggregations import context, run
from helpers import reductions
from helpers.stores import make_store


def test_box_mask_pixel_convention():
    # x0=1, y0=2, x1=3, y1=5: columns 1..2, rows 2..4; the NaN row is padding
    mask = context.box_mask(np.array([[[1, 2, 3, 5], [np.nan] * 4]]), 6, 6)[0]
    expected = np.zeros((6, 6), bool)
    expected[2:5, 1:3] = True
    np.testing.assert_array_equal(mask, expected)
    # fractional corners: a pixel is inside when its centre is; two boxes form a union
    mask = context.box_mask(np.array([[[0.4, 0, 1.6, 1], [4, 4, 6, 6]]]), 6, 6)[0]
    assert mask[0, 0] and mask[0, 1] and not mask[0, 2] and mask[5, 5] and mask.sum() == 2 + 4


def test_inside_sums_by_hand():
    block = np.full((2, 4, 4), -0.5, np.float32)
    block[0, :2, :2] = 2.0  # row 0: inside 4 * 2 = 8, outside 12 * -0.5 = -6
    block[1, :2, :2] = -1.0  # row 1: inside -4, positive inside 0
    inside = context.box_mask(np.array([[[0, 0, 2, 2]], [[0, 0, 2, 2]]]), 4, 4)
    sums = reductions.inside_sums(da.from_array(block, chunks=1), da.from_array(inside, chunks=1)).compute()
    np.testing.assert_array_equal(sums, [[8.0, 8.0, 0.25], [-4.0, 0.0, 0.25]])


def test_lazy_object_mask_from_boxes_or_masks():
    like = da.zeros((3, 4, 4), chunks=(2, 4, 4))
    boxes = np.array([[[0, 0, 1, 1]], [[np.nan] * 4], [[2, 2, 4, 4]]])
    mask = reductions.object_mask(boxes, None, like)
    assert mask.chunks == like.chunks
    np.testing.assert_array_equal(mask.compute().sum(axis=(1, 2)), [1, 0, 4])
    given = da.ones((3, 4, 4), dtype=bool, chunks=1)
    assert reductions.object_mask(boxes, given, like).compute().all()  # a store's masks win over its boxes
    assert reductions.object_mask(None, None, like) is None


def test_ratio_and_distribution():
    np.testing.assert_array_equal(context.ratio([1.0, 1.0], [4.0, 0.0]), [0.25, np.nan])
    values = np.array([0.1, 0.2, 0.3, 0.4, np.nan, 1.0])
    table = context.distribution(values, np.array([0, 0, 0, 0, 0, 1]), "share").to_pydict()
    assert table["group"] == [0, 1] and table["share_n"] == [4, 1]
    np.testing.assert_allclose(table["share_mean"], [0.25, 1.0])
    np.testing.assert_allclose(table["share_q50"], [0.25, 1.0])
    np.testing.assert_allclose(table["share_q10"][0], np.quantile([0.1, 0.2, 0.3, 0.4], 0.1))


def test_context_usage_in_the_aggregate_tables(tmp_path):
    # 4 rows of 4x4 maps, object box = top-left quadrant; inside and outside values chosen per row
    inside_values, outside_values = [2.0, 1.0, 0.5, -1.0], [0.0, 1.0, -0.5, 1.0]
    maps = np.empty((4, 4, 4), np.float32)
    for i, (a, b) in enumerate(zip(inside_values, outside_values)):
        maps[i] = b
        maps[i, :2, :2] = a
    url = make_store(tmp_path / "s.zarr", maps, target=[0, 0, 1, 1], boxes=np.tile([0, 0, 2, 2], (4, 1)))
    result = run.aggregate(url, tmp_path / "out")
    regions = result.regions.to_pydict()
    inside = [4 * a for a in inside_values]
    total = [4 * a + 12 * b for a, b in zip(inside_values, outside_values)]
    np.testing.assert_allclose(regions["inside"], inside)
    np.testing.assert_allclose(regions["total"], total)
    np.testing.assert_allclose(regions["context_usage"], np.array(inside) / np.array(total))  # 8/8, 4/16, 2/-4, -4/8
    positive_inside = [max(a, 0) * 4 for a in inside_values]
    positive_total = [max(a, 0) * 4 + max(b, 0) * 12 for a, b in zip(inside_values, outside_values)]
    np.testing.assert_allclose(regions["inside_share_positive"], np.array(positive_inside) / np.array(positive_total))
    np.testing.assert_allclose(regions["object_area"], 0.25)
    classes = result.classes.to_pydict()
    np.testing.assert_allclose(classes["inside_share_positive_mean"], [(1 + 0.25) / 2, (1 + 0) / 2])
    np.testing.assert_allclose(classes["context_share"], [1 - 0.625, 1 - 0.5])
    np.testing.assert_allclose(classes["context_usage_mean"], [(1 + 0.25) / 2, (-0.5 + -0.5) / 2])


def test_store_masks_define_the_object(tmp_path):
    maps = np.ones((3, 4, 4), np.float32)
    mask = np.zeros((3, 4, 4), bool)
    mask[:, 0, :] = True  # the first row of pixels: a quarter of the map
    url = make_store(tmp_path / "m.zarr", maps, target=[0, 0, 0], mask=mask, rows_per_shard=2)
    regions = run.aggregate(url, tmp_path / "out").regions.to_pydict()
    np.testing.assert_allclose(regions["inside"], 4.0)
    np.testing.assert_allclose(regions["context_usage"], 0.25)


def test_rows_without_boxes_have_no_context_measure(tmp_path):
    maps = np.ones((2, 4, 4), np.float32)
    boxes = np.array([[0, 0, 2, 2], [np.nan] * 4])
    url = make_store(tmp_path / "s.zarr", maps, target=[0, 0], boxes=boxes, rows_per_shard=2)
    regions = run.aggregate(url, tmp_path / "out").regions.to_pydict()
    assert regions["context_usage"][0] == 0.25 and np.isnan(regions["context_usage"][1])


def test_box_windows_equal_box_window_row_by_row():
    """The scan's vectorized windows against the per-row function: edges, clipping, NaN padding, several boxes."""
    from aggregations.context import box_window, box_windows

    rng = np.random.default_rng(5)
    boxes = rng.uniform(-20, 60, (400, 3, 4))
    boxes[:, :, 2:] = boxes[:, :, :2] + rng.uniform(-5, 30, (400, 3, 2))  # some empty (x1 <= x0), some off the map
    boxes[rng.random((400, 3)) < 0.5] = np.nan  # rows with 0, 1, 2 or 3 boxes
    boxes[:20] = np.round(boxes[:20])  # on pixel edges
    boxes[20:40] = np.floor(boxes[20:40]) + 0.5  # on pixel centres
    got, counts = box_windows(boxes, 40, 50), set()
    for row, window in zip(boxes, got):
        expected = box_window(row, 40, 50)
        counts.add(int(np.isfinite(row).all(axis=1).sum()))
        if expected is None:
            assert window is None
            continue
        assert window[:2] == expected[:2]
        assert (window[2] is None) == (expected[2] is None)
        if expected[2] is not None:
            np.testing.assert_array_equal(window[2], expected[2])
    assert counts == {0, 1, 2, 3} and any(w is None for w in got)
    assert any(w is not None and w[2] is not None for w in got)  # a union of boxes that is not its whole window
    assert box_windows(np.zeros((0, 1, 4)), 40, 50) == []
