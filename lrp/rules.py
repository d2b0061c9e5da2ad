r"""LRP rules: how one step redistributes the relevance of its output onto its inputs.

Notation: input activations :math:`x_i`, weights :math:`w_{ij}`, bias :math:`b_j`, output relevance :math:`R_j`,
contributions :math:`z_{ij} = x_i w_{ij}`, :math:`(\cdot)^+ = \max(0,\cdot)`, :math:`(\cdot)^- = \min(0,\cdot)`.
Every rule has the form :math:`R_i = x_i \sum_j w'_{ij} R_j / z'_j` for some modified weights :math:`w'` and
denominator :math:`z'`, so it is computed as one (or a few) affine maps forward and transposed maps backward.
Rules that give each sign of the input its own weights (z+, alpha-beta, gamma) share :class:`SignSplit`.

A rule is a frozen dataclass: its fields are its whole setting (what ``repr`` shows), and it holds no state
between calls, so one rule object serves every step it is given to (the contract is in docs/extending.md).

``include_bias=True`` (default) uses the biases in the denominators exactly as zennit 0.5 does, so results can be
compared with it; ``include_bias=False`` leaves biases out (zennit's ``zero_params='bias'``), which is the form in which
naive z and alpha-beta conserve relevance exactly: :math:`\sum_i R_i = \sum_j R_j`.
The stabilizer of each denominator is described in :mod:`lrp.stabilize`.

Fast paths: after a ReLU the inputs are non-negative (known from the graph, see ``Step.inputs_nonnegative``; checked
per batch only where the graph cannot tell, see :func:`lrp.canonizers.mark_nonnegative`), so the :math:`x^-` terms
vanish and z+, gamma and alpha-beta need one (alpha-beta: one concatenated) modified affine map instead of two or
four; gamma also drops its output-sign masks when no relevance reaches neurons with non-positive output (the usual
case below a ReLU).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import attention
from .kinds import NO_RELEVANCE, Kind
from .layers import batchnorm_affine
from .stabilize import safe_divide, safe_divide_signed


@dataclass
class StepContext:
    """What a rule sees of one step: its layer (for Conv/Linear), input values, output value and a vjp helper."""

    step: object
    inputs: list
    output: torch.Tensor
    vjp: object  # callable(relevance) -> list of input gradients
    arguments: tuple = ((), {})  # the call's resolved (args, kwargs), constants included (LayerNorm's weight)

    @property
    def layer(self):
        return self.step.layer


def _pos(t):
    return t.clamp(min=0)


def _neg(t):
    return t.clamp(max=0)


def _bias(bias, keep: bool):
    return bias if keep else None


def _divide(numerator, fresh_denominator, stabilizer: float, sign: int):
    """The stabilized message; a denominator of known sign (and owned by the caller) is shifted in place."""
    if sign:
        return safe_divide_signed(numerator, fresh_denominator, stabilizer, sign)
    return safe_divide(numerator, fresh_denominator, stabilizer)


NONNEGATIVE = ("epsilon", "stabilizer", "gamma")  # the float rule parameters that cannot be negative


class Rule:
    """Base class: ``rule(ctx, relevance) -> list of input relevances`` (None for inputs that get none).

    Subclasses are frozen dataclasses; their ``float`` fields are stored as Python floats whatever number was given
    (a number's text too: YAML reads ``1e-6`` as a string; a boolean is refused, ``True`` would silently be 1.0), and
    checked: finite, and ``epsilon``, ``stabilizer`` and ``gamma`` not negative (a negative or NaN epsilon would
    silently be the exact z rule). ``bool`` fields must be booleans: the string ``"false"`` (a quoted YAML value) would
    be true.

    ``applies_to``: the step kinds the rule can be given (None: any); a composite that gives it another step is
    refused when the explainer is built (:meth:`lrp.Composite.first_layer`), naming the step.
    """

    applies_to = None  # not a field: frozenset of Kinds, or None for any step

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (float, "float"):  # a string under `from __future__ import annotations`
                value = number(value, f"{type(self).__name__}: {field.name}")
                if not math.isfinite(value) or (field.name in NONNEGATIVE and value < 0):
                    bound = " and >= 0" if field.name in NONNEGATIVE else ""
                    raise ValueError(f"{type(self).__name__}: {field.name} must be finite{bound}, got {value}")
                object.__setattr__(self, field.name, value)
            elif field.type in (bool, "bool") and not isinstance(value, bool):
                raise TypeError(f"{type(self).__name__}: {field.name} must be true or false, got {value!r}")

    def __call__(self, ctx: StepContext, relevance: torch.Tensor) -> list:
        raise NotImplementedError

    def prepare(self, network, index: int, x: torch.Tensor) -> Rule:
        """The rule to use at step ``index`` of ``network`` for the batch ``x`` (default: the rule itself).

        For a rule whose setting depends on the network in front of its step, as z^B's box does (see :class:`ZBox`);
        the composite calls it for its first-layer rule once per batch.
        """
        return self


def number(value, what: str) -> float:
    """``value`` as a Python float: a real number, a one-element tensor or a number's text; else a TypeError
    naming ``what``. Booleans are refused (``epsilon=True`` would silently be 1.0)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or (
            isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None


#: the kinds a rule that computes with the step's Conv/Linear layer (``ctx.layer``) can be given
LAYER_STEPS = frozenset({Kind.LINEAR})


#: Parameters of a layer as a rule modifies them: ``layer -> (weight, bias)``, cached by the layer (``variant``).
Part = Callable[[object], tuple]


def positive_part(layer) -> tuple:
    """:math:`(w^+, b^+)`."""
    return layer.variant("pos", lambda w, b: (_pos(w), None if b is None else _pos(b)))


def negative_part(layer) -> tuple:
    """:math:`(w^-, b^-)`."""
    return layer.variant("neg", lambda w, b: (_neg(w), None if b is None else _neg(b)))


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class SignSplit:
    r"""A layer's input split by sign, :math:`x = x^+ + x^-`, for the rules that give each sign its own weights.

    :meth:`relevance` computes :math:`R_i = x^+_i \sum_j a_{ij} m_j + x^-_i \sum_j b_{ij} m_j` with
    :math:`m_j = R_j / (\sum_i x^+_i a_{ij} + x^-_i b_{ij} + c_j)` for parts :math:`(a, c)` and :math:`b`: z+ is
    :math:`(w^+, w^-)`, alpha-beta's negative half :math:`(w^-, w^+)`, gamma
    :math:`(w + \gamma w^\pm, w + \gamma w^\mp)`.
    When the input has no negative entry (``neg`` is None) the :math:`x^-` terms vanish: one map each way.

    Signed input of a Linear or ungrouped Conv: ``stacked`` holds :math:`[x^+, x^-]` on the feature axis (``pos`` and
    ``neg`` are its halves), so both sums are one affine map with the weights :math:`[a, b]` stacked on the input axis
    and one transposed map (the same products, one kernel call each way instead of two, and no sum of two outputs).
    Grouped and depthwise convolutions keep two maps each way: stacked, their kernels lose the depthwise fast path
    (measured 4-5x slower on CPU, benchmarks/RESULTS.md).
    """

    layer: object
    x: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor | None
    stacked: torch.Tensor | None = None

    @classmethod
    def of(cls, ctx: StepContext) -> SignSplit:
        layer, x = ctx.layer, ctx.inputs[0]
        if _nonnegative(ctx):
            return cls(layer, x, x, None)
        if layer.is_conv and layer.module.groups != 1:
            return cls(layer, x, torch.relu(x), x.clamp(max=0))
        axis = 1 if layer.is_conv else x.dim() - 1
        stacked = x.new_empty(x.shape[:axis] + (2 * x.shape[axis],) + x.shape[axis + 1:])
        pos, neg = stacked.chunk(2, dim=axis)
        torch.clamp(x, min=0, out=pos)
        torch.clamp(x, max=0, out=neg)
        return cls(layer, x, pos, neg, stacked)

    @property
    def nonnegative(self) -> bool:
        return self.neg is None

    def relevance(self, relevance: torch.Tensor, up: Part, down: Part, stabilizer: float,
                  include_bias: bool = True, sign: int = 0) -> torch.Tensor:
        """The input relevance for parts ``up`` (on :math:`x^+`, with its bias) and ``down`` (on :math:`x^-`).

        ``sign``: +1 or -1 where the parts make every contribution (and the bias) of that sign (z+: ``up`` >= 0,
        ``down`` <= 0), so the denominator has it too and is stabilized by a constant shift; 0 where unknown."""
        layer, x = self.layer, self.x
        w_up, b_up = up(layer)
        b_up = _bias(b_up, include_bias)
        if self.neg is None:
            message = _divide(relevance, layer.forward(x, w_up, b_up), stabilizer, sign)
            return layer.transpose(message, x, w_up).mul_(x)
        w_down, _ = down(layer)
        if self.stacked is not None:
            return self._stacked_relevance(relevance, w_up, b_up, w_down, stabilizer, sign)
        z = layer.forward(self.pos, w_up, b_up).add_(layer.forward(self.neg, w_down))
        message = _divide(relevance, z, stabilizer, sign)
        result = layer.transpose(message, x, w_up).mul_(self.pos)
        return result.addcmul_(self.neg, layer.transpose(message, x, w_down))

    def _stacked_relevance(self, relevance, w_up, b_up, w_down, stabilizer, sign) -> torch.Tensor:
        """Both signs in one map each way: :math:`[x^+, x^-]` against the weights :math:`[a, b]` (input axis)."""
        layer, stacked = self.layer, self.stacked
        # w_up and w_down live in the same cache generation as this entry, so their ids name them while it lasts
        w_both, _ = layer.variant(("stacked", id(w_up), id(w_down)),
                                  lambda w, b: (torch.cat([w_up, w_down], dim=1), None))
        message = _divide(relevance, layer.forward(stacked, w_both, b_up), stabilizer, sign)
        both = layer.transpose(message, stacked, w_both).mul_(stacked)
        first, second = both.chunk(2, dim=1 if layer.is_conv else both.dim() - 1)
        return torch.add(first, second)  # a new tensor: the stacked one is freed


# -- rules for Conv / Linear ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Epsilon(Rule):
    r"""Epsilon rule (Eq. 3): :math:`R_i = \sum_j z_{ij} / (z_j + \epsilon\,\mathrm{sign}(z_j))\, R_j`.

    ``epsilon=0`` is the naive z rule (Eq. 2) with exact division. Larger epsilon absorbs the relevance of weak or
    contradictory neurons (Binder et al. 2016 compare 0.01 and 100): relevance is never created, only absorbed.
    """

    applies_to = LAYER_STEPS

    epsilon: float = 1e-6
    include_bias: bool = True

    def __call__(self, ctx, relevance):
        layer, x, z = ctx.layer, ctx.inputs[0], ctx.output
        weight, bias = layer.params()
        if not self.include_bias and bias is not None:
            z = z - layer.expand_bias(bias, z)
        message = safe_divide(relevance, z, self.epsilon)
        return [layer.transpose(message, x, weight).mul_(x)]


@dataclass(frozen=True)
class ZPlus(Rule):
    r"""z+ rule: :math:`R_i = \sum_j (x^+_i w^+_{ij} + x^-_i w^-_{ij}) / z^+_j\, R_j` (alpha=1, beta=0)."""

    applies_to = LAYER_STEPS

    stabilizer: float = 1e-6
    include_bias: bool = True

    def __call__(self, ctx, relevance):
        split = SignSplit.of(ctx)
        return [split.relevance(relevance, positive_part, negative_part, self.stabilizer, self.include_bias, sign=1)]


@dataclass(frozen=True)
class AlphaBeta(Rule):
    r"""Alpha-beta rule (Eq. 4): :math:`R_i = \sum_j (\alpha z^+_{ij}/z^+_j - \beta z^-_{ij}/z^-_j) R_j`.

    Parameters follow the common convention :math:`\alpha - \beta = 1`, :math:`\beta \ge 0` (alpha=2, beta=1 is the
    paper's beta=-1). The paper's convention (:math:`\alpha + \beta = 1`, :math:`\beta \le 0`) is accepted and
    converted (the fields hold the common form); see :func:`alpha_beta_params`.
    """

    applies_to = LAYER_STEPS

    alpha: float | None = 2.0
    beta: float | None = 1.0
    stabilizer: float = 1e-6
    include_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        alpha, beta = alpha_beta_params(self.alpha, self.beta)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)

    def __call__(self, ctx, relevance):
        split = SignSplit.of(ctx)
        layer = ctx.layer
        if split.nonnegative and (not layer.is_conv or layer.module.groups == 1):
            return [self._stacked(layer, split.x, relevance)]
        s, keep = self.stabilizer, self.include_bias
        positive = split.relevance(relevance, positive_part, negative_part, s, keep, sign=1)
        negative = split.relevance(relevance, negative_part, positive_part, s, keep, sign=-1)
        return [self.alpha * positive - self.beta * negative]

    def _stacked(self, layer, x, relevance):
        """Non-negative input: one affine map with [w+; w-] stacked on the output axis, one transposed map for both."""
        w_both, b_both = layer.variant("pos_neg", lambda w, b: (
            torch.cat([_pos(w), _neg(w)]), None if b is None else torch.cat([_pos(b), _neg(b)])))
        axis = 1 if layer.is_conv else -1  # the output-feature axis: channels, or last for Linear
        z_pos, z_neg = layer.forward(x, w_both, _bias(b_both, self.include_bias)).chunk(2, dim=axis)
        message = torch.cat([
            self.alpha * safe_divide_signed(relevance, z_pos, self.stabilizer, 1),
            -self.beta * safe_divide_signed(relevance, z_neg, self.stabilizer, -1),
        ], dim=axis)
        return layer.transpose(message, x, w_both).mul_(x)


@dataclass(frozen=True)
class Gamma(Rule):
    r"""Gamma rule: favours positive contributions, :math:`w' = w + \gamma w^+` for neurons with positive output
    (and :math:`w + \gamma w^-` for negative outputs, zennit's generalized form for signed inputs)."""

    applies_to = LAYER_STEPS

    gamma: float = 0.25
    stabilizer: float = 1e-6
    include_bias: bool = True

    def _up(self, layer) -> tuple:
        g = self.gamma
        return layer.variant(("gamma+", g), lambda w, b: (w + g * _pos(w), None if b is None else b + g * _pos(b)))

    def _down(self, layer) -> tuple:
        g = self.gamma
        return layer.variant(("gamma-", g), lambda w, b: (w + g * _neg(w), None if b is None else b + g * _neg(b)))

    def __call__(self, ctx, relevance):
        z, split = ctx.output, SignSplit.of(ctx)
        s, keep = self.stabilizer, self.include_bias
        if split.nonnegative and not bool((relevance * (z <= 0)).any()):
            # the usual case below a ReLU: relevance only at neurons with positive output, so no masks are needed
            return [split.relevance(relevance, self._up, self._down, s, keep)]
        r_pos, r_neg = relevance * (z > 0), relevance * (z < 0)
        result = split.relevance(r_pos, self._up, self._down, s, keep)
        if bool(r_neg.ne(0).any()):
            result = result + split.relevance(r_neg, self._down, self._up, s, keep)
        return [result]


@dataclass(frozen=True, eq=False)  # eq=False: the bounds may be tensors, which have no single truth value
class ZBox(Rule):
    r"""z^B rule for inputs bounded by ``low <= x <= high`` (pixel layer):
    :math:`R_i = \sum_j (x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}) / z_j\, R_j`. ``low``/``high``: floats, per-channel
    tensors of shape (C,), or tensors broadcastable to the input.

    ``low``/``high`` bound the pixels given to the model; :meth:`prepare` carries them to the first layer's input
    through the elementwise steps in front of it (GoogLeNet's ``transform_input``)."""

    applies_to = LAYER_STEPS

    low: object
    high: object
    stabilizer: float = 1e-6
    include_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        try:
            low, high = (torch.as_tensor(b, dtype=torch.float64) for b in (self.low, self.high))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"ZBox: low and high must be numbers or tensors (per-channel (C,) or broadcastable to "
                            f"the input), got low {self.low!r} and high {self.high!r}") from None
        try:
            crossed = bool((low > high).any()) or not bool(torch.isfinite(low).all() and torch.isfinite(high).all())
        except RuntimeError:  # shapes that do not broadcast: bound_image refuses them on the first batch
            crossed = False
        if crossed:
            raise ValueError(f"ZBox: the box needs finite low <= high, got low {self.low} and high {self.high}")

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        keep = self.include_bias
        weight, bias = layer.params()
        (w_pos, b_pos), (w_neg, b_neg) = positive_part(layer), negative_part(layer)
        low, high = bound_image(self.low, x), bound_image(self.high, x)
        z = ctx.output if keep or bias is None else ctx.output - layer.expand_bias(bias, ctx.output)
        # the bounds are the same image for every row: their affine maps are computed once, then broadcast
        z = z - layer.forward(low[:1], w_pos, _bias(b_pos, keep)) - layer.forward(high[:1], w_neg, _bias(b_neg, keep))
        message = safe_divide(relevance, z, self.stabilizer)
        return [x * layer.transpose(message, x, weight) - low * layer.transpose(message, x, w_pos)
                - high * layer.transpose(message, x, w_neg)]

    def prepare(self, network, index, x):
        """The box of what step ``index`` sees, where the model transforms its input elementwise first.

        Between the pixels and the first layer there may be elementwise constant scales and shifts (GoogLeNet's
        ``transform_input``): the bounds of what the layer sees are those steps applied to the bound images (min and
        max, in case a scale is negative). Only elementwise affine steps (scales, shifts, reshapes, indexing,
        concatenation) map a box onto a box exactly; after anything else (a pooling, say) ``low``/``high`` bound the
        layer's input as given, as zennit takes them.
        """
        layer_input = network.steps[index].inputs[0]
        before = [step.kind for step in network.steps[:layer_input + 1]
                  if step.kind not in (Kind.INPUT, *NO_RELEVANCE)]
        if not before or not set(before) <= _ELEMENTWISE_AFFINE:
            return self
        low, high = (network.forward(bound_image(b, x[:1]), until=layer_input)[layer_input]
                     for b in (self.low, self.high))
        return dataclasses.replace(self, low=torch.minimum(low, high), high=torch.maximum(low, high))


