"""zennit 0.5.1 agreement (float64, relative L2 < 1e-6) on the zoo's new layer families.

Compared, with the same rule assignment (``tests/helpers/zoo_twins.py`` says how the zennit twin expresses it):
resnext50_32x4d (grouped conv), mobilenet_v2 (depthwise conv, ReLU6, residuals), mobilenet_v3_small (Hardswish,
Hardsigmoid squeeze-and-excitation gates), efficientnet_b0 (SiLU, SiLU/Sigmoid gates, stochastic depth at eval),
densenet121 (``torch.cat`` of many inputs, BatchNorms after concatenations as ``affine`` steps),
shufflenet_v2_x0_5 (chunk, channel shuffle, ``x.mean``), regnet_y_400mf (grouped conv, projected residuals, ReLU/Sigmoid
gates) and mnasnet0_5 (residuals, ``x.mean``).

Not compared, and why: convnext_* and vit_* (zennit has no LayerNorm rule, nor one for attention: it maps
``nn.MultiheadAttention`` to ``Pass``; ViT is checked against lxt in tests/test_lrp_vit_lxt.py); inception_v3
(functional ``F.avg_pool2d`` in every block: zennit gives it a gradient, not the Norm rule, and a twin would have to
rewrite each block); swin_* and maxvit_t (windowed attention: no zennit rules).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from test_lrp_zennit import relative_error

import lrp
from helpers.zennit_reference import HIGH, LOW, randomize, zennit_composite, zennit_relevance
from helpers.zoo_twins import canonizers_for, module_pools, with_twin_rules, zennit_twin

TOLERANCE = 1e-6

FAMILIES = ["resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
            "shufflenet_v2_x0_5", "regnet_y_400mf", "mnasnet0_5"]
COMPOSITES = ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]
# without biases: our Affine drops the whole shift t = beta - mean * s, zennit's zero_params only beta, so DenseNet's
# unmergeable BatchNorms are compared with biases only
WITHOUT_BIAS = ["resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
                "regnet_y_400mf", "mnasnet0_5"]


def _params(composite):
    return {"low": LOW, "high": HIGH} if composite == "epsilon_gamma_box" else {}


class ZooCase:
    """A float64 random-init model (random BatchNorm statistics), its zennit twin, inputs and targets."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        self.model = module_pools(randomize(model.double().eval()))
        self.twin = zennit_twin(copy.deepcopy(self.model))
        self.x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        self.x = self.x.clamp(LOW, HIGH)
        self.target = torch.tensor([3, 7])

    def ours(self, composite, **params):
        return lrp.Explainer(self.model, composite, **params)(self.x, self.target).relevance

    def zennit(self, composite, include_bias=True, **params):
        zc = with_twin_rules(self.twin, zennit_composite(composite, include_bias=include_bias, **params))
        return zennit_relevance(self.twin, self.x, self.target, zc)


@pytest.fixture(scope="module")
def case(request):
    return ZooCase(request.param)


@pytest.mark.parametrize("case", FAMILIES, indirect=True)
def test_twin_computes_the_models_function(case):
    with torch.no_grad():
        torch.testing.assert_close(case.twin(case.x), case.model(case.x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", FAMILIES, indirect=True)
@pytest.mark.parametrize("composite", COMPOSITES)
def test_new_families_match_zennit(case, composite):
    assert relative_error(case.ours(composite, **_params(composite)), case.zennit(composite, **_params(composite))) \
        < TOLERANCE


@pytest.mark.parametrize("case", WITHOUT_BIAS, indirect=True)
def test_new_families_without_bias_match_zennit(case):
    ours = case.ours("epsilon_plus", include_bias=False, stabilizer=1e-6)
    assert relative_error(ours, case.zennit("epsilon_plus", include_bias=False)) < TOLERANCE


def test_functional_pools_are_the_module_pools():
    # the twins use module pools; our engine gives F.adaptive_avg_pool2d / x.mean the same avgpool rule
    for name in ("mobilenet_v2", "densenet121", "shufflenet_v2_x0_5", "mnasnet0_5"):
        torch.manual_seed(0)
        model = randomize(torchvision.models.get_model(name, weights=None, num_classes=10).double().eval())
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        plain = lrp.Explainer(model, "epsilon_plus")(x, 3).relevance
        pooled = lrp.Explainer(module_pools(model), "epsilon_plus")(x, 3).relevance
        assert relative_error(plain, pooled) < 1e-12


@pytest.mark.parametrize("case", ["efficientnet_b0", "densenet121"], indirect=True)
def test_zennit_without_the_twin_gives_another_map(case):
    # what the twin is for: plain zennit gives residual sums and gates a gradient and BatchNorms Pass (measured: rel.
    # L2 0.48 on efficientnet_b0, 0.27 on densenet121), so the agreement above is not vacuous
    plain = zennit_composite("epsilon_plus", canonizers=canonizers_for(case.model))
    reference = zennit_relevance(copy.deepcopy(case.model), case.x, case.target, plain)
    assert relative_error(case.ours("epsilon_plus"), reference) > 0.1
