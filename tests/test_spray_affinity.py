"""The exact kNN search of SpRAy's affinity graph, against scikit-learn and scipy's direct distances."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import cdist
from sklearn.neighbors import NearestNeighbors

from aggregations.spray import affinity


def sklearn_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """What the search replaced: scikit-learn's brute force, the row itself dropped."""
    search = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(features)
    return affinity._drop_self(search.kneighbors(features, return_distance=False), k)


def assert_k_nearest(features: np.ndarray, indices: np.ndarray, k: int) -> None:
    """Each row's neighbours are k other rows, nearest first, at the k smallest distances scipy computes directly
    (sqrt of summed squares, not the |x|^2 + |y|^2 - 2 x.y the search uses): tie-proof, a different formula."""
    n = len(features)
    direct = cdist(features.astype(np.float64), features.astype(np.float64))
    np.fill_diagonal(direct, np.inf)
    assert indices.shape == (n, k) and (indices != np.arange(n)[:, None]).all()
    assert all(len(set(row)) == k for row in indices)
    found = np.take_along_axis(direct, indices, axis=1)
    np.testing.assert_allclose(found, np.sort(direct, axis=1)[:, :k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n,d", [(40, 16), (300, 64), (1200, 1024)])
def test_same_neighbours_as_scikit_learn(n, d):
    features = np.random.default_rng(n).random((n, d)).astype(np.float32)
    features /= features.sum(axis=1, keepdims=True)  # as SpRAy's positive normalisation leaves them
    ours = affinity.exact_neighbours(features, 10)
    np.testing.assert_array_equal(ours, sklearn_neighbours(features, 10))
    assert_k_nearest(features, ours, 10)


def test_row_blocks_give_the_same_neighbours(monkeypatch):
    """Above ``BLOCK_BYTES`` the distances come in row blocks (a general product each): the same answer."""
    features = np.random.default_rng(1).normal(size=(500, 32)).astype(np.float32)
    whole = affinity.exact_neighbours(features, 10)
    monkeypatch.setattr(affinity, "BLOCK_BYTES", 8 * 500 * 37)  # blocks of 37 rows, the last one short
    np.testing.assert_array_equal(affinity.exact_neighbours(features, 10), whole)


def test_duplicates_and_ties_are_deterministic():
    """Exact duplicates (distance 0, a duplicate may sort before the row itself) and equal distances on a lattice:
    never the row itself, ties broken by row index."""
    base = np.random.default_rng(2).integers(0, 3, (30, 4)).astype(np.float32)  # many equal distances
    features = np.concatenate([base, base, base[:5]])
    ours = affinity.exact_neighbours(features, 6)
    assert_k_nearest(features, ours, 6)
    np.testing.assert_array_equal(ours, affinity.exact_neighbours(features, 6))
    direct = cdist(features, features)
    np.fill_diagonal(direct, np.inf)
    for row, found in zip(direct, ours):
        expected = np.lexsort((np.arange(len(row)), row))[:6]
        np.testing.assert_array_equal(found, expected)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(12, 90), d=st.integers(1, 40), k=st.integers(1, 11), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_k_nearest_on_random_data(n, d, k, seed, scale):
    k = min(k, n - 1)
    features = (np.random.default_rng(seed).normal(size=(n, d)) * scale).astype(np.float32)
    assert_k_nearest(features, affinity.exact_neighbours(features, k), k)


def test_nonfinite_features_and_too_many_neighbours_are_refused():
    features = np.random.default_rng(3).random((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="k must be between 1 and 19"):
        affinity.exact_neighbours(features, 20)
    features[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        affinity.exact_neighbours(features, 3)
