"""The kNN affinity graph of SpRAy, the same as CoRelAy's ``SparseKNN(symmetric=True)``.

Each map links to its k nearest other maps (Euclidean) with weight 1; the graph is symmetrised as
(A + A^T) / 2, so mutual neighbours weigh 1 and one-sided ones 1/2. Exact search up to
``approximate_above`` rows (:func:`exact_neighbours`: float64 squared distances from one matrix product,
in row blocks of at most ``BLOCK_BYTES``), pynndescent above (a class of 20,000+ images, far beyond
ImageNet's 1,300).
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp

BLOCK_BYTES = 256 * 2**20  # the float64 Gram block of the exact search: all n x n up to n = 5,792


def _drop_self(indices: np.ndarray, k: int) -> np.ndarray:
    """k+1 neighbours per row -> the k that are not the row itself (a duplicate may come first)."""
    n = len(indices)
    own = indices == np.arange(n)[:, None]
    keep = ~own
    keep[~own.any(axis=1), -1] = False  # the row itself was not returned: drop the farthest instead
    return indices[keep].reshape(n, k)


def _select_rows(gram: np.ndarray, squared: np.ndarray, offset: int, k: int, out: np.ndarray) -> None:
    """Rows ``offset + r`` of the distances |x_i|^2 + |x_j|^2 - 2 x_i.x_j from their Gram rows ``gram[r]``: the k
    smallest, the row itself left out, ties by column index, into ``out[r]`` nearest first.

    One pass over each row with a sorted list of the k best so far (a value enters only when it beats the k-th),
    so the n x n distances are never formed: compiled by numba (:func:`_kernel`); the float64 operations and their
    order are numpy's ``(-2 g + |x_j|^2) + |x_i|^2``, so the distances are bit for bit the formula's."""
    rows, n = gram.shape
    best_d = np.empty(k)
    best_j = np.empty(k, np.int64)
    for r in range(rows):
        i = r + offset
        count, worst = 0, np.inf
        for j in range(n):
            if j == i:
                continue
            d = gram[r, j] * -2.0 + squared[j] + squared[i]
            if count == k and not d < worst:  # a tie with the k-th loses: its column is larger
                continue
            p = count if count < k else k - 1
            while p > 0 and best_d[p - 1] > d:  # equal values keep their place before it (smaller columns)
                if p < k:
                    best_d[p], best_j[p] = best_d[p - 1], best_j[p - 1]
                p -= 1
            best_d[p], best_j[p] = d, j
            count = min(count + 1, k)
            worst = best_d[k - 1] if count == k else np.inf
        out[r] = best_j


@functools.cache
def _kernel():
    """:func:`_select_rows` compiled without the GIL (two Dask threads run two classes), cached on disk by numba where
    it finds a writable cache folder (beside the source or the user's), else compiled in each process."""
    import numba

    try:
        compiled = numba.njit(nogil=True, cache=True)(_select_rows)
        compiled.compile("(float64[:, ::1], float64[::1], int64, int64, int64[:, ::1])")
    except RuntimeError as error:  # "cannot cache function ...: no locator available" (a read-only install)
        if "cannot cache" not in str(error):
            raise
        compiled = numba.njit(nogil=True)(_select_rows)
    return compiled


def exact_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows, nearest first, ties by row index: squared distances
    |x|^2 + |y|^2 - 2 x.y in float64, the formula and precision of scikit-learn's brute-force search, from one
    symmetric product (BLAS syrk, half a general product's work) when the n x n Gram block fits ``BLOCK_BYTES``,
    selected by a compiled pass over the block (:func:`_select_rows`)."""
    x = np.asarray(features, np.float64)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k = {k} nearest other rows asked of {n} rows: k must be between 1 and {n - 1}")
    if not np.isfinite(x).all():
        raise ValueError("the features hold NaN or infinite values: no distance order among them")
    squared = np.einsum("ij,ij->i", x, x)
    step = max(1, min(n, BLOCK_BYTES // (8 * n)))
    out = np.empty((n, k), np.int64)
    select = _kernel()
    for start in range(0, n, step):
        stop = min(n, start + step)
        gram = x @ x.T if step == n else x[start:stop] @ x.T  # x @ x.T: numpy calls syrk
        select(gram, squared, start, k, out[start:stop])
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
