"""Clustering the spectral embedding: k-means (default), agglomerative (Ward) or HDBSCAN.

HDBSCAN needs clusters of at least max(10, n / 20) rows. Labels are made canonical (0 = the largest cluster, ties by the first row), so the same store and
options give the same numbers whatever order the algorithm found the clusters in.
"""
from __future__ import annotations

import numpy as np


def canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by size (largest first), ties by their first row; noise (-1) stays -1."""
    found = [c for c in np.unique(labels) if c >= 0]
    order = sorted(found, key=lambda c: (-int((labels == c).sum()), int(np.flatnonzero(labels == c)[0])))
    out = np.full(len(labels), -1, np.int64)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def cluster(embedding: np.ndarray, k: int, method: str, seed: int) -> np.ndarray:
    """Cluster labels (canonical) of the rows of ``embedding``; HDBSCAN picks its own number and marks
    noise -1, the others make exactly ``k`` clusters (k = 1: one cluster, nothing to compute)."""
    n = len(embedding)
    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        labels = HDBSCAN(min_cluster_size=max(10, n // 20), copy=True).fit_predict(embedding)
        return canonical(labels)
    if k <= 1:
        return np.zeros(n, np.int64)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        return canonical(AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(embedding))
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return canonical(KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embedding))
    raise ValueError(f"unknown clustering method {method!r}: use kmeans, agglomerative or hdbscan")
