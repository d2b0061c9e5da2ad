"""Recomputed activations: a lean forward drops elementwise activation outputs and the backward walk computes them
again (``Explainer(recompute=True)``, the default). The relevance must be bit for bit that of keeping every value."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_models import build

import lrp
from lrp.graph import Network
from lrp.kinds import Kind

#: one model per way activations appear: ReLU modules (in place), functional ReLU, GELU in an MLP, SiLU with gates,
#: Hardswish / Hardsigmoid gates, GELU inside window attention, ReLU after concatenations
MODELS = ["resnet18", "densenet121", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "regnet_y_400mf",
          "vit_b_16", "swin_t"]


@pytest.mark.parametrize("composite", ["epsilon_plus", "gradient"])
@pytest.mark.parametrize("name", MODELS)
def test_recomputed_activations_give_the_same_relevance_bit_for_bit(name, composite):
    model, size = build(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    lean = lrp.Explainer(model, composite)(x, None)
    kept = lrp.Explainer(model, composite, recompute=False)(x, None)
    assert torch.equal(lean.relevance, kept.relevance)
    assert torch.equal(lean.logits, kept.logits)


def test_a_lean_forward_drops_the_activations_and_value_brings_them_back():
    model, size = build("resnet18")
    network = Network(model)
    x = torch.randn(1, 3, size, size)
    full, lean = network.forward(x), network.forward(x, lean=True)
    activations = {s.index for s in network.steps if s.kind in (Kind.ACTIVATION, Kind.IDENTITY)}
    assert network.recomputable == activations and len(activations) == 17 + 20  # ReLUs, folded BatchNorms
    assert all(lean[j] is None for j in activations)
    assert all(lean[j] is not None for j, v in enumerate(full) if v is not None and j not in activations)
    for j in sorted(activations, reverse=True):  # the walk's order: consumers first
        assert torch.equal(network.value(lean, j), full[j])
    assert torch.equal(lean[network.output_index], full[network.output_index])


class _Returns(nn.Module):
    """Ends in an activation (its value is the output: kept) and chains two (a recomputed value from another)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.conv(x).relu_()).mean((2, 3))
        return torch.sigmoid(self.fc(h))


def test_an_activation_returned_is_kept_and_chained_activations_recompute():
    model = _Returns().double().eval()
    network = Network(model)
    kinds = {s.index: s.kind for s in network.steps}
    assert network.output_index - 1 not in network.recomputable  # the sigmoid is the output
    assert sum(kinds[j] == Kind.ACTIVATION for j in network.recomputable) == 1
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for composite in ("epsilon", "gradient"):
        lean = lrp.Explainer(model, composite)(x, 1)
        kept = lrp.Explainer(model, composite, recompute=False)(x, 1)
        assert torch.equal(lean.relevance, kept.relevance)
    with torch.no_grad():
        assert torch.equal(lrp.Explainer(model, "epsilon")(x, 1).logits, model(x))


def test_autocast_keeps_every_value():
    model, size = build("resnet18")
    explainer = lrp.Explainer(model, "epsilon_plus", autocast="bfloat16")
    x = torch.randn(1, 3, size, size)
    assert all(v is not None for j, v in enumerate(explainer._forward(x)) if j in explainer.network.recomputable)
