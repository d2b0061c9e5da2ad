"""Region perturbation (Samek et al. 2015): does a method's ordering of regions find what the model uses?

The image is cut into non-overlapping ``region_size`` squares; a method's per-pixel scores, summed per
region, order them most relevant first (MoRF). Step k replaces the first k regions by a *replacement
image* z (uniform noise in the input's range, a blurred copy, the image mean or a constant), and the
model is re-evaluated: ``f(x^(k))`` for k = 0..L. A good explanation makes f fall fast; a ``random``
ordering is the reference. Every method of one image shares the same z, so methods differ only in their
ordering (common random numbers: method differences have less noise than the curves themselves).

Pure torch. Noise and random orders come from a generator seeded by ``(seed, sample_id)``, so a curve
does not depend on batch composition, sharding or the device that computed it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

PERTURBATIONS = ("uniform", "blur", "mean", "constant")
REDUCTIONS = ("sum", "max_abs", "l2")
SCORES = ("logit", "softmax")
RANDOM = "random"  # the method name of the random ordering

# How a method's (C, H, W) map becomes per-pixel scores. Sensitivity and deconvolution maps carry no sign
# that orders pixels, so Samek et al. (2015) rank them by the l-infinity norm over colour channels; relevance
# (LRP, gradient x input) is summed over channels, as in the store.
DEFAULT_REDUCTION = {"gradient": "max_abs", "deconvnet": "max_abs"}

_NOISE_STREAM, _ORDER_STREAM, _TIE_STREAM = 0, 1, 2


@dataclass(frozen=True)
class PerturbationSpec:
    """What to perturb and how.

    ``region_size``: side of the square regions in pixels (9 in Samek et al.); ``steps``: L, how many regions
    are perturbed one after another (None: all of them); ``perturbation``: ``uniform`` noise in [low, high],
    ``blur`` (Gaussian, ``blur_sigma``), ``mean`` (the image's per-channel mean) or ``constant`` (``value``);
    ``low``/``high``: the input range for uniform noise, floats or per-channel lists (None: each image's own
    per-channel min and max); ``score``: f is the target's ``logit`` or its ``softmax`` probability;
    ``forward_batch``: perturbed images per model forward.
    """

    region_size: int = 9
    steps: int | None = 100
    perturbation: str = "uniform"
    low: float | tuple[float, ...] | None = None
    high: float | tuple[float, ...] | None = None
    value: float = 0.0
    blur_sigma: float | None = None
    score: str = "logit"
    seed: int = 0
    forward_batch: int = 256

    def __post_init__(self):
        if int(self.region_size) < 1:
            raise ValueError(f"region_size must be at least 1 pixel, got {self.region_size}")
        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1 (or None for every region), got {self.steps}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation {self.perturbation!r} unknown: use one of {', '.join(PERTURBATIONS)}")
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r} unknown: use one of {', '.join(SCORES)}")
        if (self.low is None) != (self.high is None):
            raise ValueError("give both low and high (the input range for uniform noise), or neither")
        if int(self.forward_batch) < 1:
            raise ValueError(f"forward_batch must be at least 1, got {self.forward_batch}")
        if self.blur_sigma is not None and not 0 < float(self.blur_sigma) < math.inf:  # NaN too
            raise ValueError(f"blur_sigma must be positive and finite, got {self.blur_sigma}")
        if not math.isfinite(float(self.value)):
            raise ValueError(f"value (the constant perturbation) must be finite, got {self.value}")
        if int(self.seed) < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("low", "high"):  # lists from YAML/JSON become tuples: the spec stays hashable
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.low is not None:
            low, high = np.atleast_1d(np.asarray(self.low, float)), np.atleast_1d(np.asarray(self.high, float))
            if not (np.isfinite(low).all() and np.isfinite(high).all()):
                raise ValueError(f"low {self.low} and high {self.high} must be finite")
            if low.size != high.size and 1 not in (low.size, high.size):
                raise ValueError(f"low {self.low} and high {self.high}: give one value or one per channel each")
            if (low > high).any():
                raise ValueError(f"low {self.low} must not exceed high {self.high}")

    def num_regions(self, height: int, width: int) -> int:
        s = int(self.region_size)
        return math.ceil(height / s) * math.ceil(width / s)

    def num_steps(self, height: int, width: int) -> int:
        """L for images of this size; asking for more steps than there are regions is an error."""
        regions = self.num_regions(height, width)
        if self.steps is None:
            return regions
        if int(self.steps) > regions:
            raise ValueError(
                f"steps={self.steps} but a {height}x{width} image has only {regions} regions of "
                f"{self.region_size}x{self.region_size}: lower steps or region_size"
            )
        return int(self.steps)

    def to_dict(self) -> dict:
        values = asdict(self)
        values.pop("forward_batch")  # how fast, not what: does not change any result
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def score_map(relevance: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """(B, C, H, W) explanation -> (B, H, W) per-pixel scores: ``sum`` over channels, ``max_abs`` or ``l2`` norm."""
    if reduction == "sum":
        return relevance.sum(1)
    if reduction == "max_abs":
        return relevance.abs().amax(1)
    if reduction == "l2":
        return relevance.pow(2).sum(1).sqrt()
    raise ValueError(f"channel reduction {reduction!r} unknown: use one of {', '.join(REDUCTIONS)}")


def _generator(seed: int, sample_id: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(sample_id) & 0xFFFFFFFF, stream]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def region_index(height: int, width: int, region_size: int, device=None) -> torch.Tensor:
    """(H, W) long: which region each pixel belongs to (row-major over the region grid; border regions are smaller)."""
    columns = math.ceil(width / region_size)
    y = torch.arange(height, device=device) // region_size
    x = torch.arange(width, device=device) // region_size
    return y[:, None] * columns + x[None, :]


def region_scores(scores: torch.Tensor, region_size: int) -> torch.Tensor:
    """(B, H, W) per-pixel scores -> (B, R) sum of the scores in each region."""
    b, h, w = scores.shape
    index = region_index(h, w, region_size, scores.device).flatten().expand(b, -1)
    total = torch.zeros(b, math.ceil(h / region_size) * math.ceil(w / region_size), dtype=torch.float64,
                        device=scores.device)
    return total.scatter_add_(1, index, scores.reshape(b, -1).double())


def random_orders(sample_ids: Sequence[int], num_regions: int, seed: int, stream: int = _ORDER_STREAM) -> torch.Tensor:
    """(B, R) a random permutation of the regions per sample, from its own ``(seed, sample_id)`` stream."""
    return torch.stack([torch.randperm(num_regions, generator=_generator(seed, i, stream)) for i in sample_ids])


def orders_from_scores(scores: torch.Tensor, region_size: int, sample_ids: Sequence[int], seed: int) -> torch.Tensor:
    """(B, R) regions most relevant first. Ties (e.g. all-zero background) are broken by the random order,
    not by position, so flat maps do not systematically perturb the top-left corner first."""
    totals = region_scores(scores, region_size).cpu()
    totals = torch.nan_to_num(totals, nan=-math.inf)
    shuffle = random_orders(sample_ids, totals.shape[1], seed, _TIE_STREAM)
    ranked = torch.sort(totals.gather(1, shuffle), dim=1, descending=True, stable=True).indices
    return shuffle.gather(1, ranked)


class RegionPerturbation:
    """Perturbation curves f(x^(k)), k = 0..L, for several orderings of one batch, in large batched forwards.

    >>> perturb = RegionPerturbation(PerturbationSpec(region_size=9, steps=100))
    >>> curves = perturb(model, x, target, {"epsilon_plus": scores, "random": None}, sample_ids)
    >>> curves["epsilon_plus"].shape   # (B, L + 1); curves[m][:, 0] is f(x) for every method
    """

    def __init__(self, spec: PerturbationSpec | None = None):
        self.spec = spec or PerturbationSpec()

    # ---- what replaces a perturbed region ---------------------------------------------------------------
    def replacement(self, x: torch.Tensor, sample_ids: Sequence[int]) -> torch.Tensor:
        """The image z whose pixels a perturbed region takes, per sample (B, C, H, W)."""
        spec = self.spec
        if spec.perturbation == "constant":
            return torch.full_like(x, float(spec.value))
        if spec.perturbation == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
        if spec.perturbation == "blur":
            from torchvision.transforms.v2.functional import gaussian_blur

            sigma = float(spec.blur_sigma or spec.region_size / 2)
            kernel = 2 * math.ceil(3 * sigma) + 1
            return gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        # uniform noise in [low, high]: fixed per-channel bounds, or each image's own range
        if spec.low is None:
            low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        else:
            low, high = (torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
                         for v in (spec.low, spec.high))
        unit = torch.stack([torch.rand(x.shape[1:], generator=_generator(spec.seed, i, _NOISE_STREAM),
                                       dtype=torch.float64) for i in sample_ids])
        return low + unit.to(x.device, x.dtype) * (high - low)

    # ---- orderings ---------------------------------------------------------------------------------------
    def orders(self, scores: Mapping[str, torch.Tensor | None], sample_ids: Sequence[int],
               height: int, width: int) -> dict[str, torch.Tensor]:
        """(B, R) region order per method; a ``None`` score map (or the method ``random``) is a random order."""
        spec = self.spec
        out = {}
        for name, value in scores.items():
            if value is None or name == RANDOM:
                out[name] = random_orders(sample_ids, spec.num_regions(height, width), spec.seed)
            else:
                if tuple(value.shape) != (len(sample_ids), height, width):
                    raise ValueError(f"scores of {name!r} have shape {tuple(value.shape)}, expected "
                                     f"(batch, height, width) = {(len(sample_ids), height, width)}")
                out[name] = orders_from_scores(value, spec.region_size, sample_ids, spec.seed)
        return out

    # ---- the curves --------------------------------------------------------------------------------------
    @torch.no_grad()
    def curves(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               orders: Mapping[str, torch.Tensor], sample_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """f(x^(k)) for k = 0..L per method: (B, L + 1) float64 each. Step 0 (the unperturbed image) is
        evaluated once and shared; the B * M * L perturbed images are built chunk by chunk, never all at once."""
        spec = self.spec
        b, _, h, w = x.shape
        steps = spec.num_steps(h, w)
        z = self.replacement(x, sample_ids)
        target = torch.as_tensor(target, device=x.device).long().reshape(-1).expand(b)
        names = list(orders)
        regions = region_index(h, w, spec.region_size, x.device)
        # pixel_rank[m, b, y, x]: the step at which the pixel's region is perturbed (>= L: never)
        ranks = []
        for name in names:
            order = orders[name].to(x.device)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand_as(order))
            ranks.append(rank[:, regions])
        pixel_rank = torch.stack(ranks)  # (M, B, H, W)

        method = torch.arange(len(names), device=x.device).repeat_interleave(b * steps)
        row = torch.arange(b, device=x.device).repeat_interleave(steps).repeat(len(names))
        step = torch.arange(1, steps + 1, device=x.device).repeat(b * len(names))
        values = torch.empty(method.numel(), dtype=torch.float64, device=x.device)
        for start in range(0, method.numel(), int(spec.forward_batch)):
            part = slice(start, start + int(spec.forward_batch))
            m, r, k = method[part], row[part], step[part]
            perturbed = (pixel_rank[m, r] < k[:, None, None]).unsqueeze(1)
            values[part] = self._score(model, torch.where(perturbed, z[r], x[r]), target[r])
        first = torch.cat([self._score(model, x[part], target[part])
                           for part in torch.arange(b, device=x.device).split(int(spec.forward_batch))])
        values = values.reshape(len(names), b, steps)
        return {name: torch.cat([first[:, None], values[i]], dim=1) for i, name in enumerate(names)}

    def _score(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if self.spec.score == "softmax":
            logits = logits.softmax(1)
        return logits.gather(1, target[:, None])[:, 0].double()

    def __call__(self, model: nn.Module, x: torch.Tensor, target, scores: Mapping[str, torch.Tensor | None],
                 sample_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Order the regions by each method's (B, H, W) scores (None: random), then perturb and re-evaluate."""
        sample_ids = list(range(x.shape[0])) if sample_ids is None else [int(i) for i in sample_ids]
        if len(sample_ids) != x.shape[0]:
            raise ValueError(f"{len(sample_ids)} sample ids for a batch of {x.shape[0]}")
        orders = self.orders(scores, sample_ids, x.shape[2], x.shape[3])
        return self.curves(model, x, target, orders, sample_ids)

