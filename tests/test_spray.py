"""SpRAy on constructed stores with a known answer, and against CoRelAy's SpRAy as an oracle."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from aggregations.spray import RunOptions, SpraySettings, affinity, load, preprocess, spectral, spray
from jobs import cli
from tests.helpers.stores import assert_tables_equal, make_store

SIZE = 64  # map pixels; pooled to 32x32 (2x2-pixel cells)
QUIET = RunOptions(progress=False)


def planted_maps(n: int, corner: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus an object in the middle; rows with ``corner`` get a stamp in the top-left corner instead.
    Each map is scaled by a random score (which the normalisation removes): what varies within a pattern
    is noise only, not a 1-D family of stamp strengths (which a kNN graph would see as a chain to cut)."""
    maps = rng.normal(0, 0.02, (n, SIZE, SIZE)).astype(np.float32)
    maps[~corner, 24:40, 24:40] += 1.0
    maps[corner, 4:10, 4:10] += 3.0
    return maps * rng.uniform(0.5, 2.0, (n, 1, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Class 0: 60 rows, every other one stamped; class 1: 60 rows, one pattern; class 2: 10 rows (too small).
    Rows are interleaved across shards; two rows of class 0 failed, one is nonfinite."""
    rng = np.random.default_rng(7)
    target = np.array([0, 1] * 60 + [2] * 10)
    corner = np.zeros(len(target), bool)
    corner[np.flatnonzero(target == 0)[::2]] = True
    maps = planted_maps(len(target), corner, rng)
    status = np.ones(len(target), np.int8)
    status[[2, 4]] = 2
    maps[6, 0, 0] = np.nan  # written as ok: the store marks it nonfinite
    boxes = np.tile([24.0, 24.0, 40.0, 40.0], (len(target), 1))
    path = make_store(tmp_path_factory.mktemp("spray") / "planted.zarr", maps, target=target, status=status,
                      boxes=boxes, rows_per_shard=16)
    return {"url": path, "target": target, "corner": corner, "maps": maps}


@pytest.fixture(scope="module")
def result(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("spray-out")
    return spray(planted["url"], str(out), settings=SpraySettings(embedding="none"), options=QUIET)


def test_two_planted_patterns_give_two_clusters(planted, result):
    rows = result.assignments.filter(result.assignments["target"].to_numpy() == 0).to_pydict()
    assert len(rows["row"]) == 57  # 60 rows less 2 failed and 1 nonfinite
    assert 6 not in rows["row"] and 2 not in rows["row"]
    assert adjusted_rand_score(planted["corner"][rows["row"]], rows["cluster"]) == 1.0
    classes = {r["target"]: r for r in result.classes.to_pylist()}
    assert classes[0]["n_clusters"] == 2 and classes[0]["chosen_by"] == "eigengap"
    assert (classes[0]["n_failed"], classes[0]["n_nonfinite"], classes[0]["n_ok"]) == (2, 1, 57)
    assert classes[0]["split_rank"] == 1 and classes[0]["split_score"] > classes[1]["split_score"]


def test_one_pattern_gives_one_cluster(result):
    classes = {r["target"]: r for r in result.classes.to_pylist()}
    assert classes[1]["n_clusters"] == 1 and classes[1]["split_score"] == 0.0
    rows = result.assignments.filter(result.assignments["target"].to_numpy() == 1)
    assert set(rows["cluster"].to_pylist()) == {0}


def test_small_class_reported_not_clustered(result):
    classes = {r["target"]: r for r in result.classes.to_pylist()}
    assert classes[2]["status"] == "too_small" and classes[2]["n_ok"] == 10 and classes[2]["split_rank"] == -1
    assert 2 not in result.assignments["target"].to_pylist()
    assert 2 not in result.clusters["target"].to_pylist()


def test_stamp_cluster_is_flagged_with_place_and_outside(planted, result):
    clusters = [r for r in result.clusters.to_pylist() if r["target"] == 0]
    stamped = {r["cluster"] for r in result.assignments.to_pylist()
               if r["target"] == 0 and planted["corner"][r["row"]]}
    (stamp,) = [r for r in clusters if r["cluster"] in stamped]
    (plain,) = [r for r in clusters if r["cluster"] not in stamped]
    assert stamp["flag"] == "spot+outside", stamp["reason"]
    assert stamp["spot_x0"] <= 6 < stamp["spot_x1"] and stamp["spot_y0"] <= 6 < stamp["spot_y1"]
    assert stamp["outside_share_positive"] > 0.8 and plain["outside_share_positive"] < 0.5
    assert 4 <= stamp["peak_x"] <= 10 and 4 <= stamp["peak_y"] <= 10
    assert not any(r["flagged"] for r in result.clusters.to_pylist() if r["target"] == 1)
    # prototypes are the cluster's own rows, nearest to its mean first
    rows = {r["row"]: r for r in result.assignments.to_pylist()}
    distances = [rows[p]["distance"] for p in stamp["prototype_rows"]]
    assert all(planted["corner"][p] for p in stamp["prototype_rows"]) and distances == sorted(distances)


def test_mean_heatmaps_and_eigenvalues_in_zarr(planted, result):
    """Cluster means are sum-pooled means: each adds up to the mean total relevance of its rows."""
    rows = result.assignments.filter(result.assignments["target"].to_numpy() == 0).to_pydict()
    for cluster in (0, 1):
        members = [r for r, c in zip(rows["row"], rows["cluster"]) if c == cluster]
        mean = result.cluster_mean(planted_group(result), 0, cluster)
        assert mean.shape == (32, 32)
        expected = planted["maps"][members].reshape(len(members), 32, 2, 32, 2).sum(axis=(2, 4)).mean(axis=0)
        np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    values = result.eigenvalues(planted_group(result), 0)
    assert len(values) == 32 and np.all(np.diff(values) >= -1e-12) and abs(values[0]) < 1e-9
    assert values[1] < 0.05 < values[2]  # two components (almost): two eigenvalues near 0, then the gap


def planted_group(result):
    return result.assignments["group"][0].as_py()


def test_same_store_same_clusters(planted, result, tmp_path):
    again = spray(planted["url"], str(tmp_path), settings=SpraySettings(embedding="none"),
                  options=RunOptions(progress=False, scheduler="sync"))
    assert_tables_equal(again.assignments, result.assignments)
    assert_tables_equal(again.clusters, result.clusters)
    reread = load(str(tmp_path))
    assert_tables_equal(reread.clusters, result.clusters)
    assert reread.summary["settings"]["neighbors"] == 10


def test_processes_scheduler_gives_the_same_clusters(planted, result, tmp_path):
    """Pool tasks and class tasks in other processes: the scratch files and the compiled kNN selection work there."""
    again = spray(planted["url"], str(tmp_path), settings=SpraySettings(embedding="none"),
                  options=RunOptions(progress=False, scheduler="processes", num_workers=2))
    assert_tables_equal(again.assignments, result.assignments)
    assert_tables_equal(again.clusters, result.clusters)


@pytest.mark.slow  # pynndescent compiles with numba on first use: a minute or more here
def test_approximate_neighbours_match_the_exact_search(planted, tmp_path):
    """Above ``approximate_above`` rows pynndescent replaces the exact search: it finds the same neighbours."""
    rows = np.flatnonzero(planted["target"] == 1)
    features = preprocess.normalise(preprocess.sum_pool(planted["maps"][rows], 32).reshape(len(rows), -1), "positive")
    approximate, used = affinity.neighbours(features, 10, approximate_above=40, seed=0)
    exact, _ = affinity.neighbours(features, 10, approximate_above=10_000, seed=0)
    assert used and approximate.shape == exact.shape == (len(rows), 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.95 and not (approximate == np.arange(len(rows))[:, None]).any()
    out = spray(planted["url"], str(tmp_path), classes=[0],
                settings=SpraySettings(embedding="none", approximate_above=40),
                options=QUIET)
    assert out.classes["approximate_knn"][0].as_py() and out.classes["n_clusters"][0].as_py() >= 2


@pytest.mark.parametrize("method", ["agglomerative", "hdbscan"])
def test_other_clusterings_find_the_plant(planted, tmp_path, method):
    out = spray(planted["url"], str(tmp_path), classes=[0], settings=SpraySettings(embedding="none", method=method),
                options=QUIET)
    rows = out.assignments.to_pydict()
    assert adjusted_rand_score(planted["corner"][rows["row"]], rows["cluster"]) == 1.0


def test_tsne_coordinates_and_given_k(planted, tmp_path):
    out = spray(planted["url"], str(tmp_path), classes=[1], settings=SpraySettings(clusters=3, pca=8), options=QUIET)
    rows = out.assignments.to_pydict()
    assert np.isfinite(rows["x"]).all() and np.isfinite(rows["y"]).all()
    assert sorted(set(rows["cluster"])) == [0, 1, 2] and out.classes["chosen_by"][0].as_py() == "given"


def test_cli_writes_the_outputs_and_refuses_bad_input(planted, tmp_path, capsys):
    out = tmp_path / "agg"
    assert cli.main(["spray", planted["url"], "--out", str(out), "--embedding", "none", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "class 0 (class0): split rank 1, 2 clusters" in printed and "flagged" in printed
    assert "class 2 (class2): too_small" in printed
    assignments = pq.read_table(out / "spray" / "assignments.parquet")
    assert {"row", "sample_id", "path", "target", "label", "prediction", "cluster", "x", "y",
            "distance"} <= set(assignments.column_names)
    summary = json.loads((out / "spray" / "summary.json").read_text())
    assert summary["groups"]["lrp"] == {"clustered": 2, "too_small": 1, "no_rows": 0}
    assert cli.main(["spray", planted["url"], "--group", "nope"]) == 2
    assert "no explanation group" in capsys.readouterr().err
    assert cli.main(["spray", planted["url"], "--classes", "9"]) == 2
    assert "unknown class" in capsys.readouterr().err
    assert cli.main(["spray", planted["url"], "--min-rows", "5"]) == 2  # must exceed neighbours + 1
    with pytest.raises(SystemExit):
        cli.main(["spray", planted["url"], "--clusters", "many"])


# ---- CoRelAy as the oracle ------------------------------------------------------------------------------

def test_same_eigenvalues_and_partition_as_corelay(planted):
    """CoRelAy's SpRAy (pdist -> SparseKNN -> SymmetricNormalLaplacian -> EigenDecomposition -> KMeans) on the
    same preprocessed maps: the same affinity, eigenvalues to 1e-6 relative and the same partition."""
    corelay_affinity = pytest.importorskip("corelay.processor.affinity")
    from corelay.processor.clustering import KMeans
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.laplacian import SymmetricNormalLaplacian

    rows = np.flatnonzero((planted["target"] == 0) & np.isfinite(planted["maps"]).all(axis=(1, 2)))
    pooled = preprocess.sum_pool(planted["maps"][rows], 32).reshape(len(rows), -1)
    features = preprocess.normalise(pooled, "positive").astype(np.float64)
    indices, _ = affinity.neighbours(features, 10, 10_000, 0)
    ours = affinity.knn_affinity(indices)
    theirs = corelay_affinity.SparseKNN(n_neighbors=10, symmetric=True)(SciPyPDist(metric="euclidean")(features))
    assert abs(ours - theirs).max() == 0
    values, vectors = spectral.embed(ours, 8, seed=0)
    laplacian = SymmetricNormalLaplacian()(theirs)
    their_values, their_vectors = EigenDecomposition(n_eigval=8, which="LA")(laplacian)
    np.testing.assert_allclose(values, np.sort(their_values), rtol=1e-6, atol=1e-9)
    # CoRelAy's default 'LM' also returns the far end of the spectrum (1 - lambda > 1): the rest is the same
    default_values, _ = EigenDecomposition(n_eigval=8)(laplacian)
    low = np.sort(default_values[default_values < 1])
    np.testing.assert_allclose(values[: len(low)], low, rtol=1e-6, atol=1e-9)
    k, _ = spectral.eigengap(values, 10)
    assert k == 2
    from aggregations.spray.clusters import cluster

    ours_labels = cluster(spectral.unit_rows(vectors[:, :k]), k, "kmeans", seed=0)
    # CoRelAy's k-means on its own eigenvectors, K of them (its pipeline with n_eigval = K), rows unit length
    _, their_vectors = EigenDecomposition(n_eigval=k, which="LA")(laplacian)
    their_labels = KMeans(n_clusters=k, kwargs={"n_init": 10, "random_state": 0})(their_vectors)
    assert adjusted_rand_score(ours_labels, their_labels) == 1.0
    assert adjusted_rand_score(ours_labels, planted["corner"][rows]) == 1.0


def test_aggregate_and_spray_keep_each_others_outputs(planted, tmp_path):
    """Both jobs write into STORE.aggregates; neither may erase what the other wrote, in either order."""
    from aggregations.run import aggregate
    from aggregations.run import load as load_aggregates

    out = str(tmp_path)
    first = spray(planted["url"], out, classes=[0], settings=SpraySettings(embedding="none"), options=QUIET)
    expected = first.cluster_mean("lrp", 0, 0)
    aggregate(planted["url"], out)  # rewrites heatmaps.zarr from scratch
    again = load(out)
    np.testing.assert_array_equal(again.cluster_mean("lrp", 0, 0), expected)
    assert len(again.eigenvalues("lrp", 0)) == 32
    spray(planted["url"], out, classes=[1], settings=SpraySettings(embedding="none"), options=QUIET)
    assert load_aggregates(out).heatmap("lrp", target=0) is not None  # and SpRAy leaves the aggregates alone
    assert load(out).cluster_mean("lrp", 0, 0) is None  # a rerun replaces the previous SpRAy run as a whole


def test_spectral_embedding_is_kept_per_row(planted, result):
    """The eigenvectors of each clustered row are kept (the ViRelAy export needs them), aligned with its rows."""
    rows, vectors = result.spectral("lrp", 0)
    assignments = result.assignments.filter(result.assignments["target"].to_numpy() == 0)
    np.testing.assert_array_equal(rows, assignments["row"].to_numpy())
    assert vectors.shape == (57, 32) and np.isfinite(vectors).all()
    # the first K = 2 unit-length eigenvector rows separate the plant: one direction per cluster
    unit = spectral.unit_rows(vectors[:, :2])
    labels = assignments["cluster"].to_numpy()
    assert np.abs(unit[labels == 0].mean(axis=0) @ unit[labels == 1].mean(axis=0)) < 0.2
    assert result.spectral("lrp", 2) is None  # too small: not clustered


def test_aggregate_can_chain_spray(planted, tmp_path, capsys):
    out = tmp_path / "agg"
    assert cli.main(["aggregate", planted["url"], "--out", str(out), "--spray", "--scheduler", "sync"]) == 0
    printed = capsys.readouterr().out
    assert "class 0 (class0): split rank 1, 2 clusters" in printed
    assert (out / "summary.json").exists() and load(str(out)).cluster_mean("lrp", 0, 0) is not None
