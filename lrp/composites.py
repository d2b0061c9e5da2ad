"""Composites: which rule each step of a network gets, by name, with parameters.

The LRP composites equal zennit 0.5's of the same name (same rules, same defaults), so results can be checked against
it; ``z``, ``epsilon`` and ``alpha_beta`` apply one rule to every Conv and Linear layer. The baselines (``gradient``,
``gradient_x_input``, ``deconvnet``) are composites too, so every method shares one call shape and one engine.

Common parameters: ``include_bias`` (default True, zennit-compatible; False: biases left out of every denominator, the
paper's exactly conserving form) and ``stabilizer`` (added to denominators of rules other than epsilon; default 1e-6
with biases included, 0 — exact division — without).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from .kinds import Kind
from .rules import (
    Affine,
    AlphaBeta,
    Attention,
    DeconvReLU,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    LayerNorm,
    Norm,
    Pass,
    Rule,
    ZBox,
    ZPlus,
)


@dataclass(frozen=True)
class Composite:
    """A rule per step kind, an optional override for the first Conv (or any first affine) layer, and the seed."""

    name: str
    conv: Rule
    linear: Rule
    first: Rule | None = None
    first_conv_only: bool = True  # zennit's ZBox applies to the first Conv; Flat to the first Conv or Linear
    by_kind: dict = field(default_factory=dict)
    by_name: dict = field(default_factory=dict)  # step name ('features.3', 'encoder.layers.0.self_attention') -> rule
    seed: str = "relevance"  # "relevance": start from f(x) at the target; "gradient": from 1
    times_input: bool = False  # gradient x input

    def rule_for(self, step, first_index: int | None) -> Rule:
        if step.name in self.by_name:
            return self.by_name[step.name]
        if step.kind == Kind.LINEAR:
            if step.index == first_index and self.first is not None:
                return self.first
            return self.conv if step.layer.is_conv else self.linear
        return self.by_kind.get(step.kind) or _DEFAULT_KINDS[step.kind]

    def first_layer(self, network) -> int | None:
        """Index of the step the first-layer rule applies to (execution order)."""
        for step in network.steps:
            if step.kind == Kind.LINEAR and (step.layer.is_conv or not self.first_conv_only):
                return step.index
        return None


_GRADIENT = Gradient()
_DEFAULT_KINDS = {
    Kind.ACTIVATION: Pass(),
    Kind.IDENTITY: Pass(),
    Kind.SCALE: Pass(),
    Kind.SHIFT: Pass(),
    Kind.MAXPOOL: _GRADIENT,  # winner takes all
    Kind.STRUCTURAL: _GRADIENT,  # reshape / cat / index: relevance moves, unchanged
    Kind.SUM: Norm(1e-6),  # residual sums and average pools: proportional split (zennit's default stabilizer)
    Kind.AVGPOOL: Norm(1e-6),
    Kind.OUTPUT: Pass(),
    Kind.POINTWISE: Pass(),  # identity rule for smooth activations (AttnLRP, Eq. 9)
    Kind.GATE: Pass(),  # the gate is a constant scale: relevance to the gated path only
    Kind.AFFINE: Affine(1e-6),
    Kind.LAYERNORM: LayerNorm(1e-6),
    Kind.ATTENTION: Attention(1e-6),
}


def _lrp_kinds(stabilizer: float, include_bias: bool = True, epsilon: float | None = None) -> dict:
    """The rules every LRP composite gives the steps that are not Conv/Linear (one set of Norm defaults)."""
    return {
        Kind.SUM: Norm(stabilizer), Kind.AVGPOOL: Norm(stabilizer),
        Kind.AFFINE: Affine(stabilizer, include_bias),
        Kind.LAYERNORM: LayerNorm(stabilizer, include_bias),
        Kind.ATTENTION: Attention(stabilizer if epsilon is None else epsilon, include_bias),
    }


def _stabilizer(stabilizer, include_bias) -> float:
    if stabilizer is None:
        return 1e-6 if include_bias else 0.0
    return float(stabilizer)


def z(include_bias=True, stabilizer=None):
    """Naive z rule (Eq. 2) on every Conv and Linear layer: epsilon = 0, exact division."""
    s = _stabilizer(stabilizer, include_bias)
    rule = Epsilon(0.0, include_bias)
    return Composite("z", rule, rule, by_kind=_lrp_kinds(s, include_bias))


def epsilon(epsilon=1e-6, include_bias=True, stabilizer=None):
    """Epsilon rule (Eq. 3) on every Conv and Linear layer."""
    s = _stabilizer(stabilizer, include_bias)
    rule = Epsilon(epsilon, include_bias)
    return Composite("epsilon", rule, rule, by_kind=_lrp_kinds(s, include_bias, epsilon))


def alpha_beta(alpha=None, beta=None, include_bias=True, stabilizer=None):
    """Alpha-beta rule (Eq. 4) on every Conv and Linear layer; default alpha=2, beta=1 (the paper's beta=-1)."""
    s = _stabilizer(stabilizer, include_bias)
    rule = AlphaBeta(alpha, beta, s, include_bias)
    return Composite("alpha_beta", rule, rule, by_kind=_lrp_kinds(s, include_bias))


def epsilon_plus(epsilon=1e-6, include_bias=True, stabilizer=None):
    """z+ on Conv layers, epsilon on Linear layers (zennit's EpsilonPlus)."""
    s = _stabilizer(stabilizer, include_bias)
    return Composite("epsilon_plus", ZPlus(s, include_bias), Epsilon(epsilon, include_bias),
                     by_kind=_lrp_kinds(s, include_bias, epsilon))


def epsilon_plus_flat(epsilon=1e-6, include_bias=True, stabilizer=None):
    """epsilon_plus with the flat rule on the first Conv or Linear layer (zennit's EpsilonPlusFlat)."""
    s = _stabilizer(stabilizer, include_bias)
    return Composite("epsilon_plus_flat", ZPlus(s, include_bias), Epsilon(epsilon, include_bias), first=Flat(s),
                     first_conv_only=False, by_kind=_lrp_kinds(s, include_bias, epsilon))


def epsilon_gamma_box(low=None, high=None, epsilon=1e-6, gamma=0.25, include_bias=True, stabilizer=None):
    """Gamma on Conv layers, epsilon on Linear layers, z^B on the first Conv (zennit's EpsilonGammaBox).

    ``low``/``high`` are the smallest and largest input values (after normalization), floats or per-channel tensors.
    """
    if low is None or high is None:
        raise ValueError(
            "composite 'epsilon_gamma_box' needs low= and high=: the smallest and largest possible input values after "
            "normalization (e.g. low=-2.12, high=2.64 for ImageNet-normalized images, or per-channel tensors)"
        )
    s = _stabilizer(stabilizer, include_bias)
    return Composite("epsilon_gamma_box", Gamma(gamma, s, include_bias), Epsilon(epsilon, include_bias),
                     first=ZBox(low, high, s, include_bias), by_kind=_lrp_kinds(s, include_bias, epsilon))


def epsilon_alpha2_beta1(epsilon=1e-6, include_bias=True, stabilizer=None):
    """Alpha2-beta1 on Conv layers, epsilon on Linear layers (zennit's EpsilonAlpha2Beta1)."""
    s = _stabilizer(stabilizer, include_bias)
    return Composite("epsilon_alpha2_beta1", AlphaBeta(2.0, 1.0, s, include_bias), Epsilon(epsilon, include_bias),
                     by_kind=_lrp_kinds(s, include_bias, epsilon))


def epsilon_alpha2_beta1_flat(epsilon=1e-6, include_bias=True, stabilizer=None):
    """epsilon_alpha2_beta1 with the flat rule on the first Conv or Linear layer (zennit's EpsilonAlpha2Beta1Flat)."""
    s = _stabilizer(stabilizer, include_bias)
    return Composite("epsilon_alpha2_beta1_flat", AlphaBeta(2.0, 1.0, s, include_bias), Epsilon(epsilon, include_bias),
                     first=Flat(s), first_conv_only=False, by_kind=_lrp_kinds(s, include_bias, epsilon))


def gradient():
    """Sensitivity (Simonyan et al. 2013): the gradient of the target logit with respect to the input."""
    return _gradient_composite("gradient")


def gradient_x_input():
    """Gradient times input."""
    return _gradient_composite("gradient_x_input", times_input=True)


def deconvnet():
    """DeconvNet (Zeiler & Fergus 2014): gradient with ReLUs passing the positive part of the backward signal."""
    return _gradient_composite("deconvnet", relu=DeconvReLU())


def _gradient_composite(name, times_input=False, relu=None):
    kinds = {kind: _GRADIENT for kind in (Kind.ACTIVATION, Kind.SUM, Kind.AVGPOOL, Kind.SCALE, Kind.SHIFT, Kind.POINTWISE,
                                          Kind.GATE, Kind.AFFINE, Kind.LAYERNORM, Kind.ATTENTION)}
    if relu is not None:
        kinds[Kind.ACTIVATION] = relu
    return Composite(name, _GRADIENT, _GRADIENT, by_kind=kinds, seed="gradient", times_input=times_input)


_FACTORIES = {f.__name__: f for f in (
    z, epsilon, alpha_beta, epsilon_plus, epsilon_plus_flat, epsilon_gamma_box, epsilon_alpha2_beta1,
    epsilon_alpha2_beta1_flat, gradient, gradient_x_input, deconvnet,
)}

#: Names accepted by :func:`make_composite` and :class:`lrp.Explainer`.
COMPOSITES = tuple(_FACTORIES)
#: The subset that are baselines rather than LRP.
BASELINES = ("gradient", "gradient_x_input", "deconvnet")


def composite_parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters a named composite accepts."""
    return tuple(inspect.signature(_factory(name)).parameters)


def make_composite(name: str, **params) -> Composite:
    """Build a named composite; unknown names and parameters the composite does not use are errors."""
    factory = _factory(name)
    accepted = composite_parameters(name)
    unused = sorted(set(params) - set(accepted))
    if unused:
        raise TypeError(
            f"composite {name!r} does not use parameter(s) {', '.join(unused)}; "
            f"it accepts: {', '.join(accepted) or 'no parameters'}"
        )
    return factory(**params)


def _factory(name: str):
    if name not in _FACTORIES:
        raise ValueError(f"unknown composite {name!r}; choose one of: {', '.join(COMPOSITES)}")
    return _FACTORIES[name]