_ELEMENTWISE_AFFINE = {Kind.SCALE, Kind.SHIFT, Kind.STRUCTURAL, Kind.IDENTITY}


@dataclass(frozen=True)
class Flat(Rule):
    r"""Flat rule: relevance spread uniformly over each neuron's receptive field, :math:`w_{ij} = 1`, :math:`x_i = 1`.

    No bias enters (all weights are ones, the bias is dropped), so it takes no ``include_bias``."""

    applies_to = LAYER_STEPS

    stabilizer: float = 1e-6

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        ones_w, _ = layer.variant("flat", lambda w, b: (torch.ones_like(w), None))
        ones_x = torch.ones_like(x)
        message = safe_divide(relevance, layer.forward(ones_x[:1], ones_w), self.stabilizer)
        return [layer.transpose(message, ones_x, ones_w)]


@dataclass(frozen=True)
class WSquare(Rule):
    r"""w^2 rule: :math:`R_i = \sum_j w_{ij}^2 / \sum_{i'} w_{i'j}^2\, R_j` (first layer, unbounded inputs)."""

    applies_to = LAYER_STEPS

    stabilizer: float = 1e-6
    include_bias: bool = True

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        w_sq, b_sq = layer.variant("square", lambda w, b: (w * w, None if b is None else b * b))
        ones_x = torch.ones_like(x)
        z = layer.forward(ones_x[:1], w_sq, _bias(b_sq, self.include_bias))  # the same for every row
        return [layer.transpose(safe_divide(relevance, z, self.stabilizer), ones_x, w_sq)]


