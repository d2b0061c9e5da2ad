"""Property tests: on random small networks drawn by hypothesis, every composite agrees with zennit in float64.

The networks mix every supported building block: Conv (with and without bias, grouped), BatchNorm after Conv and
after Linear, ReLU (in place or not), max and average pooling (overlapping, padded), Dropout, Flatten or
``x.view(x.size(0), -1)``, residual sums and ``torch.cat`` branches (an inception-like block with a max-pool branch).
zennit hooks modules, so the residual sum of the zennit twin is zennit's ``Sum`` module (what its ResNet canonizer
inserts); our engine traces the plain ``a + b`` of the same network.
"""
from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, note, settings, strategies as st
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.layer import Sum

import lrp
from helpers.zennit_reference import HIGH, LOW, autograd_gradient, randomize, zennit_composite, zennit_relevance

TOLERANCE = 1e-6


class Residual(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``, the torchvision BasicBlock pattern (one ReLU module used twice)."""

    def __init__(self, channels: int, batchnorm: bool, inplace: bool):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batchnorm else nn.Identity
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm)
        self.bn1 = norm()
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm)
        self.bn2 = norm()
        self.zennit_sum = None  # the zennit twin sums through this module

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out + x if self.zennit_sum is None else self.zennit_sum(torch.stack([x, out], dim=-1))
        return self.relu(out)


class Inception(nn.Module):
    """Three branches concatenated on the channel axis: 1x1 conv, 3x3 conv (+BN), max-pool then 1x1 conv."""

    def __init__(self, channels: int, out_a: int, out_b: int, out_c: int, batchnorm: bool):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(channels, out_a, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(channels, out_b, 3, padding=1, bias=not batchnorm),
                               nn.BatchNorm2d(out_b) if batchnorm else nn.Identity(), nn.ReLU(inplace=True))
        self.c = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(channels, out_c, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], 1)


class View(nn.Module):
    """Flatten written as ``x.view(x.size(0), -1)`` (a shape query feeding a reshape)."""

    def forward(self, x):
        return x.view(x.size(0), -1)


POOLS = {
    "max2": lambda: nn.MaxPool2d(2),
    "avg2": lambda: nn.AvgPool2d(2),
    "max3": lambda: nn.MaxPool2d(3, stride=1, padding=1),
    "avg3": lambda: nn.AvgPool2d(3, stride=1, padding=1),
    "max3s2": lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
}


@st.composite
def network_specs(draw):
    """A network as plain data (so hypothesis can shrink and print it): input size, blocks, head."""
    blocks = []
    channels = 3
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "pool", "residual", "inception"]))
        if kind == "conv":
            out = draw(st.integers(2, 6))
            grouped = channels > 1 and out % channels == 0 and draw(st.booleans())
            block = ("conv", out, draw(st.sampled_from([1, 3])), draw(st.booleans()), draw(st.booleans()),
                     grouped, draw(st.booleans()))  # channels, kernel, bias, batchnorm, grouped, inplace
            channels = out
        elif kind == "pool":
            block = ("pool", draw(st.sampled_from(sorted(POOLS))))
        elif kind == "residual":
            block = ("residual", draw(st.booleans()), draw(st.booleans()))  # batchnorm, inplace
        else:
            outs = [draw(st.integers(1, 3)) for _ in range(3)]
            block = ("inception", *outs, draw(st.booleans()))
            channels = sum(outs)
        blocks.append(block)
    head = (
        draw(st.sampled_from(["flatten", "view", "gap"])),
        [draw(st.integers(2, 8)) for _ in range(draw(st.integers(0, 2)))],  # hidden widths
        draw(st.booleans()),  # BatchNorm1d after the hidden Linear layers
        draw(st.booleans()),  # Dropout in the head
    )
    return draw(st.sampled_from([4, 6, 8])), blocks, head, draw(st.integers(0, 2**16))


def build(spec) -> tuple[nn.Module, torch.Tensor]:
    """The float64 network of a spec (random parameters and BatchNorm statistics) and an input batch of 2."""
    size, blocks, (flatten, hidden, head_bn, dropout), seed = spec
    torch.manual_seed(seed)
    layers, channels, spatial = [], 3, size
    for block in blocks:
        if block[0] == "conv":
            _, out, kernel, bias, batchnorm, grouped, inplace = block
            layers.append(nn.Conv2d(channels, out, kernel, padding=kernel // 2, bias=bias,
                                    groups=channels if grouped else 1))
            layers += [nn.BatchNorm2d(out)] if batchnorm else []
            layers.append(nn.ReLU(inplace=inplace))
            channels = out
        elif block[0] == "pool":
            if spatial < 2 and block[1] in ("max2", "avg2"):
                continue  # a 2x2 pool of a 1x1 map has no output (three avg2 on a 4x4 input)
            pool = POOLS[block[1]]()
            layers.append(pool)
            spatial = pool(torch.zeros(1, 1, spatial, spatial)).shape[-1]
        elif block[0] == "residual":
            layers.append(Residual(channels, *block[1:]))
        else:
            layers.append(Inception(channels, *block[1:]))
            channels = sum(block[1:4])
    if flatten == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = channels
    else:
        layers.append(nn.Flatten() if flatten == "flatten" else View())
        features = channels * spatial * spatial
    for width in hidden:
        layers.append(nn.Linear(features, width))
        layers += [nn.BatchNorm1d(width)] if head_bn else []
        layers += [nn.ReLU()] + ([nn.Dropout(0.5)] if dropout else [])
        features = width
    layers.append(nn.Linear(features, 4))
    model = randomize(nn.Sequential(*layers).double().eval(), seed=seed)
    x = torch.randn(2, 3, size, size, dtype=torch.float64).clamp(LOW, HIGH)
    return model, x


def zennit_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, Residual):
            module.zennit_sum = Sum()
    return twin


def assert_close_relative(ours: torch.Tensor, reference: torch.Tensor, what: str):
    """Relative L2 error below TOLERANCE (a dead random network may legitimately give an all-zero map)."""
    error = (ours - reference).norm().item()
    note(f"{what}: |ref| = {reference.norm().item():.3e}, |ours - ref| = {error:.3e}")
    assert error <= TOLERANCE * reference.norm().item() + 1e-14, what


CONFIGURATIONS = [
    # (composite, include_bias)
    ("epsilon_plus", True), ("epsilon_plus_flat", True), ("epsilon_gamma_box", True), ("epsilon_alpha2_beta1", True),
    ("epsilon_alpha2_beta1_flat", True), ("epsilon", True), ("alpha_beta", True),
    ("epsilon_gamma_box", False), ("epsilon_alpha2_beta1", False), ("epsilon", False), ("alpha_beta", False),
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(network_specs())
def test_random_networks_match_zennit(spec):
    model, x = build(spec)
    twin = zennit_twin(model)
    target = torch.tensor([0, 3])
    for composite, include_bias in CONFIGURATIONS:
        params = {"low": LOW, "high": HIGH} if composite == "epsilon_gamma_box" else {}
        ours_params = dict(params, include_bias=include_bias)
        if not include_bias:
            ours_params["stabilizer"] = 1e-6  # zennit keeps its stabilizer with zero_params='bias'
        ours = lrp.Explainer(model, composite, **ours_params)(x, target).relevance
        zc = zennit_composite(composite, [SequentialMergeBatchNorm()], include_bias=include_bias, **params)
        reference = zennit_relevance(twin, x, target, zc)
        assert_close_relative(ours, reference, f"{composite}, include_bias={include_bias}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(network_specs())
def test_random_networks_baselines(spec):
    model, x = build(spec)
    target = torch.tensor([1, 2])
    gradient = autograd_gradient(model, x, target)
    assert_close_relative(lrp.Explainer(model, "gradient")(x, target).relevance, gradient, "gradient")
    assert_close_relative(lrp.Explainer(model, "gradient_x_input")(x, target).relevance, gradient * x,
                          "gradient_x_input")
    deconvnet = zennit_relevance(zennit_twin(model), x, target, zennit_composite("deconvnet"), seed_ones=True)
    assert_close_relative(lrp.Explainer(model, "deconvnet")(x, target).relevance, deconvnet, "deconvnet")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(network_specs())
def test_random_networks_explain_their_own_logits_and_leave_the_model_alone(spec):
    model, x = build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(x)
    result = lrp.Explainer(model, "epsilon_gamma_box", low=LOW, high=HIGH)(x, torch.tensor([2, 0]))
    torch.testing.assert_close(result.logits, logits, rtol=1e-10, atol=1e-12)
    assert result.relevance.shape == x.shape and result.relevance.dtype == x.dtype
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
