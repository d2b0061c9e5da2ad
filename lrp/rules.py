r"""LRP rules: how one step redistributes the relevance of its output onto its inputs.

Notation: input activations :math:`x_i`, weights :math:`w_{ij}`, bias :math:`b_j`, output relevance :math:`R_j`,
contributions :math:`z_{ij} = x_i w_{ij}`, :math:`(\cdot)^+ = \max(0,\cdot)`, :math:`(\cdot)^- = \min(0,\cdot)`.
Every rule has the form :math:`R_i = x_i \sum_j w'_{ij} R_j / z'_j` for some modified weights :math:`w'` and
denominator :math:`z'`, so it is computed as one (or a few) affine maps forward and transposed maps backward.

``include_bias=True`` (default) uses the biases in the denominators exactly as zennit 0.5 does, so results can be
compared with it; ``include_bias=False`` leaves biases out (zennit's ``zero_params='bias'``), which is the form in which
naive z and alpha-beta conserve relevance exactly: :math:`\sum_i R_i = \sum_j R_j`.
The stabilizer of each denominator is described in :mod:`lrp.stabilize`.

Fast paths: after a ReLU the inputs are non-negative (known from the graph, see ``Step.inputs_nonnegative``, else
checked per batch), so the :math:`x^-` terms vanish and z+, gamma and alpha-beta need one (alpha-beta: one
concatenated) modified affine map instead of two or four; gamma also drops its output-sign masks when no relevance
reaches neurons with non-positive output (the usual case below a ReLU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import attention
from .layers import batchnorm_affine
from .stabilize import safe_divide


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


class Rule:
    """Base class: ``rule(ctx, relevance) -> list of input relevances`` (None for inputs that get none)."""

    params: tuple[str, ...] = ()

    def __call__(self, ctx: StepContext, relevance: torch.Tensor) -> list:
        raise NotImplementedError

    def __repr__(self):
        inner = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params)
        return f"{type(self).__name__}({inner})"


# -- rules for Conv / Linear ------------------------------------------------------------------------------------------
class Epsilon(Rule):
    r"""Epsilon rule (Eq. 3): :math:`R_i = \sum_j z_{ij} / (z_j + \epsilon\,\mathrm{sign}(z_j))\, R_j`.

    ``epsilon=0`` is the naive z rule (Eq. 2) with exact division. Larger epsilon absorbs the relevance of weak or
    contradictory neurons (Binder et al. 2016 compare 0.01 and 100): relevance is never created, only absorbed.
    """

    params = ("epsilon", "include_bias")

    def __init__(self, epsilon: float = 1e-6, include_bias: bool = True):
        self.epsilon, self.include_bias = float(epsilon), include_bias

    def __call__(self, ctx, relevance):
        layer, x, z = ctx.layer, ctx.inputs[0], ctx.output
        weight, bias = layer.params()
        if not self.include_bias and bias is not None:
            z = z - layer.expand_bias(bias, z)
        message = safe_divide(relevance, z, self.epsilon)
        return [layer.transpose(message, x, weight).mul_(x)]


class ZPlus(Rule):
    r"""z+ rule: :math:`R_i = \sum_j (x^+_i w^+_{ij} + x^-_i w^-_{ij}) / z^+_j\, R_j` (alpha=1, beta=0)."""

    params = ("stabilizer", "include_bias")

    def __init__(self, stabilizer: float = 1e-6, include_bias: bool = True):
        self.stabilizer, self.include_bias = float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        w_pos, b_pos = _positive_part(layer)
        b_pos = _bias(b_pos, self.include_bias)
        if _nonnegative(ctx):
            message = safe_divide(relevance, layer.forward(x, w_pos, b_pos), self.stabilizer)
            return [layer.transpose(message, x, w_pos).mul_(x)]
        w_neg, _ = _negative_part(layer)
        xp, xn = _pos(x), _neg(x)
        z = layer.forward(xp, w_pos, b_pos) + layer.forward(xn, w_neg)
        message = safe_divide(relevance, z, self.stabilizer)
        return [xp * layer.transpose(message, x, w_pos) + xn * layer.transpose(message, x, w_neg)]


class AlphaBeta(Rule):
    r"""Alpha-beta rule (Eq. 4): :math:`R_i = \sum_j (\alpha z^+_{ij}/z^+_j - \beta z^-_{ij}/z^-_j) R_j`.

    Parameters follow the common convention :math:`\alpha - \beta = 1`, :math:`\beta \ge 0` (alpha=2, beta=1 is the
    paper's beta=-1). The paper's convention (:math:`\alpha + \beta = 1`, :math:`\beta \le 0`) is accepted and
    converted; see :func:`alpha_beta_params`.
    """

    params = ("alpha", "beta", "stabilizer", "include_bias")

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, include_bias: bool = True):
        self.alpha, self.beta = alpha_beta_params(alpha, beta)
        self.stabilizer, self.include_bias = float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        keep = self.include_bias
        stackable = not layer.is_conv or layer.module.groups == 1
        if stackable and _nonnegative(ctx):
            # one affine map with [w+; w-] stacked on the output axis, one transposed map for both messages
            w_both, b_both = layer.variant("pos_neg", lambda w, b: (
                torch.cat([_pos(w), _neg(w)]), None if b is None else torch.cat([_pos(b), _neg(b)])))
            axis = 1 if layer.is_conv else -1  # the output-feature axis: channels, or last for Linear
            z_pos, z_neg = layer.forward(x, w_both, _bias(b_both, keep)).chunk(2, dim=axis)
            message = torch.cat([
                self.alpha * safe_divide(relevance, z_pos, self.stabilizer),
                -self.beta * safe_divide(relevance, z_neg, self.stabilizer),
            ], dim=axis)
            return [layer.transpose(message, x, w_both).mul_(x)]
        (w_pos, b_pos), (w_neg, b_neg) = _positive_part(layer), _negative_part(layer)
        xp, xn = _pos(x), _neg(x)
        z_pos = layer.forward(xp, w_pos, _bias(b_pos, keep)) + layer.forward(xn, w_neg)
        z_neg = layer.forward(xp, w_neg, _bias(b_neg, keep)) + layer.forward(xn, w_pos)
        m_pos = safe_divide(relevance, z_pos, self.stabilizer)
        m_neg = safe_divide(relevance, z_neg, self.stabilizer)
        positive = xp * layer.transpose(m_pos, x, w_pos) + xn * layer.transpose(m_pos, x, w_neg)
        negative = xp * layer.transpose(m_neg, x, w_neg) + xn * layer.transpose(m_neg, x, w_pos)
        return [self.alpha * positive - self.beta * negative]


class Gamma(Rule):
    r"""Gamma rule: favours positive contributions, :math:`w' = w + \gamma w^+` for neurons with positive output
    (and :math:`w + \gamma w^-` for negative outputs, zennit's generalized form for signed inputs)."""

    params = ("gamma", "stabilizer", "include_bias")

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, include_bias: bool = True):
        self.gamma, self.stabilizer, self.include_bias = float(gamma), float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        layer, x, z = ctx.layer, ctx.inputs[0], ctx.output
        g, keep = self.gamma, self.include_bias
        w_up, b_up = layer.variant(("gamma+", g), lambda w, b: (w + g * _pos(w), None if b is None else b + g * _pos(b)))
        def w_dn_b_dn():
            return layer.variant(("gamma-", g), lambda w, b: (w + g * _neg(w), None if b is None else b + g * _neg(b)))
        if _nonnegative(ctx):
            if not bool((relevance * (z <= 0)).any()):
                # the usual case below a ReLU: relevance only at neurons with positive output, so no masks are needed
                message = safe_divide(relevance, layer.forward(x, w_up, _bias(b_up, keep)), self.stabilizer)
                return [layer.transpose(message, x, w_up).mul_(x)]
            # relevance at non-positive outputs too (e.g. a residual branch feeding a sum): with x >= 0 the x^- terms
            # vanish, so each sign needs one affine map and one transposed map
            r_pos, r_neg = relevance * (z > 0), relevance * (z < 0)
            message = safe_divide(r_pos, layer.forward(x, w_up, _bias(b_up, keep)), self.stabilizer)
            result = layer.transpose(message, x, w_up)
            if bool(r_neg.ne(0).any()):
                w_dn, b_dn = w_dn_b_dn()
                message = safe_divide(r_neg, layer.forward(x, w_dn, _bias(b_dn, keep)), self.stabilizer)
                result = result.add_(layer.transpose(message, x, w_dn))
            return [result.mul_(x)]
        w_dn, b_dn = w_dn_b_dn()
        r_pos = relevance * (z > 0)
        r_neg = relevance * (z < 0)
        xp, xn = _pos(x), _neg(x)
        m_pos = safe_divide(r_pos, layer.forward(xp, w_up, _bias(b_up, keep)) + layer.forward(xn, w_dn), self.stabilizer)
        result = xp * layer.transpose(m_pos, x, w_up) + xn * layer.transpose(m_pos, x, w_dn)
        if bool(r_neg.ne(0).any()):
            z_neg = layer.forward(xp, w_dn, _bias(b_dn, keep)) + layer.forward(xn, w_up)
            m_neg = safe_divide(r_neg, z_neg, self.stabilizer)
            result = result + xp * layer.transpose(m_neg, x, w_dn) + xn * layer.transpose(m_neg, x, w_up)
        return [result]


class ZBox(Rule):
    r"""z^B rule for inputs bounded by ``low <= x <= high`` (pixel layer):
    :math:`R_i = \sum_j (x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}) / z_j\, R_j`. ``low``/``high``: floats, per-channel
    tensors of shape (C,), or tensors broadcastable to the input."""

    params = ("low", "high", "stabilizer", "include_bias")

    def __init__(self, low, high, stabilizer: float = 1e-6, include_bias: bool = True):
        self.low, self.high = low, high
        self.stabilizer, self.include_bias = float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        keep = self.include_bias
        weight, bias = layer.params()
        (w_pos, b_pos), (w_neg, b_neg) = _positive_part(layer), _negative_part(layer)
        low, high = bound_image(self.low, x), bound_image(self.high, x)
        z = ctx.output if keep or bias is None else ctx.output - layer.expand_bias(bias, ctx.output)
        # the bounds are the same image for every row: their affine maps are computed once, then broadcast
        z = z - layer.forward(low[:1], w_pos, _bias(b_pos, keep)) - layer.forward(high[:1], w_neg, _bias(b_neg, keep))
        message = safe_divide(relevance, z, self.stabilizer)
        return [x * layer.transpose(message, x, weight) - low * layer.transpose(message, x, w_pos)
                - high * layer.transpose(message, x, w_neg)]


class Flat(Rule):
    r"""Flat rule: relevance spread uniformly over each neuron's receptive field, :math:`w_{ij} = 1`, :math:`x_i = 1`."""

    params = ("stabilizer",)

    def __init__(self, stabilizer: float = 1e-6, include_bias: bool = True):
        self.stabilizer = float(stabilizer)

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        ones_w, _ = layer.variant("flat", lambda w, b: (torch.ones_like(w), None))
        ones_x = torch.ones_like(x)
        message = safe_divide(relevance, layer.forward(ones_x[:1], ones_w), self.stabilizer)
        return [layer.transpose(message, ones_x, ones_w)]


class WSquare(Rule):
    r"""w^2 rule: :math:`R_i = \sum_j w_{ij}^2 / \sum_{i'} w_{i'j}^2\, R_j` (first layer, unbounded inputs)."""

    params = ("stabilizer", "include_bias")

    def __init__(self, stabilizer: float = 1e-6, include_bias: bool = True):
        self.stabilizer, self.include_bias = float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        layer, x = ctx.layer, ctx.inputs[0]
        w_sq, b_sq = layer.variant("square", lambda w, b: (w * w, None if b is None else b * b))
        ones_x = torch.ones_like(x)
        z = layer.forward(ones_x[:1], w_sq, _bias(b_sq, self.include_bias))  # the same for every row
        return [layer.transpose(safe_divide(relevance, z, self.stabilizer), ones_x, w_sq)]


# -- rules for the other steps ----------------------------------------------------------------------------------------
class Pass(Rule):
    """Relevance passes unchanged (ReLU and other elementwise steps: the neuron is the same neuron)."""

    def __call__(self, ctx, relevance):
        return [relevance] + [None] * (len(ctx.inputs) - 1)


class Norm(Rule):
    r"""Proportional split for parameter-free linear steps (sums, average pooling):
    :math:`R_i = x_i\, \partial z_j/\partial x_i\, R_j / z_j`."""

    params = ("stabilizer",)

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = float(stabilizer)

    def __call__(self, ctx, relevance):
        message = safe_divide(relevance, ctx.output, self.stabilizer)
        return [None if g is None else x * g for x, g in zip(ctx.inputs, ctx.vjp(message))]


class Gradient(Rule):
    """The plain vector-Jacobian product: relevance is moved (or, for baselines, gradients are propagated)."""

    def __call__(self, ctx, relevance):
        if ctx.layer is not None:
            return [ctx.layer.transpose(relevance, ctx.inputs[0], ctx.layer.params()[0])]
        return list(ctx.vjp(relevance))


class DeconvReLU(Rule):
    """DeconvNet's ReLU (Zeiler & Fergus 2014): pass the positive part of the signal, ignoring the forward mask."""

    def __call__(self, ctx, relevance):
        return [relevance.clamp(min=0)]


class Affine(Rule):
    r"""A BatchNorm that cannot be folded, as the elementwise affine map :math:`z = s x + t` (running statistics):
    the z rule on it, :math:`R_x = s x / (s x + t) R_z` (``include_bias=False``: :math:`t` left out, relevance passes
    unchanged where :math:`s x \ne 0`; a zero input, e.g. after a ReLU, gets none: the shift alone explains it)."""

    params = ("stabilizer", "include_bias")

    def __init__(self, stabilizer: float = 1e-6, include_bias: bool = True):
        self.stabilizer, self.include_bias = float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        x = ctx.inputs[0]
        scale, shift = (t.reshape((1, -1) + (1,) * (x.dim() - 2)) for t in batchnorm_affine(ctx.step.target))
        contribution = x * scale
        z = contribution + shift if self.include_bias else contribution
        return [contribution * safe_divide(relevance, z, self.stabilizer)]


class LayerNorm(Rule):
    r"""AttnLRP's LayerNorm rule: the standard deviation is a constant, so :math:`y = (x - \bar x) w / \sigma + b` is
    linear in :math:`x` and gets the epsilon rule, :math:`R_x = x \odot J^T (R / z)` with :math:`z = y` (``b`` left out
    when ``include_bias=False``). Conserves exactly with ``include_bias=False`` and exact division."""

    params = ("stabilizer", "include_bias")

    def __init__(self, stabilizer: float = 1e-6, include_bias: bool = True):
        self.stabilizer, self.include_bias = float(stabilizer), include_bias

    def __call__(self, ctx, relevance):
        x = ctx.inputs[0]
        shape, weight, bias, eps = layer_norm_parameters(ctx.step.target, *ctx.arguments)
        dims = tuple(range(-len(shape), 0))
        centered = x - x.mean(dims, keepdim=True)
        std = (centered.pow(2).mean(dims, keepdim=True) + eps).sqrt()
        scale = 1 / std if weight is None else weight / std
        z = centered * scale
        if self.include_bias and bias is not None:
            z = z + bias
        g = safe_divide(relevance, z, self.stabilizer) * scale
        return [x * (g - g.mean(dims, keepdim=True))]


def layer_norm_parameters(target, args, kwargs) -> tuple:
    """(normalized_shape, weight, bias, eps) of an ``nn.LayerNorm`` or an ``F.layer_norm`` call."""
    if isinstance(target, nn.LayerNorm):
        return tuple(target.normalized_shape), target.weight, target.bias, target.eps
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args)) | kwargs
    return tuple(bound["normalized_shape"]), bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)


