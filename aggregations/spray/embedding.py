"""The 2-D picture of a class's maps: t-SNE (openTSNE, else scikit-learn) or UMAP (umap-learn).

It is for looking only (the clusters come from the spectral embedding), computed on the same
preprocessed maps; seeded, so reruns draw the same picture.
"""
from __future__ import annotations

import numpy as np


def _tsne(features: np.ndarray, seed: int) -> np.ndarray:
    perplexity = float(min(30.0, (len(features) - 1) / 3.0))
    try:
        from openTSNE import TSNE
    except ImportError:
        from sklearn.manifold import TSNE as SkTSNE

        return SkTSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    model = TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=1, verbose=False)
    return np.asarray(model.fit(features))


def _umap(features: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap
    except ImportError as error:
        raise ValueError("--embedding umap needs umap-learn: pip install umap-learn (or use tsne / none)") from error
    neighbours = min(15, len(features) - 1)
    return umap.UMAP(n_neighbors=neighbours, min_dist=0.1, random_state=seed).fit_transform(features)


def embed_2d(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, 2) float64 coordinates; NaN for ``none``."""
    if method == "none":
        return np.full((len(features), 2), np.nan)
    if method == "tsne":
        return np.asarray(_tsne(features, seed), np.float64)
    if method == "umap":
        return np.asarray(_umap(features, seed), np.float64)
    raise ValueError(f"unknown embedding {method!r}: use tsne, umap or none")
