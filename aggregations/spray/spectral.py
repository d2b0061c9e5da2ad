"""Spectral embedding of the affinity graph and the eigengap choice of the number of clusters.

The symmetric normalised Laplacian L = I - D^-1/2 A D^-1/2 has one eigenvalue 0 per connected component;
k clearly separated groups of maps give k eigenvalues near 0 and then a jump (the eigengap). The
eigenvalues of L are 1 - those of D^-1/2 A D^-1/2, which is what CoRelAy decomposes (its
``EigenDecomposition`` returns 1 - eigenvalue): the smallest of L are computed with scipy's ``eigsh``
on the largest algebraic eigenvalues of D^-1/2 A D^-1/2, with a seeded start vector (deterministic);
small classes take a dense ``eigh``.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

DENSE_BELOW = 300  # rows: a dense eigh is faster and exact for small graphs


def normalised_adjacency(affinity: sp.csr_matrix) -> sp.csr_matrix:
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = sp.diags(1.0 / np.sqrt(degree))
    return (scale @ affinity @ scale).tocsr()


def embed(affinity: sp.csr_matrix, n_eigenvalues: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_eigenvalues`` smallest eigenvalues of L (ascending) and their eigenvectors (n, m)."""
    n = affinity.shape[0]
    m = min(n_eigenvalues, n - 1)
    adjacency = normalised_adjacency(affinity)
    if n < DENSE_BELOW:
        values, vectors = scipy.linalg.eigh(adjacency.toarray(), subset_by_index=(n - m, n - 1))
    else:
        start = np.random.default_rng(seed).uniform(-1, 1, n)
        values, vectors = eigsh(adjacency, k=m, which="LA", v0=start)
    order = np.argsort(-values, kind="stable")
    return 1.0 - values[order], vectors[:, order]


def eigengap(eigenvalues: np.ndarray, max_clusters: int) -> tuple[int, np.ndarray]:
    """K = argmax_k (lambda_{k+1} - lambda_k) over k = 1..max_clusters, and the gaps (index k-1 is gap k).

    A class with one strategy has its largest gap after the first eigenvalue (K = 1)."""
    gaps = np.diff(eigenvalues[: max_clusters + 1])
    if not len(gaps):
        return 1, gaps
    return int(np.argmax(gaps)) + 1, gaps


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row of the embedding scaled to length 1 (Ng, Jordan and Weiss 2001; CoRelAy's normalize=True)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