# -- rules for the other steps ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pass(Rule):
    """Relevance passes unchanged (ReLU and other elementwise steps: the neuron is the same neuron)."""

    def __call__(self, ctx, relevance):
        x = ctx.inputs[0]
        if relevance.shape != x.shape and ctx.step.kind in _BROADCASTING:
            relevance = relevance.sum_to_size(x.shape)  # h * w with w of more channels: each copy's relevance summed
        return [relevance] + [None] * (len(ctx.inputs) - 1)


_BROADCASTING = (Kind.SCALE, Kind.SHIFT, Kind.GATE)  # steps whose constant operand may broadcast the input larger


@dataclass(frozen=True)
class Norm(Rule):
    r"""Proportional split for parameter-free linear steps (sums, average pooling):
    :math:`R_i = x_i\, \partial z_j/\partial x_i\, R_j / z_j`."""

    stabilizer: float = 1e-6

    def __call__(self, ctx, relevance):
        message = safe_divide(relevance, ctx.output, self.stabilizer)
        return [None if g is None else x * g for x, g in zip(ctx.inputs, ctx.vjp(message))]


@dataclass(frozen=True)
class Gradient(Rule):
    """The plain vector-Jacobian product: relevance is moved (or, for baselines, gradients are propagated)."""

    def __call__(self, ctx, relevance):
        if ctx.layer is not None:
            return [ctx.layer.transpose(relevance, ctx.inputs[0], ctx.layer.params()[0])]
        return list(ctx.vjp(relevance))


