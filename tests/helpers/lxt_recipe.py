"""lxt's efficient ViT rules rebuilt without lxt: a stand-in oracle and benchmark baseline where lxt is not installed.

The same construction as ``helpers.lxt_reference`` (Gradient x Input through a copy of the model whose gradients are
modified, bound to the module instances), with the rules as lxt 2.1's ``lxt.efficient`` describes them, written here:
GELU by the identity rule (the gradient is ``f(x) / (x + 1e-10)``, lxt's implicit identity rule), LayerNorm with its
standard deviation a constant, CP-LRP by stopping the gradient of query and key, AttnLRP by dividing the gradient of
query and key by 4 and of value by 2 (the softmax keeps its plain gradient). The attention itself is torch's own
(``nn.MultiheadAttention.forward``: separate in-projections of the three inputs, fused scaled-dot-product attention),
so the arithmetic, and with it the time, is that of lxt's patched model. Checked equal to ours on vit_b_16 in
tests/test_lrp_vit_lxt.py, as lxt itself is where it is installed.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x):
        out = fn(x)
        if x.requires_grad:
            ctx.save_for_backward(out / (x + 1e-10))
        return out

    @staticmethod
    def backward(ctx, gradient):
        return None, ctx.saved_tensors[0] * gradient


class _Divide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x

    @staticmethod
    def backward(ctx, gradient):
        return gradient / ctx.factor, None


def _gelu(self, x):
    return _Identity.apply(self.original_forward, x)


def _layer_norm(self, x):
    mean = x.mean(dim=-1, keepdim=True)
    std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
    y = (x - mean) / std.detach()
    if self.weight is not None:
        y = y * self.weight
    if self.bias is not None:
        y = y + self.bias
    return y


def _attn_lrp(self, query, key, value, *args, **kwargs):
    return self.original_forward(_Divide.apply(query, 4), _Divide.apply(key, 4), _Divide.apply(value, 2),
                                 *args, **kwargs)


def _cp_lrp(self, query, key, value, *args, **kwargs):
    return self.original_forward(query.detach(), key.detach(), value, *args, **kwargs)


def bind(module: nn.Module, forward, keep_original: bool) -> None:
    if keep_original:
        module.original_forward = module.forward
    module.forward = types.MethodType(forward, module)


def recipe_model(model: nn.Module, cp: bool) -> nn.Module:
    """A copy of a torchvision ViT with lxt's rules: CP-LRP (``cp``) or AttnLRP in its attention."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.GELU):
            bind(module, _gelu, keep_original=True)
        elif isinstance(module, nn.LayerNorm):
            bind(module, _layer_norm, keep_original=False)
        elif isinstance(module, nn.MultiheadAttention):
            bind(module, _cp_lrp if cp else _attn_lrp, keep_original=True)
    return twin


def gradient_x_input(patched: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient x Input of the target logit through a patched model (how lxt computes relevance)."""
    x = x.detach().clone().requires_grad_(True)
    out = patched(x)
    (gradient,) = torch.autograd.grad(out[torch.arange(x.shape[0]), target].sum(), x)
    return (gradient * x).detach()


def recipe_relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor, cp: bool) -> torch.Tensor:
    """Gradient x Input of the target logit through the patched copy."""
    return gradient_x_input(recipe_model(model, cp), x, target)
