"""Dask aggregations over a relevance store: class heatmaps, region pools, context usage, bias flags."""
