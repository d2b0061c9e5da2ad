"""The aggregate job: outputs and their layout, excluded rows, reruns, schedulers, the CLI, a pipeline run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from aggregations import run
from helpers.models import tiny_cnn
from helpers.stores import assert_tables_equal, make_store
from jobs.aggregate import main
from pipeline.store import STATUS_FAILED, STATUS_OK, STATUS_PENDING, open_store

REPO = Path(__file__).resolve().parents[1]
OK, FAILED, PENDING = STATUS_OK, STATUS_FAILED, STATUS_PENDING


@pytest.fixture
def mixed_store(tmp_path):
    """8 rows of 4x4 maps, two classes; row 2 failed (garbage relevance), row 3 NaN, row 7 still pending."""
    maps = np.stack([np.full((4, 4), float(i), np.float32) for i in range(8)])
    maps[2] = 1e6
    maps[3, 0, 0] = np.nan
    maps[:, 0, :] += 1.0  # the top row of pixels carries extra relevance: thirds are not all equal
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prediction = np.array([0, 1, 0, 0, 1, 1, 0, 1])
    output = maps.sum(axis=(1, 2), dtype=np.float64) - 1.0  # explanations that absorb 1 of each score
    url = make_store(tmp_path / "s.zarr", maps, target=target, prediction=prediction, output=output,
                     status=[OK, OK, FAILED, OK, OK, OK, OK, PENDING], class_names=["cat", "dog"])
    return url, maps, output


def test_failed_rows_are_excluded_and_counted(mixed_store, tmp_path):
    url, maps, output = mixed_store
    result = run.aggregate(url, tmp_path / "out")
    assert result.regions["row"].to_pylist() == [0, 1, 4, 5, 6]
    assert result.summary["groups"]["lrp"] == {"rows": 8, "ok": 5, "failed": 1, "nonfinite": 1, "pending": 1,
                                               "not_conserved": 0, "spot_checked_rows": 0}
    classes = {row["class_name"]: row for row in result.classes.to_pylist()}
    assert (classes["cat"]["n_ok"], classes["cat"]["n_failed"], classes["cat"]["n_nonfinite"]) == (2, 1, 1)
    assert (classes["dog"]["n_ok"], classes["dog"]["n_pending"]) == (3, 1)
    np.testing.assert_array_equal(result.heatmap("lrp", target=0), (maps[0] + maps[1]) / 2)
    np.testing.assert_array_equal(result.heatmap("lrp", target=1), (maps[4] + maps[5] + maps[6]) / 3)
    # correct / incorrect subsets: row 1 (cat predicted dog) and row 6 (dog predicted cat) are the mistakes
    np.testing.assert_array_equal(result.heatmap("lrp", "target_correct", target=0, correct=0), maps[1])
    np.testing.assert_array_equal(result.heatmap("lrp", "prediction", prediction=0), (maps[0] + maps[6]) / 2)
    assert result.heatmap("lrp", "label_target", label=1, target=1) is not None
    assert classes["cat"]["accuracy"] == 0.5 and classes["dog"]["n_correct"] == 2
    # sum_p E[R_p] = E[sum_p R_p], and E[f(x)] sits 1 below it
    total_cat = (maps[0].sum() + maps[1].sum()) / 2
    assert classes["cat"]["heatmap_sum"] == pytest.approx(total_cat, rel=1e-12)
    assert classes["cat"]["mean_score"] == pytest.approx(total_cat - 1, rel=1e-12)
    assert classes["cat"]["explanation_gap"] == pytest.approx(1.0)
    assert abs(classes["cat"]["aggregation_gap"]) < 1e-9


def test_region_pools_in_the_tables(mixed_store, tmp_path):
    url, maps, _ = mixed_store
    result = run.aggregate(url, tmp_path / "out", grid="2x1")
    regions = result.regions.to_pydict()
    # row 0: value 0 everywhere plus 1 on the top pixel row -> top half 4, bottom half 0
    assert (regions["region_top"][0], regions["region_bottom"][0]) == (4.0, 0.0)
    assert all(regions["conserved"])
    np.testing.assert_allclose(np.add(regions["region_top"], regions["region_bottom"]), regions["total"], rtol=1e-12)
    classes = {row["class_name"]: row for row in result.classes.to_pylist()}
    # cat: rows 0 and 1, top halves 4 + 12, totals 4 + 20 -> 16 / 24 of the relevance on top
    assert classes["cat"]["fraction_top"] == pytest.approx(16 / 24)
    assert classes["cat"]["fraction_top"] + classes["cat"]["fraction_bottom"] == pytest.approx(1.0)
    assert classes["cat"]["n_conserved"] == 2


def test_outputs_layout_and_rerun_gives_the_same_result(mixed_store, tmp_path, capsys):
    url, _, _ = mixed_store
    out = tmp_path / "out"
    assert main([url, "--out", str(out), "--grid", "2x2"]) == 0
    assert "5 of 8 rows aggregated" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["classes.parquet", "heatmaps.parquet", "heatmaps.zarr", "regions.parquet", "summary.json"]
    first = run.load(out)
    assert {"region_r0c0", "region_r1c1", "inside", "context_usage"} <= set(first.regions.column_names)
    expected = {"bias_score", "bias_rank", "flag", "reason", "context_share", "fraction_r0c1"}
    assert expected <= set(first.classes.column_names)
    mean = first.heatmaps["lrp/target"][...]
    assert mean.dtype == np.float64 and mean.shape == (2, 4, 4)
    assert main([url, "--out", str(out), "--grid", "2x2"]) == 0
    again = run.load(out)
    for name in ("regions", "classes", "heatmap_table"):
        assert_tables_equal(getattr(first, name), getattr(again, name))
    np.testing.assert_array_equal(again.heatmaps["lrp/target"][...], mean)
    assert json.loads((out / "summary.json").read_text()) == first.summary


def test_default_out_dir_is_beside_the_store(mixed_store):
    url, _, _ = mixed_store
    assert run.default_out_dir(url) == url[: -len(".zarr")] + ".aggregates"
    result = run.aggregate(url)
    assert Path(result.out_dir, "regions.parquet").exists()


def test_schedulers_give_the_same_result(mixed_store, tmp_path):
    from distributed import LocalCluster

    url, _, _ = mixed_store
    reference = run.aggregate(url, tmp_path / "threads")
    sync = run.aggregate(url, tmp_path / "sync", scheduler="sync")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        distributed = run.aggregate(url, tmp_path / "distributed", scheduler=cluster.scheduler_address)
    for other in (sync, distributed):
        assert_tables_equal(reference.regions, other.regions)
        assert_tables_equal(reference.classes, other.classes)


@pytest.mark.slow
def test_dask_on_ray_gives_the_same_result(ray_cluster, mixed_store, tmp_path):
    url, _, _ = mixed_store
    reference = run.aggregate(url, tmp_path / "threads")
    on_ray = run.aggregate(url, tmp_path / "ray", scheduler="ray")
    assert_tables_equal(reference.regions, on_ray.regions)
    assert_tables_equal(reference.classes, on_ray.classes)


def test_bad_input_says_what_to_fix(tmp_path, mixed_store, capsys):
    assert main([str(tmp_path / "missing.zarr")]) == 2
    assert "no relevance store" in capsys.readouterr().err
    url, _, _ = mixed_store
    assert main([url, "--grid", "three"]) == 2
    assert "ROWSxCOLS" in capsys.readouterr().err
    assert main([url, "--group", "nope"]) == 2
    assert "no explanation group" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown scheduler"):
        run.aggregate(url, tmp_path / "x", scheduler="fast")
    with pytest.raises(FileNotFoundError, match="lrp-audit aggregate"):
        run.load(tmp_path / "nothing")


def test_masks_file_defines_the_regions(mixed_store, tmp_path):
    url, maps, _ = mixed_store
    corner = np.zeros((4, 4), bool)
    corner[:2, :2] = True
    np.savez(tmp_path / "masks.npz", corner=corner)
    assert main([url, "--out", str(tmp_path / "out"), "--masks", str(tmp_path / "masks.npz")]) == 0
    regions = pq.read_table(tmp_path / "out" / "regions.parquet").to_pydict()
    assert regions["region_corner"][0] == 2.0  # row 0: the two top-left pixels of the top row hold 1 each
    assert regions["region_rest"][0] == 2.0


def test_a_memory_budget_splits_the_scan_into_passes_with_identical_outputs(tmp_path):
    """Many (target, label, prediction) groups and a budget a few maps wide: one pass per class, same bits."""
    import zarr

    from aggregations import views

    rng = np.random.default_rng(5)
    n = 90
    maps = rng.standard_normal((n, 8, 6)).astype(np.float32)
    target = rng.integers(0, 6, n)
    prediction = np.where(rng.random(n) < 0.5, target, rng.integers(0, 6, n))
    label = np.where(rng.random(n) < 0.8, target, rng.integers(0, 6, n))
    maps[(target == 4) & (label == 4), 6:, :2] += 4.0  # a corner cue on most of class 4
    boxes = np.tile(np.array([[1, 1, 5, 6]], np.float32), (n, 1))
    status = np.where(rng.random(n) < 0.1, FAILED, OK)
    url = make_store(tmp_path / "s.zarr", maps, target=target, label=label, prediction=prediction, boxes=boxes,
                     status=status, rows_per_shard=8)
    one = run.aggregate(url, tmp_path / "one", memory_budget=None)
    map_bytes = 8 * 6 * 8
    tight = run.aggregate(url, tmp_path / "tight", memory_budget=20 * map_bytes)
    assert one.seconds["lrp"]["passes"] == 1 and tight.seconds["lrp"]["passes"] == 6
    assert any(row["flagged"] for row in one.classes.to_pylist())
    for name in ("regions", "classes", "heatmap_table"):
        assert_tables_equal(getattr(one, name), getattr(tight, name))
    for view in one.summary["views"]:
        a, b = (zarr.open_group(str(path / "heatmaps.zarr"), mode="r")[f"lrp/{view}"] for path in
                (tmp_path / "one", tmp_path / "tight"))
        np.testing.assert_array_equal(a[...], b[...])
        assert a.attrs.asdict() == b.attrs.asdict()
    meta = tables_meta(url)
    budget = views.pass_bytes(meta, map_bytes, np.arange(6)) // 2  # half of what one pass holds
    blocks = views.plan_passes(meta, map_bytes, budget)
    assert 1 < len(blocks) < 6 and all(views.pass_bytes(meta, map_bytes, b) <= budget for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(6))


def tables_meta(url):
    from aggregations.tables import GroupMeta

    store = open_store(url)
    return GroupMeta.read(store.group("lrp"), store.class_names)


@pytest.mark.parametrize("geometry", ["boxes", "mask", "none"])
def test_the_one_pass_scan_agrees_with_the_separate_lazy_functions(geometry):
    import dask
    import dask.array as da

    from aggregations import context, pools, scan
    from helpers import reductions

    rng = np.random.default_rng(3)
    n, h, w = 11, 9, 7
    maps = rng.standard_normal((n, h, w)).astype(np.float32)
    boxes = rng.uniform(0, 7, (n, 2, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]  # two overlapping-or-not boxes per row
    boxes[0] = np.nan  # a row without an object
    boxes[1, 1] = np.nan  # a row with one box
    mask = context.box_mask(boxes, h, w)
    relevance = da.from_array(maps, chunks=(4, h, w))
    lazy_mask = da.from_array(mask, chunks=(4, h, w))
    keys = rng.integers(0, 3, (n, 2))
    select = rng.random(n) < 0.8
    classes = keys[:, 0]
    regions = pools.grid(h, w, 2, 3)
    result = scan.scan(relevance, boxes if geometry == "boxes" else None, lazy_mask if geometry == "mask" else None,
                       regions, keys, ("a", "b"), select, classes, select).compute()

    positive = reductions.positive(relevance)
    totals, positive_totals, region_sums, inside, maps_by_key, positive_by_class, outside_by_class = dask.compute(
        reductions.row_totals(relevance), reductions.row_totals(positive), reductions.region_sums(relevance, regions),
        reductions.inside_sums(relevance, lazy_mask), reductions.grouped_sums(relevance, keys, ["a", "b"], select),
        reductions.grouped_sums(positive, classes, ["target"], select),
        reductions.grouped_sums(da.where(lazy_mask, 0, positive), classes, ["target"], select))
    stats = result.stats[select]
    np.testing.assert_allclose(stats[:, 0], totals[select], rtol=1e-12)
    np.testing.assert_allclose(stats[:, 1], positive_totals[select], rtol=1e-12)
    np.testing.assert_allclose(stats[:, 5:], region_sums[select], rtol=1e-12, atol=1e-12)
    for mine, theirs in ((result.maps, maps_by_key), (result.positive, positive_by_class)):
        np.testing.assert_array_equal(mine.keys, theirs.keys)
        np.testing.assert_array_equal(mine.counts, theirs.counts)
        np.testing.assert_allclose(mine.sums, theirs.sums, rtol=1e-12, atol=1e-12)
    if geometry == "none":
        assert np.isnan(stats[:, 2:5]).all() and result.outside is None
    else:
        np.testing.assert_allclose(stats[:, 2:5], inside[select], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result.outside.sums, outside_by_class.sums, rtol=1e-12, atol=1e-12)


# ---- end to end from a pipeline run ------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_from_a_pipeline_run(ray_cluster, tmp_path):
    import torch

    from jobs.demo.synthetic import SyntheticSpec, generate
    from pipeline.config import config_from_dict
    from pipeline.run import run as explain

    data = generate(tmp_path / "data", SyntheticSpec(audit_per_class=4, image_size=32), splits=("audit",))
    torch.manual_seed(0)
    torch.save(tiny_cnn(5).state_dict(), tmp_path / "w.pt")
    store_path = tmp_path / "run.zarr"
    explain(config_from_dict({
        "dataset": {"source": str(data.manifests["audit"])},
        "model": {"factory": "tests.helpers.models:tiny_cnn", "weights": str(tmp_path / "w.pt"),
                  "kwargs": {"num_classes": 5}, "class_names": list(data.spec.classes)},
        "preprocess": {"resize": [32, 32]},
        "explanations": [{"composite": "epsilon", "epsilon": 1e-6}],
        "store": str(store_path), "batch_size": 4, "rows_per_shard": 8, "num_actors": 1, "progress": False,
    }))
    done = subprocess.run([sys.executable, "-m", "jobs.aggregate", str(store_path), "--out", str(tmp_path / "agg")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = run.load(tmp_path / "agg")

    store = open_store(str(store_path))
    (group_name,) = store.group_names
    group = store.group(group_name)
    rows = group.rows().to_pydict()
    relevance = group.relevance.compute().astype(np.float64)
    ok = np.array(rows["status"]) == STATUS_OK
    assert result.regions.num_rows == ok.sum() == 20
    regions = result.regions.to_pydict()
    # the store sums the full-precision maps, we sum the float32 ones
    np.testing.assert_allclose(regions["total"], np.array(rows["relevance_sum"])[ok], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(regions["score"], np.array(rows["output"])[ok])
    assert all(regions["conserved"]) and not np.isnan(regions["context_usage"]).any()  # boxes came through
    target = np.array(rows["target"])
    for c in range(5):
        expected = relevance[ok & (target == c)].mean(axis=0)
        np.testing.assert_allclose(result.heatmap(group_name, target=c), expected, rtol=1e-9, atol=1e-12)
    classes = result.classes.to_pydict()
    assert classes["class_name"] == list(data.spec.classes) and sum(classes["n_ok"]) == 20
    np.testing.assert_allclose(classes["aggregation_gap"], 0, atol=1e-9)