class Attention(Rule):
    """Self-attention: AttnLRP (softmax rule, uniform rule on both products, epsilon on the projections), or CP-LRP
    with ``cp=True`` (attention weights constant: relevance through the values only). See :mod:`lrp.attention`."""

    params = ("epsilon", "include_bias", "cp")

    def __init__(self, epsilon: float = 1e-6, include_bias: bool = True, cp: bool = False):
        self.epsilon, self.include_bias, self.cp = float(epsilon), include_bias, cp

    def __call__(self, ctx, relevance):
        return [attention.relevance(ctx.step.target, ctx.inputs[0], relevance, self.epsilon, self.include_bias,
                                    self.cp)]


def alpha_beta_params(alpha: float | None, beta: float | None) -> tuple[float, float]:
    """Normalise alpha/beta to the common convention (alpha - beta = 1, beta >= 0).

    Accepted: the common convention (e.g. alpha=2, beta=1), the paper's (alpha + beta = 1, beta <= 0, e.g. beta=-1),
    or one of the two alone (beta <= 0 is read as the paper's convention). Anything else is an error.
    """
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
    """Whether the layer's input has no negative entry: known from the graph (after a ReLU), else checked."""
    return ctx.step.inputs_nonnegative or bool((ctx.inputs[0] >= 0).all())


def _positive_part(layer):
    return layer.variant("pos", lambda w, b: (_pos(w), None if b is None else _pos(b)))


def _negative_part(layer):
    return layer.variant("neg", lambda w, b: (_neg(w), None if b is None else _neg(b)))


def bound_image(bound, x: torch.Tensor) -> torch.Tensor:
    """A z^B bound (float, per-channel (C,) tensor, or broadcastable tensor) as a tensor of the shape of ``x``."""
    bound = torch.as_tensor(bound, dtype=x.dtype, device=x.device)
    if bound.dim() == 1 and x.dim() > 2 and bound.numel() == x.shape[1]:
        bound = bound.reshape((1, -1) + (1,) * (x.dim() - 2))
    return bound.expand_as(x)
