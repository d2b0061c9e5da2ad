"""Conservation, absorption and Table 1 of Binder et al. (2016), in float64, per sample.

Precisely what is tested:

* Conservation (Eq. 2, Eq. 4): with ``include_bias=False`` (biases left out of every denominator, exact division) the
  naive z rule and alpha-beta (several alpha/beta, both conventions) give ``sum_p R_p = f(x)`` for every sample to
  1e-8 relative, on ReLU networks with biases, BatchNorm, max and average pooling, residual sums and concatenation.
  Alpha-beta conserves only where each neuron has both positive and negative contributions ("where both parts
  exist"): the networks here are wide enough for that. With biases in the denominators (the default) relevance is
  absorbed by the biases, so the same networks do not conserve.
* Epsilon (Eq. 3) absorbs and never creates relevance: a neuron with pre-activation z passes on exactly the fraction
  ``|z| / (|z| + epsilon)`` of its relevance (tested in closed form for one and two layers), so on a network where all
  contributions are non-negative the total relevance stays in ``[0, f(x)]`` and decreases as epsilon grows.
* Table 1: conservation (naive yes, epsilon no, beta yes), consistency with a linear mapping ``f(x) = w.x`` (naive and
  epsilon give R proportional to w_i x_i, alpha-beta does not), numerical stability near a zero denominator (naive blows
  up like 1/z, epsilon and alpha-beta stay bounded).
* The alpha/beta conventions: the paper's (alpha + beta = 1, beta <= 0) equals the common one (alpha - beta = 1,
  beta >= 0); inconsistent pairs are refused with a message naming both conventions.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import lrp
from lrp.rules import alpha_beta_params

CONSERVATION = 1e-8


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and clearly non-zero biases (so including them or not makes a difference)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.3, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.3, generator=generator)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.2, generator=generator)
    return model


class SmallVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(32, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class SmallInception(nn.Module):
    """A stem, an inception block (conv, conv+BN and max-pool+conv branches concatenated), global average pooling.

    3x3 kernels on 16 channels: with 1x1 kernels on few channels some neurons see only zeros (after a ReLU) or only
    positive contributions, and lose their relevance legitimately (zero denominator, or no negative part for beta).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 6, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.c = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(16, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.a(x), self.b(x), self.c(x)], 1))


def small_resnet():
    """torchvision's ResNet with one BasicBlock per stage: residual sums, downsampling, max and average pooling."""
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)


NETWORKS = {
    "vgg": (SmallVGG, 8),
    "inception": (SmallInception, 8),
    "resnet": (small_resnet, 32),
}


@pytest.fixture(scope="module", params=[(name, seed) for name in NETWORKS for seed in (0, 1)],
                ids=lambda p: f"{p[0]}-seed{p[1]}")
def network(request):
    name, seed = request.param
    build, size = NETWORKS[name]
    torch.manual_seed(seed)
    model = _randomize(build().double().eval(), seed)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    return model, x, torch.tensor([0, 2, 4])


def assert_conserves(result: lrp.Explanation, tolerance: float = CONSERVATION):
    """sum_p R_p = f(x) for every sample: to ``tolerance`` relative to |f(x)|, or to rounding (1e-13 of sum_p |R_p|).

    The second bound is Table 1's "naive is not numerically stable": with biases left out of the denominators, a
    neuron kept active by its bias but with a small bias-free pre-activation z_j amplifies relevance by 1/z_j. On the
    random ResNets here single-pixel relevances of naive z reach 1e10 |f(x)| and cancel; their sum then equals f(x)
    only up to the float64 rounding of those large terms (alpha-beta stays within a few |f(x)|).
    """
    f = result.output.abs()
    assert bool((f > 1e-6).all()), "f(x) ~ 0 would make the relative check vacuous"
    scale = result.relevance.flatten(1).abs().sum(1)
    allowed = torch.maximum(tolerance * f, 1e-13 * scale)
    assert bool((result.residual.abs() <= allowed).all()), (
        f"conservation error {(result.residual.abs() / f).tolist()} of f(x) "
        f"(sum |R| / |f(x)| = {(scale / f).tolist()})")


# -- conservation ------------------------------------------------------------------------------------------------------
def test_naive_z_without_biases_conserves_per_sample(network):
    model, x, target = network
    assert_conserves(lrp.Explainer(model, "z", include_bias=False)(x, target))


@pytest.mark.parametrize("alpha, beta", [
    (1.0, 0.0), (2.0, 1.0), (3.0, 2.0), (1.5, 0.5),  # common convention: alpha - beta = 1
    (2.0, -1.0), (3.0, -2.0), (1.5, -0.5),  # the paper's: alpha + beta = 1, beta <= 0
])
def test_alpha_beta_without_biases_conserves_per_sample(network, alpha, beta):
    model, x, target = network
    assert_conserves(lrp.Explainer(model, "alpha_beta", alpha=alpha, beta=beta, include_bias=False)(x, target))


