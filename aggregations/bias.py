"""Bias flags: classes a model recognises by a cue outside the object, or by the context.

Binder et al. (2016, §4.1, after Lapuschkin et al. 2016) found a Fisher-vector classifier that
recognised horses by a copyright tag in a corner of many horse images, and boats by the water. Both
show in aggregates: the tag as a small hot spot of the class-average heatmap outside the object, the
water as a large share of relevance outside the boat boxes. This module turns both into scores, flags
and evidence (see docs/aggregates.md for the definitions and defaults):

- spot (the tag): on the class's mean map of positive relevance outside the object, the connected hot
  spot around its peak (after subtracting what the other classes put there). It qualifies when its box
  covers at most ``max_area`` of the map, holds at least ``min_spot_share`` of the class's positive
  relevance, and is ``min_concentration`` times denser than uniform (share / area). Qualifying spots are
  checked on every image of the class (a second, selective read):
  ``cue_score = spot_share * image_fraction``, flagged when ``image_fraction >= min_image_fraction``.
- context (the water): ``context_share`` = mean over the class's images of the share of positive
  relevance outside the object; ``context_score = context_share - median over the other classes``,
  flagged when it is at least ``context_margin`` and ``context_share >= context_threshold``.
- ``bias_score = max(cue_score, context_score)`` ranks the classes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import dask
import numpy as np
from dask.delayed import Delayed

from aggregations.context import box_mask
from aggregations.heatmaps import GroupedMaps


@dataclass(frozen=True)
class BiasSettings:
    """Thresholds of the flags; all shares are of positive relevance, areas of the map."""

    max_area: float = 0.1  # a cue is small: its box covers at most this fraction of the map
    min_spot_share: float = 0.1  # ... and holds at least this share of the class's positive relevance
    min_concentration: float = 5.0  # ... at least this many times its share of the area (uniform relevance: 1)
    min_image_share: float = 0.2  # an image shows the cue when this share of its positive relevance is in the spot
    min_image_fraction: float = 0.25  # flag a cue shown by at least this fraction of the class's images
    context_threshold: float = 0.5  # flag context when most positive relevance lies outside the object ...
    context_margin: float = 0.2  # ... and this much more than in the median other class
    peak_fraction: float = 0.5  # the spot: connected pixels at least this fraction of the peak
    min_images: int = 3  # classes with fewer images are not judged
    top_images: int = 5  # evidence: this many images that show the cue most

    def __post_init__(self):
        """Refuse a setting outside its range, naming it and its ``lrp-audit aggregate`` option, before any work."""
        def name(field: str) -> str:
            return f"{field} (--{field.replace('_', '-')})"
        if not 0 < self.peak_fraction <= 1:  # NaN too
            raise ValueError(f"{name('peak_fraction')} is a fraction of the peak, in (0, 1], not {self.peak_fraction}")
        for field in ("max_area", "min_image_share", "min_image_fraction", "context_threshold"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(f"{name(field)} is a fraction, in [0, 1], not {getattr(self, field)}")
        for field in ("min_images", "top_images"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name(field)} must be >= 0, not {getattr(self, field)}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Spot:
    """A hot spot of one class: box (x0, y0, x1, y1) in map pixels (x1, y1 exclusive), area fraction, share."""

    box: tuple[int, int, int, int]
    area: float
    share: float  # of the class's mean positive relevance, inside the box and outside the object
    qualifies: bool  # small and strong enough to be checked on every image


def _smooth(image: np.ndarray, size: int) -> np.ndarray:
    """Box filter (mean over a size x size window, edge-padded), so a spot is found by its mass, not one pixel."""
    if size <= 1:
        return image
    pad = size // 2
    padded = np.pad(image, ((pad, size - 1 - pad), (pad, size - 1 - pad)), mode="edge")
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    window = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    return window / size**2


def _component(above: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``above`` that contains ``seed`` (grown by repeated dilation)."""
    component = np.zeros_like(above)
    component[seed] = True
    while True:
        grown = component.copy()
        grown[1:] |= component[:-1]
        grown[:-1] |= component[1:]
        grown[:, 1:] |= component[:, :-1]
        grown[:, :-1] |= component[:, 1:]
        grown &= above
        if (grown == component).all():
            return component
        component = grown


