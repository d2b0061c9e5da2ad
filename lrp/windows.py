r"""Windowed attention written as a function or module (Swin's shifted-window attention, MaxViT's relative attention):
one step each, explained by AttnLRP's rules applied as a modified gradient.

torchvision's Swin calls ``shifted_window_attention`` (pad, cyclic shift with ``torch.roll``, window partition, q k v,
scaled or cosine (v2) scores, relative position bias, shift masks, softmax, A v, projection, reverse) as one function
that torch.fx keeps as a leaf; MaxViT's ``RelativePositionalMultiHeadAttention`` writes the same products with
``torch.einsum``. Each is one ``window_attention`` step. Its rule (:class:`WindowAttention`) replays the call on the
step input with the gradient modified the way lxt implements AttnLRP (Achtibat et al. 2024):

* each product of two input-dependent tensors (``q k^T`` and ``A v``, as ``matmul``, ``@`` or ``einsum``) passes half
  its gradient to each factor: the uniform rule (so q and k get a quarter, v a half, as in lxt);
* the softmax keeps its gradient: in Gradient x Input that is the paper's softmax rule (Proposition 3.1);
* ``F.normalize`` (v2's cosine attention) divides by a constant norm, as the LayerNorm rule takes the std constant;
* relative position biases, shift masks (-100), the logit scale and the projections' biases are constants.

The input relevance is then :math:`R_x = x \odot \tilde J^T (R / z)` with :math:`z` the step output
(epsilon-stabilized):
the epsilon rule on the step as a whole, and inside it LRP-0 with every bias kept (``include_bias`` does not reach
inside; relevance of biases, masks and position biases is absorbed). ``cp=True`` (CP-LRP, Ali et al. 2022) takes the
attention weights as constants instead: the first product (the scores) gets no gradient and ``A v`` passes all of
it to ``v``. Neither conserves exactly (biases inside; AttnLRP's softmax rule absorbs by design).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .kinds import Kind
from .rules import Rule
from .stabilize import safe_divide

_FUNCTIONS = {("torchvision.models.swin_transformer", "shifted_window_attention"): Kind.WINDOW_ATTENTION,
              ("torchvision.models.swin_transformer", "_patch_merging_pad"): Kind.STRUCTURAL}  # zero pad, slices, cat
_MODULES = {("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention")}
_PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum, torch.bmm)


def function_kind(target) -> Kind | None:
    """The kind of a torchvision function torch.fx keeps as a leaf (``torch.fx.wrap``), or None."""
    return _FUNCTIONS.get((getattr(target, "__module__", None), getattr(target, "__name__", None)))


def is_attention_module(module) -> bool:
    """Whether a module is an attention this module explains as one step (a leaf of the trace)."""
    return (type(module).__module__, type(module).__name__) in _MODULES


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _AttnLRPGradient(TorchFunctionMode):
    """Inside one attention call: the uniform rule on products, constant norms, and CP-LRP's constant weights."""

    def __init__(self, cp: bool):
        super().__init__()
        self.cp, self.products = cp, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            first = self.products == 0
            self.products += 1
            head, operands = ((args[0],), list(args[1:])) if func is torch.einsum else ((), list(args))
            if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = list(operands[0])
            operands = [self._factor(t, first) for t in operands]
            return func(*head, *operands, **kwargs)
        if func is F.normalize:
            return _normalize(*args, **kwargs)
        return func(*args, **kwargs)

    def _factor(self, t, first: bool):
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return t
        if self.cp:
            return t.detach() if first else t
        return _ScaleGradient.apply(t, 0.5)


def _normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
    return x / torch.linalg.vector_norm(x, p, dim, keepdim=True).clamp_min(eps).detach()


@dataclass(frozen=True)
class WindowAttention(Rule):
    """AttnLRP (or CP-LRP with ``cp=True``) on a ``window_attention`` step; see the module docstring."""

    applies_to = frozenset({Kind.WINDOW_ATTENTION})

    epsilon: float = 1e-6
    cp: bool = False

    def __call__(self, ctx, relevance):
        message = safe_divide(relevance, ctx.output, self.epsilon)
        (x,), target = ctx.inputs, ctx.step.target
        (first, *rest), kwargs = ctx.arguments
        assert first is x, "the attention's input is its first argument"
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with _AttnLRPGradient(self.cp):
                out = target.forward(leaf, *rest, **kwargs) if isinstance(target, nn.Module) else \
                    target(leaf, *rest, **kwargs)
            (gradient,) = torch.autograd.grad(out, leaf, message)
        return [x * gradient]