@dataclass(frozen=True)
class DeconvReLU(Rule):
    """DeconvNet's ReLU (Zeiler & Fergus 2014): pass the positive part of the signal, ignoring the forward mask."""

    def __call__(self, ctx, relevance):
        return [relevance.clamp(min=0)]


@dataclass(frozen=True)
class Affine(Rule):
    r"""A BatchNorm that cannot be folded, as the elementwise affine map :math:`z = s x + t` (running statistics):
    the z rule on it, :math:`R_x = s x / (s x + t) R_z` (``include_bias=False``: :math:`t` left out, relevance passes
    unchanged where :math:`s x \ne 0`; a zero input, e.g. after a ReLU, gets none: the shift alone explains it)."""

    applies_to = frozenset({Kind.AFFINE})

    stabilizer: float = 1e-6
    include_bias: bool = True

    def __call__(self, ctx, relevance):
        x = ctx.inputs[0]
        scale, _ = batchnorm_affine(ctx.step.target)
        scale = scale.reshape((1, -1) + (1,) * (x.dim() - 2))
        if self.include_bias:  # z is the step's output
            return [safe_divide(relevance, ctx.output, self.stabilizer).mul_(x).mul_(scale)]
        contribution = x * scale
        return [safe_divide(relevance, contribution, self.stabilizer).mul_(contribution)]


