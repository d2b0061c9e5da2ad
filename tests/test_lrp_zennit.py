"""Agreement with zennit 0.5.1 (the field's reference LRP implementation) in float64 on torchvision models.

Each LRP composite is compared with zennit's composite of the same name (``epsilon`` and ``alpha_beta``: a zennit
``LayerMapComposite`` with the same rule on every Conv and Linear layer), with biases in the denominators (the default)
and without (``include_bias=False`` against zennit's ``zero_params='bias'``). The baselines are compared with autograd
(gradient, gradient x input) and zennit's DeconvNet. The pass criterion is a relative L2 error below 1e-6.

Two zennit quirks are worked around here, each where it matters:

1. zennit's ``MergeBatchNorm`` canonizer folds BatchNorm into the preceding layer but leaves the BatchNorm computing
   ``x / sqrt(1 + eps)`` instead of the identity (it resets the statistics to mean 0, var 1 and keeps ``eps``). Models
   compared with zennit therefore get ``eps = 0`` on every BatchNorm. Our folding is exact; it is tested on its own
   against a model folded by hand, with a non-zero ``eps`` (``test_batchnorm_folding_*``).
2. zennit's DeconvNet only hooks ``nn.ReLU`` modules, so it misses GoogLeNet's functional ``F.relu`` and computes a
   plain gradient there; the DeconvNet comparison skips GoogLeNet only.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from zennit.composites import layer_map_base
from zennit.rules import Epsilon
from zennit.types import Convolution

import lrp
from helpers.zennit_cases import MODELS, Case
from helpers.zennit_reference import HIGH, LOW, autograd_gradient, randomize, zennit_composite, zennit_relevance

TOLERANCE = 1e-6

LRP_COMPOSITES = [
    "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat",
    "epsilon", "alpha_beta",
]
def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||; the reference must not be all zero (a vacuous comparison)."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    norm = reference.norm().item()
    assert norm > 0, "the reference relevance is all zero: the comparison would be vacuous"
    return (ours - reference).norm().item() / norm


@pytest.fixture(scope="module")
def case(request):
    return Case(request.param)


# Which comparisons run where: every composite on every architecture except the costly resnet50 and the transformed
# GoogLeNet (a covering subset: the same rules on larger weights), and every composite without biases somewhere.
# Plain VGG16 is VGG16-BN without the BatchNorms; it is compared at full width below. This keeps the file near 90 s
# on 2 cores: each float64 comparison costs seconds of weight modification in both engines.
_ALL = LRP_COMPOSITES
PLAN = {
    # model: (composites with biases, composites with include_bias=False)
    "alexnet": (_ALL, ["epsilon_gamma_box", "alpha_beta", "epsilon_plus_flat", "epsilon_alpha2_beta1_flat"]),
    "vgg16_bn": (_ALL, ["epsilon_plus_flat", "epsilon_alpha2_beta1"]),
    "googlenet": (_ALL, ["epsilon_gamma_box", "alpha_beta", "epsilon"]),
    "googlenet_transform_input": (["epsilon_gamma_box", "epsilon_plus_flat", "epsilon"], []),
    "resnet18": (_ALL, ["epsilon_plus", "epsilon_gamma_box", "alpha_beta", "epsilon"]),
    "resnet50": (["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"], ["epsilon_alpha2_beta1_flat"]),
}
WITH_BIAS = [(model, composite) for model, (plan, _) in PLAN.items() for composite in plan]
WITHOUT_BIAS = [(model, composite) for model, (_, plan) in PLAN.items() for composite in plan]
ARCHITECTURES = list(PLAN)


def _params(composite: str) -> dict:
    return {"low": LOW, "high": HIGH} if composite == "epsilon_gamma_box" else {}


# -- the tests --------------------------------------------------------------------------------------------------------
def test_every_model_and_composite_is_compared():
    assert {model for model, _ in WITH_BIAS} == set(MODELS) - {"vgg16"}
    assert {composite for _, composite in WITH_BIAS} == set(LRP_COMPOSITES)
    assert {composite for _, composite in WITHOUT_BIAS} == set(LRP_COMPOSITES)


@pytest.mark.parametrize("case, composite", WITH_BIAS, indirect=["case"])
def test_composite_matches_zennit(case, composite):
    ours = case.ours(composite, **_params(composite))
    assert relative_error(ours.relevance, case.zennit(composite, **_params(composite))) < TOLERANCE


@pytest.mark.parametrize("case, composite", WITHOUT_BIAS, indirect=["case"])
def test_composite_without_bias_matches_zennit_zero_params_bias(case, composite):
    # zennit keeps its 1e-6 stabilizer with zero_params='bias'; ours defaults to exact division without biases
    ours = case.ours(composite, include_bias=False, stabilizer=1e-6, **_params(composite))
    reference = case.zennit(composite, include_bias=False, **_params(composite))
    assert relative_error(ours.relevance, reference) < TOLERANCE


@pytest.mark.parametrize("case", ARCHITECTURES, indirect=True)
def test_explained_output_is_the_target_logit(case):
    ours = case.ours("epsilon")
    with torch.no_grad():
        logits = case.model(case.x)
    torch.testing.assert_close(ours.logits, logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.output, logits[torch.arange(2), case.target], rtol=1e-10, atol=1e-12)
    assert ours.target.tolist() == case.target.tolist()


@pytest.mark.parametrize("case", ARCHITECTURES, indirect=True)
def test_gradient_matches_autograd(case):
    gradient = autograd_gradient(case.model, case.x, case.target)
    assert relative_error(case.ours("gradient").relevance, gradient) < TOLERANCE
    assert relative_error(case.ours("gradient_x_input").relevance, gradient * case.x) < TOLERANCE


@pytest.mark.parametrize("case", ARCHITECTURES, indirect=True)
def test_deconvnet_matches_zennit(case):
    if case.name.startswith("googlenet"):
        pytest.skip("zennit quirk (2): its DeconvNet misses GoogLeNet's functional F.relu")
    assert relative_error(case.ours("deconvnet").relevance, case.zennit("deconvnet")) < TOLERANCE


def test_full_width_vgg16_matches_zennit():
    full = Case("vgg16")
    ours = full.ours("epsilon_gamma_box", low=LOW, high=HIGH)
    assert relative_error(ours.relevance, full.zennit("epsilon_gamma_box", low=LOW, high=HIGH)) < TOLERANCE
    gradient = autograd_gradient(full.model, full.x, full.target)
    assert relative_error(full.ours("gradient").relevance, gradient) < TOLERANCE


# -- parameters are passed through (on the cheapest model) ------------------------------------------------------------
@pytest.mark.parametrize("case", ["alexnet"], indirect=True)
@pytest.mark.parametrize("composite, params", [
    ("epsilon_gamma_box", {"gamma": 0.5, "epsilon": 0.01, "stabilizer": 1e-4,
                           "low": torch.tensor([-2.0, -2.5, -1.5]), "high": torch.tensor([2.5, 3.0, 2.0])}),
    ("epsilon_plus", {"epsilon": 0.25, "stabilizer": 1e-3}),
    ("epsilon", {"epsilon": 0.1}),
    ("alpha_beta", {"alpha": 1.0, "beta": 0.0}),
    ("alpha_beta", {"alpha": 3.0, "beta": 2.0}),
    ("epsilon_alpha2_beta1_flat", {"epsilon": 1.0, "stabilizer": 1e-2}),
], ids=["gamma_box_per_channel", "plus", "epsilon", "alpha1_beta0", "alpha3_beta2", "alpha2_beta1_flat"])
def test_parameters_match_zennit(case, composite, params):
    zennit_params = dict(params)
    for bound in ("low", "high"):
        if bound in zennit_params:  # zennit broadcasts against the input: per-channel bounds as (1, C, 1, 1)
            zennit_params[bound] = zennit_params[bound].double().reshape(1, -1, 1, 1)
    ours = case.ours(composite, **params)
    assert relative_error(ours.relevance, case.zennit(composite, **zennit_params)) < TOLERANCE


@pytest.mark.parametrize("case", ["alexnet"], indirect=True)
def test_paper_and_common_alpha_beta_conventions_give_the_same_map(case):
    common = case.ours("alpha_beta", alpha=2.0, beta=1.0).relevance
    paper = case.ours("alpha_beta", alpha=2.0, beta=-1.0).relevance
    assert torch.equal(common, paper)


# -- BatchNorm folding (exact, with eps != 0; independent of zennit) -------------------------------------------------
class ConvBNNet(nn.Module):
    """Conv+BN (with and without conv bias), Linear+BatchNorm1d: every folding case."""

    def __init__(self, batchnorm: bool = True):
        super().__init__()
        norm2d = (lambda c: nn.BatchNorm2d(c, eps=0.3)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), norm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), norm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.fc_norm = nn.BatchNorm1d(12, eps=0.1) if batchnorm else nn.Identity()
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        return self.out(torch.relu(self.fc_norm(self.fc(self.features(x).flatten(1)))))


def fold_by_hand(model: ConvBNNet) -> ConvBNNet:
    """The same function with every BatchNorm folded into the layer before it (Identity in its place)."""
    folded = ConvBNNet(batchnorm=False).double()
    pairs = [(model.features[0], model.features[1], folded.features[0]),
             (model.features[3], model.features[4], folded.features[3]),
             (model.fc, model.fc_norm, folded.fc)]
    with torch.no_grad():
        for layer, bn, target in pairs:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            target.weight.copy_(layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.bias)
            if target.bias is None:
                target.bias = nn.Parameter(torch.empty_like(bn.bias))
            target.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        folded.out.load_state_dict(model.out.state_dict())
    return folded.eval()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat",
                                       "alpha_beta", "gradient", "deconvnet"])
def test_batchnorm_folding_equals_folding_by_hand(composite):
    torch.manual_seed(0)
    model = randomize(ConvBNNet().double().eval(), bn_eps=None)
    folded = fold_by_hand(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).clamp(LOW, HIGH)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)  # the hand folding is right
    params = _params(composite)
    ours = lrp.Explainer(model, composite, **params)(x, 2)
    by_hand = lrp.Explainer(folded, composite, **params)(x, 2)
    assert relative_error(ours.relevance, by_hand.relevance) < 1e-10
    torch.testing.assert_close(ours.logits, model(x).detach(), rtol=1e-12, atol=1e-12)


def test_batchnorm_folding_uses_eps_on_torchvision_resnet():
    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet18(num_classes=10).double().eval(), bn_eps=0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    result = lrp.Explainer(model, "epsilon")(x, torch.tensor([0, 9]))
    with torch.no_grad():
        torch.testing.assert_close(result.logits, model(x), rtol=1e-10, atol=1e-12)


# -- known engine limitation ------------------------------------------------------------------------------------------
class ChannelsLastMLP(nn.Module):
    """A Linear layer applied per pixel on a (B, H, W, C) tensor (a 1x1 convolution written as Linear)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4, 6)
        self.out = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x)).permute(0, 2, 3, 1)
        return self.out(torch.relu(self.mix(x)).flatten(1))


