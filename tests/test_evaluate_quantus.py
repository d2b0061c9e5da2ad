"""Region perturbation (pipeline/perturbation.py) and AOPC (aggregations/aopc.py) against quantus's
``RegionPerturbation`` metric (a dev dependency, used as a test oracle only), in float64.

Where the two define the same computation: an (H, W) image whose sides are multiples of the region size, cut into
non-overlapping ``p x p`` squares on a grid anchored at the top-left; each region scored by the sum of the
attribution over its pixels and channels (ours: ``score_map(relevance, "sum")`` then the region sum; quantus: the
sum over the (C, p, p) block of the map, a (B, H, W) map being broadcast over the channels first); regions perturbed
cumulatively, most relevant first, every channel of a region replaced by one constant (our ``constant`` with
``value``, quantus's numeric ``perturb_baseline``); f the target's logit (quantus ``softmax=False``) or softmax
probability (our ``score="softmax"``, quantus ``softmax=True``). Then quantus's score of image i after k regions,
``f(x) - f(x^(k))`` for k = 1..L, is our ``curve[i, 0] - curve[i, k]``, and our AOPC, 1/(L+1) sum_{k=0..L} of those
declines, follows from quantus's scores with a zero prepended.

Settings: quantus ``normalise=False`` (its default, dividing by the max |a|, is a positive scale that cannot
reorder the regions; one case keeps it on), ``abs=False``, ``order="morf"``, baseline 0.25; attributions are
standard normal draws, so no two region sums tie. quantus hands the model ``torch.Tensor(x)``, which is float32
whatever the input: the model is wrapped to cast back to float64, and inputs (float32 draws) and baseline are
float32-representable, so the cast loses nothing and both sides evaluate the same float64 model on the same images.
Measured (quantus 0.6.0, torch 2.14.1 CPU, numpy 2.4): max |difference| 0.0 (bit-identical) for the curves,
the per-image AOPC and the mean AOPC; the tolerance is 1e-12 absolute.

Different by design (not compared here):

- sizes that are not multiples of the region size: quantus pads the image by floor/ceil((p - H % p) / 2) on each
  side (attributions with zeros, the image with edge values, then crops), so its grid is shifted and both border
  rows/columns are partial; ours keeps the grid at the top-left with smaller regions at the bottom/right border
  (10 x 10 with p = 4: the curves differ by up to 0.017 logits on this model);
- ties: quantus orders by ``np.argsort(-sums)`` (unstable: tie order is numpy's); ours breaks ties by the seeded
  per-image random order, so flat maps do not start at the top-left corner;
- quantus returns the declines for k = 1..L only and no AOPC: its ``get_auc_score`` is the trapezoid area of the
  declines (sum - (d_1 + d_L) / 2, not divided by L + 1), and it calls ``np.trapz``, removed in numpy 2.4, so it
  raises AttributeError here;
- replacements other than a constant: quantus's ``uniform`` draws one value per region and image from the global
  numpy RNG, its ``mean``/``black``/``white`` are one scalar over all channels; ours draws per-pixel noise seeded by
  ``(seed, sample_id)``, and ``mean`` is per channel;
- quantus silently evaluates min(regions_evaluation, regions) steps; ours refuses more steps than regions;
- quantus's ``random`` order comes from the global numpy RNG, ours from ``(seed, sample_id)``.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from aggregations.aopc import aopc_per_row, summarize
from helpers.models import tiny_cnn
from pipeline.perturbation import PerturbationSpec, RegionPerturbation, score_map

quantus = pytest.importorskip("quantus")

BASELINE = 0.25  # float32-representable: quantus's float32 cast of the perturbed image is exact
TOLERANCE = 1e-12


class Float64(nn.Module):
    """quantus feeds ``torch.Tensor(x)`` (float32); cast back so that both sides run the model in float64."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.double())


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return tiny_cnn(3).double().eval()


def _inputs(model, height: int, width: int, n: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, height, width, generator=generator).double()  # float32 draws: exact in float32
    relevance = torch.randn(n, 3, height, width, generator=generator, dtype=torch.float64)  # no tied region sums
    with torch.no_grad():
        target = model(x).argmax(1)
    return x, relevance, target


def _ours(model, x, relevance, target, region_size, steps, score="logit") -> np.ndarray:
    spec = PerturbationSpec(region_size=region_size, steps=steps, perturbation="constant", value=BASELINE,
                            score=score, forward_batch=7)  # an odd chunk size: chunks mix images and steps
    return RegionPerturbation(spec)(model, x, target, {"m": score_map(relevance, "sum")})["m"].numpy()


def _quantus(model, x, relevance, target, region_size, steps, score="logit", order="morf",
             normalise=False) -> np.ndarray:
    """quantus's (B, L) declines f(x) - f(x^(k)), k = 1..L."""
    metric = quantus.RegionPerturbation(patch_size=region_size, order=order, regions_evaluation=steps,
                                        normalise=normalise, abs=False, perturb_baseline=BASELINE,
                                        disable_warnings=True)
    scores = metric(model=Float64(model).eval(), x_batch=x.numpy(), y_batch=target.numpy(),
                    a_batch=relevance.numpy(), channel_first=True, softmax=score == "softmax", device="cpu")
    return np.asarray(scores, np.float64)


