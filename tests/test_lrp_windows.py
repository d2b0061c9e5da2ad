"""Windowed attention (``lrp/windows.py``): Swin's ``shifted_window_attention`` and MaxViT's relative attention.

Oracles:

* with one window covering the whole map, no shift and a zero relative position bias, each computes plain
  multi-head self-attention; its AttnLRP and CP-LRP relevance must then equal our ``nn.MultiheadAttention`` rule (itself
  checked against lxt in tests/test_lrp_vit_lxt.py) on a twin with the same weights (float64, exact division);
* on the real models (swin_t, swin_v2_t, maxvit_t) the ``gradient`` composite equals autograd's input gradient: every
  step (roll, pad, window partition, ``_patch_merging_pad``, the attention leaves, swapaxes) computes the model;
* the shifted windows, masks and relative position biases are constants inside the rule: the rule is compared with
  Gradient x Input of lxt's modified attention for Swin v2 (cosine attention, ``F.normalize`` with a constant norm).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_lrp_zennit import relative_error
from torch import nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import shifted_window_attention
from zoo_models import build

import lrp
from helpers.zennit_reference import autograd_gradient
from lrp.kinds import Kind
from lrp.rules import Attention
from lrp.windows import WindowAttention

torch.fx.wrap("shifted_window_attention")  # a leaf of the trace here as in torchvision's swin_transformer module


def _exact(cp: bool) -> lrp.Composite:
    """The z rule with exact division everywhere, the attention rules with epsilon 0 (AttnLRP, or CP-LRP)."""
    z = lrp.make_composite("z", stabilizer=0.0)
    return dataclasses.replace(z, by_kind={**z.by_kind, Kind.ATTENTION: Attention(0.0, cp=cp),
                                           Kind.WINDOW_ATTENTION: WindowAttention(0.0, cp=cp)})


class Head(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, 5)

    def forward(self, tokens):  # (B, ..., C) -> mean over the token axes
        return self.fc(tokens.flatten(1, -2).mean(1))


class SwinOneWindow(nn.Module):
    """``shifted_window_attention`` on a (B, 4, 4, C) map with one 4x4 window, no shift, zero position bias."""

    def __init__(self, width=8, heads=2, logit_scale=None):
        super().__init__()
        self.qkv, self.proj, self.heads, self.head = nn.Linear(width, 3 * width), nn.Linear(width, width), heads, \
            Head(width)
        self.register_buffer("bias", torch.zeros(1, heads, 16, 16))
        self.logit_scale = logit_scale

    def forward(self, x):
        out = shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.bias, [4, 4], self.heads,
                                       shift_size=[0, 0], qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                                       logit_scale=self.logit_scale, training=False)
        return self.head(out)


class MultiheadTwin(nn.Module):
    """The same function as ``nn.MultiheadAttention`` over all tokens of the map."""

    def __init__(self, width, heads, in_weight, in_bias, out_proj, head):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            self.attention.in_proj_weight.copy_(in_weight)
            self.attention.in_proj_bias.copy_(in_bias)
            self.attention.out_proj.load_state_dict(out_proj.state_dict())
        self.head = head

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(shape[0], -1, shape[-1])
        return self.head(self.attention(tokens, tokens, tokens, need_weights=False)[0].reshape(shape))


class MaxVitAttention(nn.Module):
    def __init__(self, width=8, head_dim=4):
        super().__init__()
        self.attention = RelativePositionalMultiHeadAttention(width, head_dim, 16)
        with torch.no_grad():
            self.attention.relative_position_bias_table.zero_()
        self.head = Head(width)

    def forward(self, x):  # (B, G, P, D)
        return self.head(self.attention(x))


def _twins(kind: str):
    torch.manual_seed(0)
    if kind == "swin":
        model = SwinOneWindow().double().eval()
        twin = MultiheadTwin(8, 2, model.qkv.weight, model.qkv.bias, model.proj, model.head)
        x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    else:
        model = MaxVitAttention().double().eval()
        attention = model.attention
        # MaxViT scales k by feat_dim ** -0.5, MultiheadAttention its scores by head_dim ** -0.5: fold the
        # difference into the key projection (the z rule is invariant to it)
        factor = (attention.head_dim / 8) ** 0.5
        scale = torch.ones(24, 1, dtype=torch.float64)
        scale[8:16] = factor
        twin = MultiheadTwin(8, attention.n_heads, attention.to_qkv.weight * scale,
                             attention.to_qkv.bias * scale[:, 0], attention.merge, model.head)
        x = torch.randn(2, 1, 16, 8, dtype=torch.float64)  # one group of 16 tokens
    return model, twin.double().eval(), x


@pytest.mark.parametrize("kind", ["swin", "maxvit"])
@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cp_lrp"])
def test_one_window_is_multihead_attention(kind, cp):
    model, twin, x = _twins(kind)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-12)
    ours = lrp.Explainer(model, _exact(cp))(x, torch.tensor([1, 3])).relevance
    reference = lrp.Explainer(twin, _exact(cp))(x, torch.tensor([1, 3])).relevance
    assert relative_error(ours, reference) < 1e-10


def test_attnlrp_and_cp_lrp_differ_in_a_window():
    model, _, x = _twins("swin")
    attn, cp = (lrp.Explainer(model, _exact(c))(x, 1).relevance for c in (False, True))
    assert relative_error(attn, cp) > 1e-2


def test_swin_v2_cosine_attention_is_lxts_modified_gradient():
    # lxt's rules written out for one window of cosine attention: q, k, v with their gradient divided by 4, 4, 2
    # (uniform rule), the norms of F.normalize constant, the logit scale and the bias constants
    rules = _lxt_rules()
    torch.manual_seed(0)
    logit_scale = nn.Parameter(torch.log(10 * torch.rand(2, 1, 1, dtype=torch.float64) + 1))
    model = SwinOneWindow(logit_scale=logit_scale).double().eval()
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)

    def reference_forward(x):
        b, tokens = x.shape[0], x.reshape(2, 16, 8)
        qkv_bias = model.qkv.bias.clone()
        qkv_bias[8:16] = 0  # Swin v2 has no key bias
        qkv = nn.functional.linear(tokens, model.qkv.weight, qkv_bias).reshape(b, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = (rules.divide_gradient(t, f) for t, f in zip(qkv, (4, 4, 2)))
        q = q / rules.stop_gradient(q.norm(dim=-1, keepdim=True))
        k = k / rules.stop_gradient(k.norm(dim=-1, keepdim=True))
        scale = torch.clamp(logit_scale, max=torch.log(torch.tensor(100.0))).exp().detach()
        attention = torch.softmax(q @ k.transpose(-2, -1) * scale, -1)
        out = (attention @ v).transpose(1, 2).reshape(b, 16, 8)
        return model.head(nn.functional.linear(out, model.proj.weight, model.proj.bias).reshape(b, 4, 4, 8))

    with torch.no_grad():
        torch.testing.assert_close(reference_forward(x), model(x), rtol=1e-12, atol=1e-12)
    leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(reference_forward(leaf)[:, 1].sum(), leaf)
    ours = lrp.Explainer(model, _exact(False))(x, 1).relevance
    assert relative_error(ours, gradient * x) < 1e-10


def _lxt_rules():
    pytest.importorskip("lxt")
    from helpers.lxt_reference import lxt_efficient
    return lxt_efficient()[1]


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t", "maxvit_t"])
def test_windowed_models_gradient_is_autograds(name):
    model, size = build(name)
    model = model.double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3])
    gradient = autograd_gradient(model, x, target)
    assert relative_error(lrp.Explainer(model, "gradient")(x, target).relevance, gradient) < 1e-10
