"""Pictures for the HTML report: heatmaps, overlays and charts, each returned as a ``data:image/png`` URI.

Everything is embedded (base64 PNG) so the report is one self-contained file. Heatmaps use the
engine's colours (:func:`lrp.heatmap`: red positive, blue negative, white zero, symmetric scale);
overlays blend the same colours over a grey version of the image, so the eye finds the hot pixels on
the object (or off it). Charts use matplotlib's Agg backend: no display is needed.
"""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import lrp  # noqa: E402

DISPLAY_SIZE = 192  # small maps are enlarged (nearest neighbour) to about this many pixels
BOX_COLOUR = (0, 200, 0)  # object boxes
SPOT_COLOUR = (255, 170, 0)  # a flagged hot spot
POSITIVE, NEGATIVE = np.array([0.85, 0.0, 0.0]), np.array([0.0, 0.25, 0.95])
REGION_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def png_uri(image: np.ndarray | Image.Image) -> str:
    """A uint8 (H, W, 3) array or PIL image as a ``data:image/png;base64,...`` URI."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_uri(figure) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def robust_scale(relevance: np.ndarray, percentile: float = 99.5) -> float:
    """The |R| that maps to full colour: a high percentile, so a few extreme pixels do not wash out the map."""
    values = np.abs(np.asarray(relevance, np.float64))
    values = values[np.isfinite(values)]
    return float(np.percentile(values, percentile)) if values.size else 0.0


def _enlarge(image: np.ndarray) -> tuple[Image.Image, int]:
    height, width = image.shape[:2]
    factor = max(1, math.ceil(DISPLAY_SIZE / max(height, width)))
    picture = Image.fromarray(image)
    if factor > 1:
        picture = picture.resize((width * factor, height * factor), Image.NEAREST)
    return picture, factor


def _draw_boxes(picture: Image.Image, factor: int, boxes, colour) -> None:
    draw = ImageDraw.Draw(picture)
    for box in ([] if boxes is None else boxes):
        box = np.asarray(box, np.float64)
        if box.shape != (4,) or not np.isfinite(box).all():
            continue
        x0, y0, x1, y1 = box * factor
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=max(1, factor // 2))


def heatmap_uri(relevance: np.ndarray, scale: float | None = None, boxes=None, spot=None) -> str:
    """The relevance map alone, in the engine's colours, with optional object boxes and a spot box."""
    relevance = np.nan_to_num(np.asarray(relevance, np.float64))
    picture, factor = _enlarge(lrp.heatmap(relevance, scale=scale or robust_scale(relevance) or None))
    _draw_boxes(picture, factor, boxes, BOX_COLOUR)
    _draw_boxes(picture, factor, [spot] if spot is not None else None, SPOT_COLOUR)
    return png_uri(picture)


