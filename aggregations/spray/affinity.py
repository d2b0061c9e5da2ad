"""The kNN affinity graph of SpRAy, the same as CoRelAy's ``SparseKNN(symmetric=True)``.

Each map links to its k nearest other maps (Euclidean) with weight 1; the graph is symmetrised as
(A + A^T) / 2, so mutual neighbours weigh 1 and one-sided ones 1/2. Exact search (scikit-learn,
brute force in blocks: memory O(n k), never the dense n x n distance matrix CoRelAy builds) up to
``approximate_above`` rows, pynndescent above (a class of 20,000+ images, far beyond ImageNet's 1,300).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _drop_self(indices: np.ndarray, k: int) -> np.ndarray:
    """k+1 neighbours per row -> the k that are not the row itself (a duplicate may come first)."""
    n = len(indices)
    own = indices == np.arange(n)[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False  # the row itself was not returned: drop the farthest instead
    return indices[keep].reshape(n, k)


def neighbours(features: np.ndarray, k: int, approximate_above: int, seed: int) -> tuple[np.ndarray, bool]:
    """(n, k) indices of each row's k nearest other rows, and whether the search was approximate."""
    n = len(features)
    k = min(k, n - 1)
    if n > approximate_above:
        from pynndescent import NNDescent

        index = NNDescent(features, n_neighbors=k + 1, metric="euclidean", random_state=seed, n_jobs=1)
        indices, _ = index.neighbor_graph
        return _drop_self(indices, k), True
    from sklearn.neighbors import NearestNeighbors

    search = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean", n_jobs=1).fit(features)
    indices = search.kneighbors(features, return_distance=False)
    return _drop_self(indices, k), False


def knn_affinity(indices: np.ndarray) -> sp.csr_matrix:
    """Binary kNN edges, symmetrised (A + A^T) / 2, as a sparse (n, n) float64 matrix."""
    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    graph = sp.csr_matrix((np.ones(n * k), (rows, indices.ravel())), shape=(n, n))
    return ((graph + graph.T) / 2.0).tocsr()
