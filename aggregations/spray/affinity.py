"""The kNN affinity graph of SpRAy, the same as CoRelAy's ``SparseKNN(symmetric=True)``.

Each map links to its k nearest other maps (Euclidean) with weight 1; the graph is symmetrised as
(A + A^T) / 2, so mutual neighbours weigh 1 and one-sided ones 1/2. Exact search up to
``approximate_above`` rows (:func:`exact_neighbours`: float64 squared distances from one matrix product,
in row blocks of at most ``BLOCK_BYTES``), pynndescent above (a class of 20,000+ images, far beyond
ImageNet's 1,300).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

BLOCK_BYTES = 256 * 2**20  # the float64 distance block of the exact search: all n x n up to n = 5,792


def _drop_self(indices: np.ndarray, k: int) -> np.ndarray:
    """k+1 neighbours per row -> the k that are not the row itself (a duplicate may come first)."""
    n = len(indices)
    own = indices == np.arange(n)[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False  # the row itself was not returned: drop the farthest instead
    return indices[keep].reshape(n, k)


def smallest(distances: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of each row's k smallest values, nearest first, ties by column index.

    Selection without sorting or partitioning whole rows: the k-th smallest of every 8th column bounds the
    row's k-th smallest from above, so the values at or under that bound (a few dozen a row) hold the k
    smallest; only those are sorted."""
    n = len(distances)
    sample = distances[:, ::8]
    if sample.shape[1] > k:
        bound = np.partition(sample, k - 1, axis=1)[:, k - 1]
    else:
        bound = np.full(n, np.inf)
    rows, columns = np.nonzero(distances <= bound[:, None])
    order = np.lexsort((columns, distances[rows, columns], rows))
    rows, columns = rows[order], columns[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    return columns[rank < k].reshape(n, k)


def exact_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows: squared distances |x|^2 + |y|^2 - 2 x.y in float64,
    the formula and precision of scikit-learn's brute-force search, from one symmetric product (BLAS syrk,
    half a general product's work) when the n x n block fits ``BLOCK_BYTES``."""
    x = np.asarray(features, np.float64)
    n = len(x)
    squared = np.einsum("ij,ij->i", x, x)
    step = max(1, min(n, BLOCK_BYTES // (8 * n)))
    out = np.empty((n, k), np.int64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = x @ x.T if step == n else x[start:stop] @ x.T  # x @ x.T: numpy calls syrk
        block *= -2.0
        block += squared[None, :]
        block += squared[start:stop, None]
        block[np.arange(stop - start), np.arange(start, stop)] = np.inf  # never its own neighbour
        out[start:stop] = smallest(block, k)
    return out


def neighbours(features: np.ndarray, k: int, approximate_above: int, seed: int) -> tuple[np.ndarray, bool]:
    """(n, k) indices of each row's k nearest other rows, and whether the search was approximate."""
    n = len(features)
    k = min(k, n - 1)
    if n > approximate_above:
        from pynndescent import NNDescent

        index = NNDescent(features, n_neighbors=k + 1, metric="euclidean", random_state=seed, n_jobs=1)
        indices, _ = index.neighbor_graph
        return _drop_self(indices, k), True
    return exact_neighbours(features, k), False


def knn_affinity(indices: np.ndarray) -> sp.csr_matrix:
    """Binary kNN edges, symmetrised (A + A^T) / 2, as a sparse (n, n) float64 matrix."""
    n, k = indices.shape
    rows = np.repeat(np.arange(n), k)
    graph = sp.csr_matrix((np.ones(n * k), (rows, indices.ravel())), shape=(n, n))
    return ((graph + graph.T) / 2.0).tocsr()
