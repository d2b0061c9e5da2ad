"""Spectral Relevance Analysis (SpRAy, Lapuschkin et al. 2019) over the classes of a relevance store.

``spray(store)`` in run.py; one concept per module: settings, read (the store pass), preprocess,
affinity, spectral, clusters, embedding, stats (cluster statistics and flags), analysis (one class),
tables (outputs). Documented in docs/spray.md.
"""
from aggregations.spray.run import RunOptions, SprayResult, load, spray
from aggregations.spray.settings import SpraySettings

__all__ = ["RunOptions", "SprayResult", "SpraySettings", "load", "spray"]
