"""SpRAy on one class: preprocessed maps -> kNN graph -> spectral embedding -> clusters -> statistics.

Everything here sees only the class's own rows, so memory is O(n (d + k + m)) for n rows, d grid
cells, k neighbours and m eigenvalues: about 10 MB for an ImageNet class (1,300 maps at 32x32).
"""
from __future__ import annotations

import time

import numpy as np

from aggregations.spray import affinity, clusters, embedding, preprocess, spectral, stats
from aggregations.spray.settings import SpraySettings


def choose_k(eigenvalues: np.ndarray, settings: SpraySettings, n: int) -> tuple[int, float, str]:
    """(K, the eigengap after K, how K was chosen).

    A given K is clamped to one less than the eigenvalues computed (min(n_eigenvalues, n - 1)): the eigengap
    after K needs eigenvalue K + 1, and more clusters than that gave NaN scores. It then reads
    ``given (clamped from K)``."""
    auto, _ = spectral.eigengap(eigenvalues, settings.max_clusters)
    if settings.clusters == "auto":
        k, chosen_by = auto, "eigengap"
    else:
        given = int(settings.clusters)
        k = max(1, min(given, n - 1, len(eigenvalues) - 1))
        chosen_by = "given" if k == given else f"given (clamped from {given})"
    gap = float(eigenvalues[k] - eigenvalues[k - 1]) if k < len(eigenvalues) else float("nan")
    return k, gap, chosen_by


def analyse(pooled: np.ndarray, rows: dict, geometry: stats.Geometry, settings: SpraySettings) -> dict:
    """SpRAy on one class's pooled maps (n, gy*gx) and its per-row metadata ``rows`` (numpy columns)."""
    clock = time.perf_counter()
    features = preprocess.normalise(pooled, settings.normalise)
    features = preprocess.reduce(features, settings.pca, settings.pca_method, settings.seed)
    indices, approximate = affinity.neighbours(features, settings.neighbors, settings.approximate_above, settings.seed)
    eigenvalues, vectors = spectral.embed(affinity.knn_affinity(indices), settings.n_eigenvalues, settings.seed)
    k, gap, chosen_by = choose_k(eigenvalues, settings, len(pooled))
    if settings.method == "hdbscan":
        # HDBSCAN finds its own number of clusters: give it room for up to max_clusters of them
        labels = clusters.cluster(spectral.unit_rows(vectors[:, :settings.max_clusters]), k, "hdbscan", settings.seed)
        chosen_by = "hdbscan"
    else:
        labels = clusters.cluster(spectral.unit_rows(vectors[:, :k]), k, settings.method, settings.seed)
    coordinates = embedding.embed_2d(features, settings.embedding, settings.seed)
    records, means, distance = stats.cluster_stats(labels, pooled, features, rows, geometry, settings)
    return {
        "labels": labels, "coordinates": coordinates, "spectral": vectors.astype(np.float32), "distance": distance,
        "eigenvalues": eigenvalues,
        "records": records, "means": means, "n_clusters": len(records), "eigengap": gap, "chosen_by": chosen_by,
        "split_score": stats.split_score(gap, records), "approximate_knn": approximate,
        "seconds": time.perf_counter() - clock,
    }