def _declines(curve: np.ndarray) -> np.ndarray:
    return curve[:, :1] - curve[:, 1:]


@pytest.mark.parametrize("height, width, region_size, steps, score, normalise", [
    (16, 16, 4, 16, "logit", False),     # every region
    (12, 20, 4, 7, "logit", False),      # not square, fewer steps than regions (3 x 5 grid)
    (24, 24, 6, 16, "softmax", False),
    (16, 16, 4, 16, "logit", True),      # quantus's default max-normalisation does not reorder
])
def test_curve_matches_quantus(model, height, width, region_size, steps, score, normalise):
    """Measured max |difference|: 0.0 in every case (declines up to 0.033 logits / 0.0066 probability)."""
    x, relevance, target = _inputs(model, height, width)
    ours = _ours(model, x, relevance, target, region_size, steps, score)
    theirs = _quantus(model, x, relevance, target, region_size, steps, score, normalise=normalise)
    assert ours.shape == (len(x), steps + 1) and theirs.shape == (len(x), steps)
    assert np.abs(_declines(ours)).max() > 1e-3  # the perturbation moves f: not a comparison of zeros
    np.testing.assert_allclose(_declines(ours), theirs, rtol=0, atol=TOLERANCE)


def test_aopc_matches_quantus_curves(model):
    """AOPC = 1/(L+1) sum_{k=0..L} f(x^(0)) - f(x^(k)) from quantus's declines (with d_0 = 0 prepended), per image
    and as the mean over images through ``summarize``; also AOPC of the first k steps. Measured max |difference|
    0.0 (per-image AOPC 0.005 .. 0.017)."""
    steps = 16
    x, relevance, target = _inputs(model, 16, 16, n=6)
    ours = _ours(model, x, relevance, target, 4, steps)
    theirs = np.concatenate([np.zeros((len(x), 1)), _quantus(model, x, relevance, target, 4, steps)], axis=1)
    np.testing.assert_allclose(aopc_per_row(ours), theirs.mean(axis=1), rtol=0, atol=TOLERANCE)

    table = pa.table({"row": np.arange(len(x)), "method": ["m"] * len(x), "status": ["ok"] * len(x),
                      "curve": [list(c) for c in ours]})
    result = summarize(table, ci="t")
    assert abs(result.aopc("m") - theirs.mean()) < TOLERANCE
    at_step = np.asarray(result.curves["aopc_at_step"].to_pylist())
    np.testing.assert_allclose(at_step, np.cumsum(theirs.mean(axis=0)) / np.arange(1, steps + 2), rtol=0,
                               atol=TOLERANCE)


def test_least_relevant_first_is_our_order_of_the_negated_map(model):
    """quantus's ``lerf`` (ascending sums) is our most-relevant-first order of -relevance."""
    x, relevance, target = _inputs(model, 16, 16, seed=3)
    ours = _ours(model, x, -relevance, target, 4, 10)
    theirs = _quantus(model, x, relevance, target, 4, 10, order="lerf")
    np.testing.assert_allclose(_declines(ours), theirs, rtol=0, atol=TOLERANCE)


def _swap_regions(relevance: torch.Tensor, region_size: int, first: torch.Tensor, second: torch.Tensor):
    """Exchange the attribution of two regions (row-major indices, one pair per image)."""
    out = relevance.clone()
    columns = relevance.shape[-1] // region_size

    def block(r):
        y, x = divmod(r, columns)
        return slice(None), slice(y * region_size, (y + 1) * region_size), slice(x * region_size, (x + 1) * region_size)

    for i, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
        out[(i, *block(a))], out[(i, *block(b))] = relevance[(i, *block(b))], relevance[(i, *block(a))]
    return out


def test_the_comparison_sees_a_wrong_order(model):
    """Not vacuous: quantus's curve of the map is far from our curve of a reversed, a mirrored, or a map whose two
    most relevant regions are exchanged (there only step 1 differs: after two steps the same regions are gone).
    Measured max |difference|: 0.015 (reversed), 0.020 (mirrored); exchanged: 0.0015 .. 0.0055 at step 1, 0.0 after."""
    steps, p = 16, 4
    x, relevance, target = _inputs(model, 16, 16)
    theirs = _quantus(model, x, relevance, target, p, steps)
    for wrong in (-relevance, relevance.flip(-1, -2)):
        assert np.abs(_declines(_ours(model, x, wrong, target, p, steps)) - theirs).max() > 1e-3

    sums = score_map(relevance, "sum").reshape(len(x), 4, p, 4, p).sum((2, 4)).flatten(1)
    top = sums.argsort(1, descending=True)
    swapped = _swap_regions(relevance, p, top[:, 0], top[:, 1])
    difference = np.abs(_declines(_ours(model, x, swapped, target, p, steps)) - theirs)
    assert (difference[:, 0] > 1e-6).all()  # step 1 perturbs the second region instead of the first
    assert difference[:, 1:].max() <= TOLERANCE