def overlay(image: np.ndarray | None, relevance: np.ndarray, scale: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3): relevance colours blended over a grey version of ``image`` (float [0, 1] RGB).

    Without an image (unreadable sources) the plain heatmap is returned.
    """
    relevance = np.nan_to_num(np.asarray(relevance, np.float64))
    scale = scale or robust_scale(relevance)
    if image is None:
        return lrp.heatmap(relevance, scale=scale or None)
    image = np.asarray(image, np.float64)
    grey = image.mean(axis=2, keepdims=True) * 0.8 + 0.1  # lighter and flatter: colours stay readable
    v = np.clip(relevance / scale, -1, 1)[..., None] if scale > 0 else np.zeros((*relevance.shape, 1))
    colour = np.where(v >= 0, POSITIVE, NEGATIVE)
    alpha = np.clip(np.abs(v), 0, 1) * 0.8
    return np.round(np.clip(grey * (1 - alpha) + colour * alpha, 0, 1) * 255).astype(np.uint8)


def overlay_uri(image: np.ndarray | None, relevance: np.ndarray, scale: float | None = None, boxes=None,
                spot=None) -> str:
    picture, factor = _enlarge(overlay(image, relevance, scale))
    _draw_boxes(picture, factor, boxes, BOX_COLOUR)
    _draw_boxes(picture, factor, [spot] if spot is not None else None, SPOT_COLOUR)
    return png_uri(picture)


def image_uri(image: np.ndarray, boxes=None, spot=None) -> str:
    """A float [0, 1] RGB image, enlarged like the maps, with optional boxes."""
    picture, factor = _enlarge(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    _draw_boxes(picture, factor, boxes, BOX_COLOUR)
    _draw_boxes(picture, factor, [spot] if spot is not None else None, SPOT_COLOUR)
    return png_uri(picture)


# ---- charts ---------------------------------------------------------------------------------------------

def plain_text(name: str) -> str:
    """A dataset string as matplotlib shows it literally: ``$`` would start mathtext (and can fail the figure)."""
    return str(name).replace("$", r"\$")


def _short(names: Sequence[str], width: int = 24) -> list[str]:
    return [plain_text(name if len(name) <= width else name[: width - 1] + "…") for name in names]


def pools_chart(class_names: Sequence[str], fractions: np.ndarray, region_names: Sequence[str],
                titles: Sequence[str] | None = None) -> str:
    """Grouped horizontal bars: per class, the share of its relevance pooled in each region.

    ``fractions`` is (panels, classes, regions): one panel per model or setting, side by side on a
    shared axis, so two models' pools compare at a glance. Shares of signed relevance sum to 1.
    """
    fractions = np.atleast_3d(np.asarray(fractions, np.float64))
    panels, n_classes, n_regions = fractions.shape
    height = 0.9 + 0.32 * n_classes * max(1, n_regions / 3)
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, height), sharey=True, squeeze=False)
    y = np.arange(n_classes)
    bar = 0.8 / n_regions
    finite = fractions[np.isfinite(fractions)]
    low, high = min(0.0, finite.min(initial=0.0)), max(1.0, finite.max(initial=1.0))
    for p, axis in enumerate(axes[0]):
        for r, region in enumerate(region_names):
            axis.barh(y - 0.4 + bar * (r + 0.5), np.nan_to_num(fractions[p, :, r]), height=bar,
                      color=REGION_COLOURS[r % len(REGION_COLOURS)], label=region)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlim(low - 0.05, high + 0.05)
        axis.set_yticks(y, _short(class_names))
        axis.invert_yaxis()
        axis.set_xlabel("share of the class's relevance")
        axis.grid(axis="x", alpha=0.3)
        if titles:
            axis.set_title(_short([titles[p]], 40)[0], fontsize=10)
    axes[0][-1].legend(loc="lower right", fontsize=8, frameon=True)
    figure.tight_layout()
    return figure_uri(figure)


def context_chart(class_names: Sequence[str], shares: np.ndarray, flagged: Sequence[bool], reference: float) -> str:
    """Bars: per class, the share of positive relevance outside the object; flagged classes in red."""
    shares = np.asarray(shares, np.float64)
    figure, axis = plt.subplots(figsize=(6.4, 0.9 + 0.3 * len(class_names)))
    y = np.arange(len(class_names))
    colours = ["#c0392b" if f else "#7f8c8d" for f in flagged]
    axis.barh(y, np.nan_to_num(shares), color=colours)
    if np.isfinite(reference):
        axis.axvline(reference, color="black", linestyle="--", linewidth=1, label=f"median {reference:.0%}")
        axis.legend(loc="lower right", fontsize=8)
    axis.set_xlim(0, 1)
    axis.set_yticks(y, _short(class_names))
    axis.invert_yaxis()
    axis.set_xlabel("share of positive relevance outside the object box")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure_uri(figure)


def residual_chart(residuals: dict[str, np.ndarray]) -> str | None:
    """Histogram per group of the relative conservation residual (sum_p R_p - f(x)) / |f(x)|."""
    residuals = {name: np.asarray(values, np.float64) for name, values in residuals.items()}
    residuals = {name: values[np.isfinite(values)] for name, values in residuals.items()}
    residuals = {name: values for name, values in residuals.items() if values.size}
    if not residuals:
        return None
    everything = np.concatenate(list(residuals.values()))
    low, high = np.percentile(everything, [0.5, 99.5])
    if not high > low:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 41)
    figure, axis = plt.subplots(figsize=(6.4, 2.8))
    for name, values in residuals.items():
        axis.hist(np.clip(values, low, high), bins=bins, histtype="step", linewidth=1.5, label=_short([name], 36)[0])
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("(sum of relevance − f(x)) / |f(x)|")
    axis.set_ylabel("explanations")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure_uri(figure)
