"""Joining store and output locations: local paths and fsspec URLs (``s3://bucket/run``) alike."""
from __future__ import annotations


def join_url(base: str, *names: str) -> str:
    """``base`` with ``names`` appended, one ``/`` between each (``os.path.join`` would break URLs on Windows)."""
    out = str(base).rstrip("/")
    for name in names:
        out = f"{out}/{name}"
    return out


def beside(store_url: str, suffix: str) -> str:
    """``runs/voc.zarr`` -> ``runs/voc<suffix>``: where a store's aggregates, evaluation or report go by default."""
    base = str(store_url).rstrip("/")
    return base.removesuffix(".zarr") + suffix