def test_alpha_beta_on_linear_over_a_channels_last_tensor_matches_zennit():
    torch.manual_seed(0)
    model = randomize(ChannelsLastMLP().double().eval())
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 2])
    ours = lrp.Explainer(model, "alpha_beta")(x, target)
    reference = zennit_relevance(copy.deepcopy(model), x, target, zennit_composite("alpha_beta"))
    assert relative_error(ours.relevance, reference) < TOLERANCE


@pytest.mark.parametrize("include_bias", [True, False])
def test_w_square_first_layer_matches_zennit(include_bias):
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import WSquare, ZPlus

    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double().eval())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    zero_params = None if include_bias else "bias"
    ours = lrp.Explainer(model, lrp.Composite(
        "w_square_plus", conv=lrp.rules.ZPlus(include_bias=include_bias),
        linear=lrp.rules.Epsilon(1e-6, include_bias=include_bias),
        first=lrp.rules.WSquare(include_bias=include_bias)))(x, target)
    reference = zennit_relevance(copy.deepcopy(model), x, target, SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, ZPlus(zero_params=zero_params)),
                                      (nn.Linear, Epsilon(zero_params=zero_params))],
        first_map=[(Convolution, WSquare(zero_params=zero_params))]))
    assert relative_error(ours.relevance, reference) < TOLERANCE
