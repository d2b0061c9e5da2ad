"""Agreement with captum's LRP (a dev dependency) in float64, on the torchvision models captum's LRP can explain.

captum's LRP hooks modules: each Conv, Linear, pooling and BatchNorm module gets a rule, ReLU and Dropout modules pass
relevance through, and every other operation is differentiated as it is. That is LRP only where each module runs
once and every operation between ruled modules is piecewise linear and moves relevance exactly (flatten, cat, ReLU).
Of the zoo (``torchvision.models.list_models``, measured with ``epsilon`` everywhere, 2026-12-07):

- rel. L2 below 1e-7: alexnet, the eight VGGs, squeezenet1_0/1_1, googlenet: the models compared here;
- captum refuses: a module type it has no rule for (ConvNeXt's LayerNorm2d, SiLU, ReLU6, Hardswish, Sigmoid, GELU,
  LayerNorm, ShuffleNet's Sequential, Swin's Permute): ConvNeXt, EfficientNet, MobileNet, RegNet-Y, ShuffleNet,
  Swin, MaxViT, ViT;
- captum returns a map that is not LRP (rel. L2 near 1 or larger): ResNet/ResNeXt/Wide ResNet, RegNet-X and MNASNet
  (residual sums are functional, so captum gives both addends the whole relevance; ResNets also call one ReLU module
  twice per block), DenseNet (functional ReLU and average pooling before the head) and inception_v3 (functional
  pooling in its blocks).

Rules: captum's ``EpsilonRule`` (epsilon on the plain z, signs as ours: sign(0) = 1), ``Alpha1_Beta0_Rule`` (z+
with the weights clamped) and ``GammaRule`` (w + gamma w+). captum keeps every bias in its denominators and its z+
and gamma rules have no negative-input terms, so the z+ and gamma comparisons run on models without biases and keep
epsilon on the first Conv (the only layer with negative inputs). Tiny epsilon and stabilizer (1e-12) in both, so the
comparison tests the rules and not two ways of stabilizing; captum stabilizes a BatchNorm separately from its Conv,
which is where googlenet's and the BN VGGs' remaining 1e-9 .. 5e-8 come from.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_lrp_zennit import relative_error
from torch import nn

import lrp
from zoo_models import build

captum_lrp = pytest.importorskip("captum.attr._utils.lrp_rules")
captum_attr = pytest.importorskip("captum.attr")

EPS = 1e-12
TOLERANCE = 1e-6
RULED = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.BatchNorm2d)
TARGET = torch.tensor([1, 3])


def _model(name: str, biases: bool = True) -> tuple[nn.Module, torch.Tensor]:
    model, size = build(name)
    model = model.double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False  # captum's tensor hooks need the ReLU's input kept
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # statistics away from init's 0 / 1
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            if not biases and getattr(module, "bias", None) is not None:
                module.bias.zero_()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def _captum(model: nn.Module, x: torch.Tensor, conv_rule, first: str | None = None) -> torch.Tensor:
    """captum's LRP with ``conv_rule`` on every Conv but ``first`` and epsilon on the rest of the ruled modules."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name != first:
            module.rule = conv_rule()
        elif isinstance(module, RULED):
            module.rule = captum_lrp.EpsilonRule(EPS)
    relevance = captum_attr.LRP(model).attribute(x.clone().requires_grad_(True), target=TARGET)
    return relevance.detach()


def _first_conv(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "vgg11_bn", "squeezenet1_0", "googlenet"])
def test_epsilon_matches_captum(name):
    model, x = _model(name)
    reference = _captum(model, x, lambda: captum_lrp.EpsilonRule(EPS))
    ours = lrp.Explainer(model, "epsilon", epsilon=EPS, stabilizer=EPS)(x, TARGET).relevance
    assert relative_error(ours, reference) < TOLERANCE


CONV_RULES = {
    # our composite (its Conv rule, epsilon on Linear) and its parameters: captum's Conv rule
    "epsilon_plus": ({}, lambda: captum_lrp.Alpha1_Beta0_Rule()),
    "epsilon_gamma_box": ({"gamma": 0.25, "low": -3.0, "high": 3.0}, lambda: captum_lrp.GammaRule(0.25)),
}


@pytest.mark.parametrize("composite", list(CONV_RULES))
@pytest.mark.parametrize("name", ["alexnet", "vgg11", "squeezenet1_1"])
def test_conv_rules_match_captum(name, composite):
    model, x = _model(name, biases=False)
    params, conv_rule = CONV_RULES[composite]
    first = _first_conv(model)
    reference = _captum(model, x, conv_rule, first=first)
    explainer = lrp.Explainer(model, composite, epsilon=EPS, stabilizer=EPS, by_name={first: lrp.rules.Epsilon(EPS)},
                              **params)
    ours = explainer(x, TARGET).relevance
    assert relative_error(ours, reference) < TOLERANCE
    # not vacuous: the Conv rule changes the map, so the agreement tests it
    epsilon = lrp.Explainer(model, "epsilon", epsilon=EPS, stabilizer=EPS)(x, TARGET).relevance
    assert relative_error(epsilon, reference) > 1e-2
