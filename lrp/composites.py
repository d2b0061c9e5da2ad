"""Composites: which rule each step of a network gets, by name, with parameters.

The LRP composites equal zennit 0.5's of the same name (same rules, same defaults), so results can be checked against
it; ``z``, ``epsilon`` and ``alpha_beta`` apply one rule to every Conv and Linear layer. The baselines (``gradient``,
``gradient_x_input``, ``deconvnet``) are composites too, so every method shares one call shape and one engine.

Common parameters (:class:`Shared`, which also holds the one set of rules for sums, pools, LayerNorms and attention):
``include_bias`` (default True, zennit-compatible; False: biases left out of every denominator, the paper's exactly
conserving form) and ``stabilizer`` (added to denominators of rules other than epsilon; default 1e-6 with biases
included, 0 — exact division — without). Every named composite takes ``by_name`` overrides (step name -> rule).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from .kinds import NO_RELEVANCE, Kind
from .windows import WindowAttention
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
    number,
)


@dataclass(frozen=True)
class Composite:
    """A rule per step kind, an optional override for the first Conv (or any first affine) layer, and the seed.

    ``by_name`` maps step names (module paths, as in ``model.named_modules()``: ``'features.3'``,
    ``'encoder.layers.encoder_layer_0.self_attention'``) to rules that win over every other assignment, as zennit's
    NameMapComposite does; :meth:`with_names` adds such overrides to a named composite.
    """

    name: str
    conv: Rule
    linear: Rule
    first: Rule | None = None
    first_conv_only: bool = True  # zennit's ZBox applies to the first Conv; Flat to the first Conv or Linear
    by_kind: dict = field(default_factory=dict)
    by_name: dict = field(default_factory=dict)  # step name -> rule
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
        """Index of the step the first-layer rule applies to (execution order).

        Refuses ``by_name`` names the network does not have: a misspelt override would otherwise be ignored silently;
        and rules given to steps they cannot compute (:meth:`check_rules`).
        """
        unknown = sorted(set(self.by_name) - {step.name for step in network.steps})
        if unknown:
            raise ValueError(f"composite {self.name!r} names steps the network does not have: {', '.join(unknown)} "
                             "(step names are module paths, as in model.named_modules())")
        first = next((step.index for step in network.steps if step.kind == Kind.LINEAR
                      and (step.layer.is_conv or not self.first_conv_only)), None)
        self.check_rules(network, first)
        return first

    def check_rules(self, network, first_index: int | None) -> None:
        """Every step the backward walk rules gets a :class:`Rule` made for its kind (``Rule.applies_to``): a Conv
        rule on a ReLU or a folded BatchNorm, say, would fail deep inside the walk with no step named."""
        for step in network.steps:
            if step.kind in (Kind.INPUT, Kind.TUPLE) or step.kind in NO_RELEVANCE:  # no rule is ever asked
                continue
            rule = self.rule_for(step, first_index)
            if not isinstance(rule, Rule):
                raise TypeError(f"composite {self.name!r} gives step {step.name!r} ({step.kind}) {rule!r}, "
                                "which is not an lrp.rules.Rule")
            if rule.applies_to is not None and step.kind not in rule.applies_to:
                what = ", ".join(sorted(map(str, rule.applies_to)))
                folded = ": a BatchNorm folded into the layer before it, give that layer the rule" \
                    if isinstance(step.target, nn.modules.batchnorm._BatchNorm) else ""
                raise ValueError(f"composite {self.name!r} gives step {step.name!r} ({step.kind}{folded}) the rule "
                                 f"{rule!r}, which applies to {what} steps only")

    def prepare(self, network, first_index: int | None, x) -> Composite:
        """The composite for the batch ``x``: the first-layer rule may adapt to the steps in front of its layer.

        z^B carries its box through the model's input transform (:meth:`lrp.rules.ZBox.prepare`), whether it is the
        first-layer rule or given by name (at the name's first step); other rules are used as they are.
        """
        first = self.first
        if first is not None and first_index is not None:
            first = first.prepare(network, first_index, x)
        by_name = self.by_name
        adapting = [name for name, rule in by_name.items() if type(rule).prepare is not Rule.prepare]
        if adapting:
            at = {}
            for step in network.steps:
                at.setdefault(step.name, step.index)
            by_name = {**by_name, **{name: by_name[name].prepare(network, at[name], x) for name in adapting}}
        if first is self.first and by_name is self.by_name:
            return self
        return dataclasses.replace(self, first=first, by_name=by_name)

    def with_names(self, by_name: dict) -> Composite:
        """This composite with the rules of ``by_name`` (step name -> rule) overriding its own for those steps."""
        if not isinstance(by_name, Mapping) or not all(isinstance(name, str) for name in by_name):
            raise TypeError(f"by_name must be a dict of step names (module paths, strings) to lrp.rules.Rule objects, "
                            f"got {by_name!r}")
        wrong = sorted(name for name, rule in by_name.items() if not isinstance(rule, Rule))
        if wrong:
            raise TypeError(
                f"by_name must map step names to lrp.rules.Rule objects; not a rule for: {', '.join(wrong)}")
        return dataclasses.replace(self, by_name={**self.by_name, **by_name})


@dataclass(frozen=True)
class Shared:
    """The parameters every LRP composite shares, and the rules they give the steps that are not Conv/Linear.

    ``stabilizer`` (rules other than epsilon) defaults to 1e-6 with biases included (zennit's) and to 0 (exact division)
    without; ``epsilon`` is the composite's epsilon, which its attention rule uses too (None: the stabilizer).
    """

    include_bias: bool = True
    stabilizer: float | None = None
    epsilon: float | None = None

    def __post_init__(self):
        if self.stabilizer is None:
            object.__setattr__(self, "stabilizer", 1e-6 if self.include_bias else 0.0)
        object.__setattr__(self, "stabilizer", number(self.stabilizer, "stabilizer"))

    def kinds(self) -> dict:
        """The one set of rules for sums, pools, unfoldable BatchNorms, LayerNorms and attention."""
        s, keep = self.stabilizer, self.include_bias
        return {
            Kind.SUM: Norm(s), Kind.AVGPOOL: Norm(s),
            Kind.AFFINE: Affine(s, keep),
            Kind.LAYERNORM: LayerNorm(s, keep),
            Kind.ATTENTION: Attention(s if self.epsilon is None else self.epsilon, keep),
            Kind.WINDOW_ATTENTION: WindowAttention(s if self.epsilon is None else self.epsilon),  # lrp/windows.py
        }

    def composite(self, name: str, conv: Rule, linear: Rule, first: Rule | None = None,
                  first_conv_only: bool = True) -> Composite:
        """A named LRP composite: ``conv``/``linear`` (and ``first``) with these shared rules for the other kinds."""
        return Composite(name, conv, linear, first=first, first_conv_only=first_conv_only, by_kind=self.kinds())


_GRADIENT = Gradient()
_DEFAULT_KINDS = {
    Kind.ACTIVATION: Pass(),
    Kind.IDENTITY: Pass(),
    Kind.SCALE: Pass(),
    Kind.SHIFT: Pass(),
    Kind.MAXPOOL: _GRADIENT,  # winner takes all
    Kind.STRUCTURAL: _GRADIENT,  # reshape / cat / index: relevance moves, unchanged
    Kind.OUTPUT: Pass(),
    Kind.POINTWISE: Pass(),  # identity rule for smooth activations (AttnLRP, Eq. 9)
    Kind.GATE: Pass(),  # the gate is a constant scale: relevance to the gated path only
    # residual sums and average pools: proportional split (zennit's default stabilizer); Affine, LayerNorm, Attention
    **Shared(include_bias=True, stabilizer=1e-6).kinds(),
}


def z(include_bias=True, stabilizer=None):
    """Naive z rule (Eq. 2) on every Conv and Linear layer: epsilon = 0, exact division."""
    rule = Epsilon(0.0, include_bias)
    return Shared(include_bias, stabilizer).composite("z", rule, rule)


def epsilon(epsilon=1e-6, include_bias=True, stabilizer=None):
    """Epsilon rule (Eq. 3) on every Conv and Linear layer."""
    rule = Epsilon(epsilon, include_bias)
    return Shared(include_bias, stabilizer, epsilon).composite("epsilon", rule, rule)


def alpha_beta(alpha=None, beta=None, include_bias=True, stabilizer=None):
    """Alpha-beta rule (Eq. 4) on every Conv and Linear layer; default alpha=2, beta=1 (the paper's beta=-1)."""
    shared = Shared(include_bias, stabilizer)
    rule = AlphaBeta(alpha, beta, shared.stabilizer, include_bias)
    return shared.composite("alpha_beta", rule, rule)


def epsilon_plus(epsilon=1e-6, include_bias=True, stabilizer=None):
    """z+ on Conv layers, epsilon on Linear layers (zennit's EpsilonPlus)."""
    shared = Shared(include_bias, stabilizer, epsilon)
    return shared.composite("epsilon_plus", ZPlus(shared.stabilizer, include_bias), Epsilon(epsilon, include_bias))


def epsilon_plus_flat(epsilon=1e-6, include_bias=True, stabilizer=None):
    """epsilon_plus with the flat rule on the first Conv or Linear layer (zennit's EpsilonPlusFlat)."""
    shared = Shared(include_bias, stabilizer, epsilon)
    return shared.composite("epsilon_plus_flat", ZPlus(shared.stabilizer, include_bias), Epsilon(epsilon, include_bias),
                            first=Flat(shared.stabilizer), first_conv_only=False)


def epsilon_gamma_box(low=None, high=None, epsilon=1e-6, gamma=0.25, include_bias=True, stabilizer=None):
    """Gamma on Conv layers, epsilon on Linear layers, z^B on the first Conv (zennit's EpsilonGammaBox).

    ``low``/``high`` are the smallest and largest input values (after normalization), floats or per-channel tensors.
    """
    if low is None or high is None:
        raise ValueError(
            "composite 'epsilon_gamma_box' needs low= and high=: the smallest and largest possible input values after "
            "normalization (e.g. low=-2.12, high=2.64 for ImageNet-normalized images, or per-channel tensors)"
        )
    shared = Shared(include_bias, stabilizer, epsilon)
    s = shared.stabilizer
    return shared.composite("epsilon_gamma_box", Gamma(gamma, s, include_bias), Epsilon(epsilon, include_bias),
                            first=ZBox(low, high, s, include_bias))


def epsilon_alpha2_beta1(epsilon=1e-6, include_bias=True, stabilizer=None):
    """Alpha2-beta1 on Conv layers, epsilon on Linear layers (zennit's EpsilonAlpha2Beta1)."""
    shared = Shared(include_bias, stabilizer, epsilon)
    return shared.composite("epsilon_alpha2_beta1", AlphaBeta(2.0, 1.0, shared.stabilizer, include_bias),
                            Epsilon(epsilon, include_bias))


def epsilon_alpha2_beta1_flat(epsilon=1e-6, include_bias=True, stabilizer=None):
    """epsilon_alpha2_beta1 with the flat rule on the first Conv or Linear layer (zennit's EpsilonAlpha2Beta1Flat)."""
    shared = Shared(include_bias, stabilizer, epsilon)
    return shared.composite("epsilon_alpha2_beta1_flat", AlphaBeta(2.0, 1.0, shared.stabilizer, include_bias),
                            Epsilon(epsilon, include_bias), first=Flat(shared.stabilizer), first_conv_only=False)


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
    kinds = {kind: _GRADIENT for kind in (Kind.ACTIVATION, Kind.SUM, Kind.AVGPOOL, Kind.SCALE, Kind.SHIFT,
                                          Kind.POINTWISE, Kind.GATE, Kind.AFFINE, Kind.LAYERNORM, Kind.ATTENTION,
                                          Kind.WINDOW_ATTENTION)}
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


def make_composite(name: str, by_name: dict | None = None, **params) -> Composite:
    """Build a named composite; unknown names and parameters the composite does not use are errors.

    ``by_name`` (step name -> rule) overrides the composite's rules for those steps (:meth:`Composite.with_names`).
    """
    factory = _factory(name)
    accepted = composite_parameters(name)
    unused = sorted(set(params) - set(accepted))
    if unused:
        raise TypeError(
            f"composite {name!r} does not use parameter(s) {', '.join(unused)}; "
            f"it accepts: {', '.join(accepted + ('by_name',))}"
        )
    composite = factory(**params)
    return composite if by_name is None else composite.with_names(by_name)


def _factory(name: str):
    if name not in _FACTORIES:
        raise ValueError(f"unknown composite {name!r}; choose one of: {', '.join(COMPOSITES)}")
    return _FACTORIES[name]