def find_spot(share_map: np.ndarray, reference: np.ndarray | None,
              settings: BiasSettings = BiasSettings()) -> Spot | None:
    """The hot spot of one class.

    ``share_map`` (H, W): the class's mean positive relevance outside the object divided by its mean
    positive total (it sums to the share outside the object). ``reference``: the same, averaged over
    the other classes; what every class puts somewhere (a centre bias) is not a class's cue.
    """
    share_map = np.asarray(share_map, np.float64)
    excess = share_map if reference is None else np.maximum(share_map - reference, 0)
    if not np.isfinite(excess).all() or excess.max() <= 0:
        return None
    height, width = excess.shape
    smooth = _smooth(excess, max(3, min(height, width) // 64))  # >= 3 px: a stamp is one spot, not its brightest glyph
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    component = _component(smooth >= settings.peak_fraction * smooth[peak], peak)
    ys, xs = np.nonzero(component)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    area = (x1 - x0) * (y1 - y0) / (height * width)
    share = float(share_map[y0:y1, x0:x1].sum())
    qualifies = (area <= settings.max_area and share >= settings.min_spot_share
                 and share >= settings.min_concentration * area)
    return Spot((x0, y0, x1, y1), area, share, qualifies)


def find_spots(positive: GroupedMaps, outside: GroupedMaps | None,
               settings: BiasSettings = BiasSettings()) -> dict[int, Spot | None]:
    """Per class with at least ``min_images`` images: its spot (:func:`find_spot`), against the mean of the
    other classes' share maps. ``positive``/``outside``: summed R+ and R+ outside the object per class
    (the same classes, in the same order); without ``outside`` all of R+ counts as outside."""
    return spots_of(share_maps(positive, outside, settings), settings)


def share_maps(positive: GroupedMaps, outside: GroupedMaps | None, settings: BiasSettings = BiasSettings()) -> dict:
    """Per class with at least ``min_images`` images and positive mass: R+ outside the object / sum R+ (H, W)."""
    outside = positive if outside is None else outside
    shares = {}
    for key, positive_sum, outside_sum, count in zip(positive.keys[:, 0], positive.sums, outside.sums, positive.counts):
        mass = positive_sum.sum()
        if count >= settings.min_images and mass > 0:
            shares[int(key)] = outside_sum / mass
    return shares


def spots_of(shares: dict, settings: BiasSettings = BiasSettings()) -> dict[int, Spot | None]:
    """Each class's spot from its share map, against the mean share map of the other classes (in class order)."""
    if not shares:
        return {}
    shares = dict(sorted(shares.items()))
    total = np.sum(list(shares.values()), axis=0)
    others = len(shares) - 1
    return {c: find_spot(share_map, (total - share_map) / others if others else None, settings)
            for c, share_map in shares.items()}


def _spot_batch(read_rows: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, spot_boxes: np.ndarray,
                object_boxes: np.ndarray | None, read_mask: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    maps = read_rows(rows)
    _, height, width = maps.shape
    inside = read_mask(rows) if read_mask is not None else \
        None if object_boxes is None else box_mask(object_boxes, height, width)
    out = np.empty(len(rows))
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(spot_boxes, int)):
        window = np.maximum(maps[i, y0:y1, x0:x1], 0)
        if inside is not None:
            window = np.where(inside[i, y0:y1, x0:x1], 0, window)
        out[i] = window.sum(dtype=np.float64)
    return out


def spot_sums(read_rows: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, spot_boxes: np.ndarray,
              object_boxes: np.ndarray | None = None, read_mask: Callable[[np.ndarray], np.ndarray] | None = None,
              batch: int = 256) -> Delayed:
    """Lazy (M,) positive relevance outside the object inside each row's spot box (x0, y0, x1, y1).

    The selective second read: ``read_rows(indices) -> (n, H, W)`` reads just those rows (the
    store's zarr inner chunks are single rows), ``batch`` rows per task, in row order. The object is
    ``read_mask(indices)`` when given, else ``object_boxes`` (M, K, 4), else unknown (nothing removed).
    """
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    parts = []
    for start in range(0, len(rows), batch):
        picked = order[start:start + batch]
        parts.append(dask.delayed(_spot_batch, pure=True)(
            read_rows, rows[picked], np.asarray(spot_boxes)[picked],
            None if object_boxes is None else np.asarray(object_boxes)[picked], read_mask))
    return dask.delayed(_unsort, pure=True)(parts, order)


def _unsort(parts: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    out = np.empty(len(order))
    out[order] = np.concatenate(parts) if parts else np.zeros(0)
    return out


def context_scores(context_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: (context_share - median of the other classes' shares, that median); NaN without others."""
    context_share = np.asarray(context_share, np.float64)
    score, reference = np.full(len(context_share), np.nan), np.full(len(context_share), np.nan)
    for c in np.flatnonzero(np.isfinite(context_share)):
        others = np.delete(context_share, c)
        others = others[np.isfinite(others)]
        if others.size:
            reference[c] = np.median(others)
            score[c] = context_share[c] - reference[c]
    return score, reference


def judge(spot: Spot | None, image_shares: np.ndarray, context_share: float, context_score: float,
          context_reference: float, n_images: int, settings: BiasSettings = BiasSettings(),
          objects_known: bool = True) -> dict:
    """Scores, flag and a one-line reason for one class.

    ``image_shares``: per image of the class, the share of its positive relevance in the spot (outside
    the object); empty when the spot did not qualify for the check. Without object geometry
    (``objects_known=False``) a spot may be where the class's objects usually are, and the reason says so.
    Many parameters because: each is one measured number of the class, from three places (spot, image
    shares, context scores); the verdict is a pure function of them, testable without a store.
    """
    image_shares = np.asarray(image_shares, np.float64)
    shown = int((image_shares >= settings.min_image_share).sum())
    fraction = shown / n_images if n_images and image_shares.size else np.nan
    cue_score = spot.share * fraction if spot is not None and spot.qualifies and np.isfinite(fraction) else 0.0
    cue = bool(spot is not None and spot.qualifies and fraction >= settings.min_image_fraction)
    context = bool(np.isfinite(context_score) and context_score >= settings.context_margin
                   and context_share >= settings.context_threshold)
    score = max(cue_score, context_score if np.isfinite(context_score) else 0.0, 0.0)

    reasons = []
    if n_images < settings.min_images:  # no scores either: an unjudged class must not outrank a flagged one
        reasons.append(f"not judged: {n_images} image(s), fewer than {settings.min_images}")
        cue = context = False
        cue_score = score = 0.0
    if cue:
        x0, y0, x1, y1 = spot.box
        reasons.append(
            f"cue: {spot.share:.0%} of the class's positive relevance lies in a {x1 - x0}x{y1 - y0} px spot "
            f"at x {x0}..{x1 - 1}, y {y0}..{y1 - 1} "
            f"{'outside the object' if objects_known else '(no object boxes: it may be where the objects are)'}; "
            f"{shown} of {n_images} images "
            f"({fraction:.0%}) put at least {settings.min_image_share:.0%} of their positive relevance there")
    if context:
        reasons.append(f"context: {context_share:.0%} of the positive relevance lies outside the object "
                       f"(median of the other classes {context_reference:.0%})")
    if not reasons:
        why = ["no hot spot outside the object"] if spot is None else []
        if spot is not None and not spot.qualifies:
            why.append(f"hot spot covers {spot.area:.1%} of the map and holds {spot.share:.0%} of the relevance, "
                       f"{spot.share / spot.area:.1f}x denser than uniform (a cue: at most {settings.max_area:.0%} "
                       f"of the map, at least {settings.min_spot_share:.0%}, {settings.min_concentration:g}x)")
        elif spot is not None:
            why.append(f"hot spot shown by {fraction:.0%} of the images (< {settings.min_image_fraction:.0%})")
        if np.isfinite(context_share):
            why.append(f"{context_share:.0%} of the positive relevance outside the object")
        reasons.append("not flagged: " + "; ".join(why))
    flag = "+".join(name for name, on in (("cue", cue), ("context", context)) if on)
    return {"cue_score": float(cue_score), "context_score": float(context_score), "bias_score": float(score),
            "flag": flag, "flagged": bool(flag), "reason": "; ".join(reasons),
            "spot_images": shown if image_shares.size else -1, "spot_image_fraction": float(fraction)}