@dataclass(frozen=True)
class LayerNorm(Rule):
    r"""AttnLRP's LayerNorm rule: the standard deviation is a constant, so :math:`y = (x - \bar x) w / \sigma + b` is
    linear in :math:`x` and gets the epsilon rule, :math:`R_x = x \odot J^T (R / z)` with :math:`z = y` (``b`` left out
    when ``include_bias=False``). Conserves exactly with ``include_bias=False`` and exact division."""

    applies_to = frozenset({Kind.LAYERNORM})

    stabilizer: float = 1e-6
    include_bias: bool = True

    def __call__(self, ctx, relevance):
        # z is the step's output (less the bias), so only 1/sigma is computed again (by the forward's kernel: on a CPU
        # 5x faster than torch.var); the Jacobian's transpose is g -> (g - mean(g)) w / sigma
        x = ctx.inputs[0]
        shape, weight, bias, eps = layer_norm_parameters(ctx.step.target, *ctx.arguments)
        dims = tuple(range(-len(shape), 0))
        z = ctx.output if bias is None or self.include_bias else ctx.output - bias
        g = safe_divide(relevance, z, self.stabilizer)
        if weight is not None:
            g = g.mul_(weight)  # in place, here and below: the same values without a new tensor each
        g = g.sub_(g.mean(dims, keepdim=True)).mul_(x)
        rstd = torch.native_layer_norm(x, shape, None, None, eps)[2]  # 1/sigma as the forward's kernel has it
        return [g.mul_(rstd)]


