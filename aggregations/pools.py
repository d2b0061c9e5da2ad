"""Region pooling of relevance maps, the coarse decomposition of Binder et al. (2016, §2).

LRP relevance is conservative, so pooling pixels into regions keeps it:
``f(x) = sum_R [f(x)]_R`` whenever the regions tile the map. Every :class:`Regions` here is such a
tiling (a grid, or masks plus the uncovered rest), and :func:`conservation` checks the sums against
an independently reduced total, per row.

All functions over a relevance array are lazy (Dask) and accumulate in float64: float32 sums over
the ~50k pixels of a map lose digits that matter once the sums are averaged over a dataset.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Named layouts for the common one-axis splits; any other grid is named r<row>c<col>.
_ROW_NAMES = {3: ("top", "middle", "bottom"), 2: ("top", "bottom")}
_COL_NAMES = {3: ("left", "center", "right"), 2: ("left", "right")}


@dataclass(frozen=True, eq=False)
class Regions:
    """Named regions that tile an (H, W) map: a rows x cols grid, or disjoint masks plus the rest."""

    names: tuple[str, ...]
    height: int
    width: int
    row_edges: tuple[int, ...] | None = None  # grid: region (i, j) = rows [e_i, e_i+1) x cols [c_j, c_j+1)
    col_edges: tuple[int, ...] | None = None
    masks: np.ndarray | None = None  # (R, H, W) bool, disjoint and covering, for any other layout

    def sums(self, block: np.ndarray) -> np.ndarray:
        """(n, H, W) relevance -> (n, R) float64 region sums."""
        block = np.asarray(block)
        if block.shape[1:] != (self.height, self.width):
            raise ValueError(f"regions are for {self.height}x{self.width} maps, got maps of {block.shape[1:]}")
        if self.masks is None:
            if len(self.col_edges) == 2:  # horizontal bands: plain row sums are faster than reduceat
                by_cols = block.sum(axis=2, dtype=np.float64)[:, :, None]
            else:
                by_cols = np.add.reduceat(block, self.col_edges[:-1], axis=2, dtype=np.float64)
            by_cells = np.add.reduceat(by_cols, self.row_edges[:-1], axis=1)
            return by_cells.reshape(block.shape[0], -1)
        flat = block.reshape(block.shape[0], -1)
        return np.stack(
            [flat[:, mask].sum(axis=1, dtype=np.float64) for mask in self.masks.reshape(len(self.names), -1)],
            axis=1,
        )

    def mask_stack(self) -> np.ndarray:
        """The regions as an (R, H, W) bool stack (for drawing them, or pooling aggregate maps)."""
        if self.masks is not None:
            return self.masks
        stack = np.zeros((len(self.names), self.height, self.width), dtype=bool)
        for i, (y0, y1) in enumerate(zip(self.row_edges[:-1], self.row_edges[1:])):
            for j, (x0, x1) in enumerate(zip(self.col_edges[:-1], self.col_edges[1:])):
                stack[i * (len(self.col_edges) - 1) + j, y0:y1, x0:x1] = True
        return stack

    def describe(self) -> dict:
        """A JSON-able description, kept in the outputs so a reader knows what each region was."""
        if self.masks is not None:
            return {"kind": "masks", "names": list(self.names), "height": self.height, "width": self.width}
        return {"kind": "grid", "names": list(self.names), "height": self.height, "width": self.width,
                "row_edges": list(self.row_edges), "col_edges": list(self.col_edges)}


def _edges(size: int, parts: int) -> tuple[int, ...]:
    return tuple(int(e) for e in (np.arange(parts + 1) * size) // parts)


def grid(height: int, width: int, rows: int = 3, cols: int = 1) -> Regions:
    """A rows x cols grid; cell edges at ``floor(i * size / parts)``. The default is the paper's thirds."""
    if not (1 <= rows <= height and 1 <= cols <= width):
        raise ValueError(f"a {rows}x{cols} grid does not fit a {height}x{width} map: "
                         f"use 1..{height} rows, 1..{width} cols")
    if cols == 1 and rows in _ROW_NAMES:
        names = _ROW_NAMES[rows]
    elif rows == 1 and cols in _COL_NAMES:
        names = _COL_NAMES[cols]
    else:
        names = tuple(f"r{i}c{j}" for i in range(rows) for j in range(cols))
    return Regions(names, height, width, row_edges=_edges(height, rows), col_edges=_edges(width, cols))


def thirds(height: int, width: int) -> Regions:
    """Top, middle and bottom thirds (Binder et al. 2016, Fig. 1)."""
    return grid(height, width, 3, 1)


def parse_grid(spec: str) -> tuple[int, int]:
    """``"3x1"`` -> (3 rows, 1 column)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"grid {spec!r} is not ROWSxCOLS with positive numbers, e.g. '3x1' (thirds) or '4x4'")
    return int(match[1]), int(match[2])


def from_masks(masks: Mapping[str, np.ndarray], rest: str = "rest") -> Regions:
    """Arbitrary disjoint masks; pixels in none of them form the region ``rest``, so the pools still tile."""
    if not masks:
        raise ValueError("give at least one mask")
    names = [str(name) for name in masks]
    stack = np.stack([np.asarray(mask, dtype=bool) for mask in masks.values()])
    if stack.ndim != 3:
        raise ValueError(f"masks must be (H, W) boolean maps, got shape {stack.shape[1:]}")
    overlap = stack.sum(axis=0) > 1
    if overlap.any():
        y, x = np.argwhere(overlap)[0]
        raise ValueError(f"masks overlap (first at pixel y={y}, x={x}): a pixel in two regions breaks conservation")
    uncovered = ~stack.any(axis=0)
    if uncovered.any():
        if rest in names:
            raise ValueError(f"a mask is named {rest!r}, the name of the uncovered rest: rename it")
        names.append(rest)
        stack = np.concatenate([stack, uncovered[None]])
    return Regions(tuple(names), stack.shape[1], stack.shape[2], masks=stack)


# ---- conservation ------------------------------------------------------------------------------------------

def conservation(sums: np.ndarray, totals: np.ndarray, abs_totals: np.ndarray,
                 rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (sum of regions - total, whether that is within rounding of float64 sums).

    ``abs_totals`` (sum of |R|) scales the tolerance: rounding grows with the magnitudes summed,
    not with the (possibly cancelling) total.
    """
    residual = np.asarray(sums, np.float64).sum(axis=1) - np.asarray(totals, np.float64)
    scale = np.asarray(abs_totals, np.float64)
    return residual, np.abs(residual) <= rtol * scale + 1e-12