@pytest.mark.parametrize("composite", ["z", "alpha_beta"])
def test_biases_in_the_denominators_absorb_relevance(network, composite):
    """The switch matters: the same networks with biases in the denominators do not conserve."""
    model, x, target = network
    result = lrp.Explainer(model, composite)(x, target)
    assert (result.residual.abs() / result.output.abs()).max().item() > 1e-4


def test_epsilon_zero_is_the_naive_rule(network):
    model, x, target = network
    z = lrp.Explainer(model, "z", include_bias=False)(x, target).relevance
    epsilon = lrp.Explainer(model, "epsilon", epsilon=0.0, include_bias=False)(x, target).relevance
    assert torch.equal(z, epsilon)


# -- epsilon: absorbs, never creates -----------------------------------------------------------------------------------
def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A float64 Linear layer with the given parameters (wrapped in nn.Sequential when used as a whole model: a bare
    layer as the model is not traceable, see test_lrp_api.py)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@pytest.mark.parametrize("epsilon", [1e-3, 0.1, 1.0, 10.0])
def test_epsilon_on_one_layer_keeps_exactly_the_fraction_abs_z_over_abs_z_plus_epsilon(epsilon):
    torch.manual_seed(0)
    model = nn.Sequential(_linear(torch.randn(1, 6, dtype=torch.float64)))  # f(x) = w.x, mixed-sign contributions
    x = torch.randn(8, 6, dtype=torch.float64)
    result = lrp.Explainer(model, "epsilon", epsilon=epsilon, include_bias=False)(x, 0)
    f = result.output
    assert bool((f > 0).any() and (f < 0).any())
    total = result.relevance.sum(1)
    torch.testing.assert_close(total, f * f.abs() / (f.abs() + epsilon), rtol=1e-12, atol=0)
    assert bool((total.abs() < f.abs()).all() and (torch.sign(total) == torch.sign(f)).all())


def test_epsilon_on_two_layers_shrinks_each_hidden_neurons_relevance():
    """Per neuron: hidden neuron k receives R_k and passes on exactly R_k |z_k| / (|z_k| + epsilon)."""
    torch.manual_seed(1)
    epsilon = 0.5
    first, second = _linear(torch.randn(5, 7, dtype=torch.float64)), _linear(torch.randn(1, 5, dtype=torch.float64))
    model = nn.Sequential(first, nn.ReLU(), second)
    x = torch.randn(6, 7, dtype=torch.float64)
    result = lrp.Explainer(model, "epsilon", epsilon=epsilon, include_bias=False)(x, 0)
    with torch.no_grad():
        z_hidden = first(x)
        f = model(x)[:, 0]
    received = torch.relu(z_hidden) * second.weight[0] * (f / (f + epsilon * torch.sign(f)))[:, None]  # Eq. 3, top
    passed_on = received * z_hidden.abs() / (z_hidden.abs() + epsilon)
    torch.testing.assert_close(result.relevance.sum(1), passed_on.sum(1), rtol=1e-12, atol=1e-14)
    assert bool((passed_on.abs() <= received.abs()).all())