def layer_norm_parameters(target, args, kwargs) -> tuple:
    """(normalized_shape, weight, bias, eps) of an ``nn.LayerNorm`` or an ``F.layer_norm`` call."""
    if isinstance(target, nn.LayerNorm):
        return tuple(target.normalized_shape), target.weight, target.bias, target.eps
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args)) | kwargs
    return tuple(bound["normalized_shape"]), bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)


@dataclass(frozen=True)
class Attention(Rule):
    """Self-attention: AttnLRP (softmax rule, uniform rule on both products, epsilon on the projections), or CP-LRP
    with ``cp=True`` (attention weights constant: relevance through the values only). See :mod:`lrp.attention`."""

    applies_to = frozenset({Kind.ATTENTION})

    epsilon: float = 1e-6
    include_bias: bool = True
    cp: bool = False

    def __call__(self, ctx, relevance):
        return [attention.relevance(ctx.step.target, ctx.inputs[0], relevance, self.epsilon, self.include_bias,
                                    self.cp, output=ctx.output)]


def alpha_beta_params(alpha: float | None, beta: float | None) -> tuple[float, float]:
    """Normalise alpha/beta to the common convention (alpha - beta = 1, beta >= 0).

    Accepted: the common convention (e.g. alpha=2, beta=1), the paper's (alpha + beta = 1, beta <= 0, e.g. beta=-1),
    or one of the two alone (beta <= 0 is read as the paper's convention). Anything else is an error.
    """
    alpha, beta = (None if value is None else number(value, name) for value, name in ((alpha, "alpha"), (beta, "beta")))
    if alpha is None and beta is None:
        return 2.0, 1.0
    if alpha is None:
        alpha = 1.0 - beta if beta <= 0 else 1.0 + beta
    if beta is None:
        beta = alpha - 1.0
    alpha, beta = float(alpha), float(beta)
    if abs(alpha - beta - 1.0) < 1e-12 and beta >= 0:
        return alpha, beta
    if abs(alpha + beta - 1.0) < 1e-12 and beta <= 0:
        return alpha, -beta
    raise ValueError(
        f"inconsistent alpha={alpha}, beta={beta}: use the common convention alpha - beta = 1 with beta >= 0 "
        "(e.g. alpha=2, beta=1) or the paper's alpha + beta = 1 with beta <= 0 (e.g. alpha=2, beta=-1)"
    )


