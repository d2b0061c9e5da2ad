"""Render a relevance map as an RGB image: red for positive, blue for negative, white for zero.

The colour scale is symmetric around zero (so white always means "no relevance") and clipped at a high percentile of
|R| so that a few extreme pixels do not wash out the rest of the map.
"""
from __future__ import annotations

import numpy as np
import torch


def heatmap(relevance, percentile: float = 99.5, scale: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3) image of a relevance map of shape (H, W) or (C, H, W) (channels are summed).

    ``scale``: the |R| that maps to full colour (default: the ``percentile`` of the finite |R|). Pixels that are NaN
    or infinite are grey.
    """
    if isinstance(relevance, torch.Tensor):
        r = relevance.detach().cpu().double().numpy()
    else:
        r = np.asarray(relevance, float)
    if r.ndim == 3:
        r = r.sum(0)
    if r.ndim != 2:
        raise ValueError(f"heatmap expects a (H, W) or (C, H, W) map, got shape {r.shape}")
    bad = ~np.isfinite(r)
    if scale is None:
        finite = np.abs(r[~bad])
        scale = float(np.percentile(finite, percentile)) if finite.size else 0.0
    v = np.clip(np.where(bad, 0.0, r) / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(r)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1.0 - neg, 1.0 - pos - neg, 1.0 - pos], axis=-1)
    rgb[bad] = 0.5  # NaN or infinite pixels in grey, not white ("no relevance"), and not taken into the scale
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
