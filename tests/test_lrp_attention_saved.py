"""The attention step keeps its forward products for its rule (lrp/attention.py): the rule then computes no product
again, and its relevance equals the relevance computed from the step input alone (the path taken where nothing was
kept), for AttnLRP and CP-LRP, with and without biases, exact division and epsilon, batch first or not."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import lrp
from lrp import attention
from lrp.kinds import Kind
from lrp.rules import Attention


class Block(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, 6)
        y = self.embed(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        y = self.attention(y, y, y, need_weights=False)[0]
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y.mean(1))


def _explain(model, x, cp, include_bias, epsilon):
    z = lrp.make_composite("z", include_bias=include_bias)
    composite = dataclasses.replace(z, by_kind={**z.by_kind, Kind.ATTENTION: Attention(epsilon, include_bias, cp=cp)})
    return lrp.Explainer(model, composite)(x, torch.tensor([0, 2])).relevance


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("include_bias", [True, False])
@pytest.mark.parametrize("epsilon", [0.0, 1e-2])
def test_kept_products_give_the_relevance_of_recomputed_ones(monkeypatch, batch_first, cp, include_bias, epsilon):
    torch.manual_seed(0)
    model = Block(batch_first).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    found = []
    saved = attention._saved
    monkeypatch.setattr(attention, "_saved", lambda output, given: found.append(saved(output, given)) or found[-1])
    kept = _explain(model, x, cp, include_bias, epsilon)
    assert len(found) == 1 and found[0] is not None  # the rule read the forward's products
    monkeypatch.setattr(attention, "_saved", lambda output, given: None)
    recomputed = _explain(model, x, cp, include_bias, epsilon)
    assert kept.abs().sum() > 0
    torch.testing.assert_close(kept, recomputed, rtol=1e-12, atol=1e-14)


def test_products_are_kept_only_without_autograd_and_only_for_their_input():
    module = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.enable_grad():
        assert not hasattr(attention.forward(module, x.requires_grad_(True)), attention._SAVED)
    x = x.detach()
    with torch.no_grad():
        out = attention.forward(module, x)
        torch.testing.assert_close(out, module(x, x, x, need_weights=False)[0])
    assert attention._saved(out, x) is not None
    assert attention._saved(out, x.clone()) is not None  # a recomputed input: the same values
    assert attention._saved(out, x.double()) is None  # another dtype (a cast after autocast): computed again
    assert attention._saved(out, x[:1]) is None  # another batch
    assert attention._saved(out.double(), x.double()) is None  # a cast drops what the output tensor held