class PositiveNet(nn.Module):
    """All weights non-negative and no biases: every contribution z_ij = x_i w_ij >= 0 for x >= 0."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 8, bias=False), nn.ReLU(),
                                  nn.Linear(8, 3, bias=False))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block(x))


def test_epsilon_never_creates_relevance_and_absorbs_more_as_epsilon_grows():
    torch.manual_seed(2)
    model = PositiveNet().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    totals = []
    for epsilon in [0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0]:
        result = lrp.Explainer(model, "epsilon", epsilon=epsilon, include_bias=False)(x, 1)
        assert bool((result.relevance >= 0).all())
        totals.append(result.relevance.flatten(1).sum(1))
    f = result.output
    torch.testing.assert_close(totals[0], f, rtol=1e-12, atol=0)  # epsilon = 0: conserved
    for smaller, larger in zip(totals, totals[1:]):
        assert bool((larger < smaller).all() and (larger >= 0).all())


# -- Table 1 of Binder et al. (2016) -----------------------------------------------------------------------------------
def test_table1_conserves_relevance(network):
    """Naive: yes; epsilon: no; beta: yes."""
    model, x, target = network
    assert_conserves(lrp.Explainer(model, "z", include_bias=False)(x, target))
    epsilon = lrp.Explainer(model, "epsilon", epsilon=0.1, include_bias=False)(x, target)
    assert (epsilon.residual.abs() / epsilon.output.abs()).max().item() > 1e-3
    assert_conserves(lrp.Explainer(model, "alpha_beta", alpha=2.0, beta=-1.0, include_bias=False)(x, target))


def test_table1_consistent_with_a_linear_mapping():
    """For f(x) = w.x: naive R_i = w_i x_i; epsilon R_i proportional to w_i x_i; alpha-beta not proportional."""
    torch.manual_seed(3)
    w = torch.randn(1, 10, dtype=torch.float64)
    model = nn.Sequential(_linear(w))
    x = torch.randn(5, 10, dtype=torch.float64)
    contributions = w * x
    f = contributions.sum(1)

    naive = lrp.Explainer(model, "z", include_bias=False)(x, 0).relevance
    torch.testing.assert_close(naive, contributions, rtol=1e-12, atol=1e-14)

    eps = 0.5
    epsilon = lrp.Explainer(model, "epsilon", epsilon=eps, include_bias=False)(x, 0).relevance
    ratio = epsilon / contributions
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-12, atol=0)  # one factor per sample
    torch.testing.assert_close(ratio[:, 0], f / (f + eps * torch.sign(f)), rtol=1e-12, atol=0)

    alpha, beta = 2.0, 1.0
    ab = lrp.Explainer(model, "alpha_beta", alpha=alpha, beta=beta, include_bias=False)(x, 0).relevance
    positive, negative = contributions.clamp(min=0), contributions.clamp(max=0)
    expected = (alpha * positive / positive.sum(1, keepdim=True) - beta * negative / negative.sum(1, keepdim=True))
    torch.testing.assert_close(ab, expected * f[:, None], rtol=1e-12, atol=1e-14)  # Eq. 4
    ratio = ab / contributions
    spread = (ratio.max(1).values - ratio.min(1).values) / ratio.abs().max(1).values
    assert bool((spread > 1e-3).all()), "alpha-beta should not be proportional to w_i x_i"


def _near_zero_denominator_net(delta: float) -> tuple[nn.Module, torch.Tensor]:
    """Hidden neuron with bias-free pre-activation z = delta (large cancelling terms) and bias 1, so that it stays
    active with activation ~1 while its LRP denominator (biases excluded, as in Eq. 2-4) goes to zero."""
    x = torch.tensor([[1.0, 2.0, -1.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[2.0, 1.0, 2.0, 0.0]], dtype=torch.float64)  # w.x = 2 + 2 - 3 + 0 = 1
    w[0, 3] = (delta - 1.0) / 0.5  # w.x = delta
    hidden = _linear(w, torch.tensor([1.0], dtype=torch.float64))
    out = _linear(torch.tensor([[1.0]], dtype=torch.float64))
    return nn.Sequential(hidden, nn.ReLU(), out), x


def test_table1_numerical_stability():
    """Naive blows up like 1/z near a zero denominator; epsilon and alpha-beta stay bounded."""
    deltas = [1e-3, 1e-6, 1e-9]
    largest = {"z": [], "epsilon": [], "alpha_beta": []}
    for delta in deltas:
        model, x = _near_zero_denominator_net(delta)
        f = model(x).item()
        for composite, params in [("z", {}), ("epsilon", {"epsilon": 0.01}), ("alpha_beta", {"alpha": 2, "beta": 1})]:
            relevance = lrp.Explainer(model, composite, include_bias=False, **params)(x, 0).relevance
            largest[composite].append(relevance.abs().max().item())
        # alpha-beta: every neuron spreads at most (alpha + beta) |R_j| over its inputs
        assert largest["alpha_beta"][-1] <= 3.0 * 3.0 * abs(f)
        # epsilon: |R_i| <= |x_i w_i| |R_hidden| / epsilon, whatever delta
        contributions = (x * model[0].weight).abs().max().item()
        assert largest["epsilon"][-1] <= contributions * abs(f) / 0.01
    naive = largest["z"]
    assert naive[-1] > 1e8 and naive[-1] / naive[0] > 1e5  # grows like 1 / delta
    for bounded in ("epsilon", "alpha_beta"):
        values = largest[bounded]
        assert max(values) / min(values) < 1.2 and max(values) < 1e3


# -- conventions -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, common", [
    ((2.0, 1.0), (2.0, 1.0)), ((2.0, -1.0), (2.0, 1.0)), ((1.0, 0.0), (1.0, 0.0)), ((3.0, -2.0), (3.0, 2.0)),
    ((None, None), (2.0, 1.0)), ((3.0, None), (3.0, 2.0)), ((None, -1.0), (2.0, 1.0)), ((None, 1.0), (2.0, 1.0)),
])
def test_alpha_beta_conventions(given, common):
    assert alpha_beta_params(*given) == common


@pytest.mark.parametrize("alpha, beta", [(3.0, 1.0), (0.5, 0.5), (2.0, -2.0), (1.0, 1.0), (-1.0, 2.0)])
def test_inconsistent_alpha_beta_is_refused(alpha, beta):
    model = nn.Sequential(_linear(torch.ones(1, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"alpha - beta = 1.*alpha \+ beta = 1"):
        lrp.Explainer(model, "alpha_beta", alpha=alpha, beta=beta)


def test_paper_convention_gives_the_common_conventions_map(network):
    model, x, target = network
    paper = lrp.Explainer(model, "alpha_beta", alpha=2.0, beta=-1.0)(x, target).relevance
    common = lrp.Explainer(model, "alpha_beta", alpha=2.0, beta=1.0)(x, target).relevance
    assert torch.equal(paper, common)
