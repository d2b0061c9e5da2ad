"""The options of a SpRAy run, in one place: the CLI, the Python API and the outputs' summary share them."""
from __future__ import annotations

from dataclasses import asdict, dataclass

NORMALISATIONS = ("positive", "l2", "none")
PCA_METHODS = ("randomized", "incremental")
METHODS = ("kmeans", "agglomerative", "hdbscan")
EMBEDDINGS = ("tsne", "umap", "none")


@dataclass(frozen=True)
class SpraySettings:
    """Defaults follow Lapuschkin et al. 2019 and CoRelAy where they say something (k = 10 neighbours).

    ``clusters`` is ``"auto"`` (eigengap, at most ``max_clusters``) or a fixed K; ``pca`` 0 keeps the
    pooled maps as they are; a class with fewer than ``min_rows`` ok rows is reported, not clustered;
    ``approximate_above`` rows switch the kNN search from exact (affinity.exact_neighbours) to pynndescent.
    The flag thresholds are described in docs/spray.md.
    """

    size: int = 32
    normalise: str = "positive"
    pca: int = 0
    pca_method: str = "randomized"
    neighbors: int = 10
    approximate_above: int = 20000
    n_eigenvalues: int = 32
    clusters: str | int = "auto"
    max_clusters: int = 10
    method: str = "kmeans"
    embedding: str = "tsne"
    prototypes: int = 8
    min_rows: int = 30
    seed: int = 0
    spot_cells: int = 3
    min_spot_share: float = 0.2
    spot_ratio: float = 3.0
    outside_threshold: float = 0.5
    outside_margin: float = 0.2

    def __post_init__(self):
        checks = [
            (self.size >= 1, f"size must be >= 1, not {self.size}"),
            (self.normalise in NORMALISATIONS, f"normalise must be one of {NORMALISATIONS}, not {self.normalise!r}"),
            (self.pca >= 0, f"pca must be >= 0 (0: off), not {self.pca}"),
            (self.pca_method in PCA_METHODS, f"pca_method must be one of {PCA_METHODS}, not {self.pca_method!r}"),
            (self.neighbors >= 1, f"neighbors must be >= 1, not {self.neighbors}"),
            (self.method in METHODS, f"method must be one of {METHODS}, not {self.method!r}"),
            (self.embedding in EMBEDDINGS, f"embedding must be one of {EMBEDDINGS}, not {self.embedding!r}"),
            (self.max_clusters >= 2, f"max_clusters must be >= 2, not {self.max_clusters}"),
            (self.min_rows > self.neighbors + 1, f"min_rows ({self.min_rows}) must exceed neighbors + 1"),
            (self.clusters == "auto" or (isinstance(self.clusters, int) and self.clusters >= 1),
             f"clusters must be 'auto' or an integer >= 1, not {self.clusters!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_clusters(text: str) -> str | int:
    """``"auto"`` or a positive integer, for the ``--clusters`` option."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--clusters takes 'auto' or an integer, not {text!r}") from None
    if value < 1:
        raise ValueError(f"--clusters must be >= 1, not {value}")
    return value