def _nonnegative(ctx: StepContext) -> bool:
    """Whether the layer's input has no negative entry: known from the graph (after a ReLU: yes; an affine map's
    output not rectified since: no, see :func:`lrp.canonizers.mark_nonnegative`), else checked.

    The check is one reduction (``amin``, 20x cheaper on CPU than ``(x >= 0).all()``, which writes a boolean tensor
    first), and on a GPU a host synchronisation; a NaN fails it, as it fails ``x >= 0``. Either answer gives the same
    relevance, the x^- terms of the signed form being exact zeros on a non-negative input; the non-negative form is
    only faster."""
    x, step = ctx.inputs[0], ctx.step
    if step.inputs_nonnegative or x.numel() == 0:
        return True
    return not step.inputs_signed and bool(x.amin() >= 0)


def bound_image(bound, x: torch.Tensor) -> torch.Tensor:
    """A z^B bound (float, per-channel (C,) tensor, or broadcastable tensor) as a tensor of the shape of ``x``."""
    bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
    if bound.dim() == 1 and x.dim() > 2 and bound.numel() == x.shape[1]:
        bound = bound.reshape((1, -1) + (1,) * (x.dim() - 2))
    try:
        return bound.expand_as(x)
    except RuntimeError:  # PyTorch's message names neither the rule nor what would fit
        channels = f"a per-channel tensor of {x.shape[1]} values, " if x.dim() > 2 else ""
        raise ValueError(f"ZBox: a bound (low or high) of shape {tuple(bound.shape)} does not fit the first layer's "
                         f"input of shape {tuple(x.shape)}: give a float, {channels}or a tensor broadcastable to "
                         "that shape") from None
