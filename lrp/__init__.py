"""lrp: Layer-wise Relevance Propagation in pure PyTorch.

>>> import lrp
>>> explainer = lrp.Explainer(model, composite="epsilon_gamma_box", gamma=0.25, low=-3.0, high=3.0)
>>> result = explainer(x, target)
>>> result.relevance.shape == x.shape, result.output   # f(x): the explained logits

Modules: :mod:`lrp.rules` (one rule per formula), :mod:`lrp.composites` (rules assigned to layers, by name),
:mod:`lrp.canonizers` (BatchNorm folding, residual sums, concatenation), :mod:`lrp.graph` (the traced network),
:mod:`lrp.explainer`, :mod:`lrp.heatmap`.
"""
from . import rules
from .composites import BASELINES, COMPOSITES, Composite, composite_parameters, make_composite
from .explainer import Explainer, Explanation
from .heatmap import heatmap
from .layers import UnsupportedLayerError

__all__ = [
    "BASELINES", "COMPOSITES", "Composite", "Explainer", "Explanation", "UnsupportedLayerError",
    "composite_parameters", "heatmap", "make_composite", "rules",
]
