"""Canonizers: rewrite a network into an equivalent form on which the LRP rules are well defined.

zennit applies canonizers by mutating the model and undoing it afterwards; here they act on the traced graph only, so the
user's model is never touched:

* BatchNorm folding: ``BN(conv(x))`` becomes one affine layer ``conv'(x)`` with ``W' = W s`` and ``b' = (b - mu) s + beta``,
  ``s = gamma / sqrt(var + eps)``. LRP rules then see the pre-activation that actually reaches the ReLU.
* Residual sums (``a + b``) become ``sum`` nodes, which composites map to a proportional (``Norm``) rule instead of the
  gradient's copy, which would double the relevance.
* Concatenations (GoogLeNet's inception blocks) become ``structural`` nodes: their relevance is split back exactly.

The node classification below (which fx call is which kind) is the canonical form of the network.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
import torch.nn.functional as F

#: Node kinds of the canonical graph.
INPUT = "input"
OUTPUT = "output"
LINEAR = "linear"  # Conv*d and Linear (with folded BatchNorm)
ACTIVATION = "activation"  # ReLU
MAXPOOL = "maxpool"
AVGPOOL = "avgpool"
SUM = "sum"  # a + b of two tensors (residual connections)
SCALE = "scale"  # multiplication / division by a constant (e.g. GoogLeNet's input transform)
SHIFT = "shift"  # addition / subtraction of a constant
IDENTITY = "identity"  # Dropout, Identity: the identity at inference
STRUCTURAL = "structural"  # reshape, flatten, cat, indexing: relevance is moved, never changed
META = "meta"  # non-tensor values (x.shape, x.size(0))
BATCHNORM = "batchnorm"  # only before folding

_MODULE_KINDS = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), LINEAR),
    ((nn.modules.batchnorm._BatchNorm,), BATCHNORM),
    ((nn.ReLU,), ACTIVATION),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), MAXPOOL),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), AVGPOOL),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity), IDENTITY),
    ((nn.Flatten, nn.Unflatten), STRUCTURAL),
]

_FUNCTION_KINDS = {
    F.relu: ACTIVATION,
    torch.relu: ACTIVATION,
    F.max_pool1d: MAXPOOL,
    F.max_pool2d: MAXPOOL,
    F.max_pool3d: MAXPOOL,
    F.adaptive_max_pool2d: MAXPOOL,
    F.avg_pool1d: AVGPOOL,
    F.avg_pool2d: AVGPOOL,
    F.avg_pool3d: AVGPOOL,
    F.adaptive_avg_pool1d: AVGPOOL,
    F.adaptive_avg_pool2d: AVGPOOL,
    F.adaptive_avg_pool3d: AVGPOOL,
    F.dropout: IDENTITY,
    torch.flatten: STRUCTURAL,
    torch.cat: STRUCTURAL,
    torch.concat: STRUCTURAL,
    torch.reshape: STRUCTURAL,
    torch.unsqueeze: STRUCTURAL,
    torch.squeeze: STRUCTURAL,
    torch.permute: STRUCTURAL,
    torch.transpose: STRUCTURAL,
    operator.getitem: STRUCTURAL,
    getattr: META,
}

_METHOD_KINDS = {
    "relu": ACTIVATION,
    "relu_": ACTIVATION,
    "flatten": STRUCTURAL,
    "view": STRUCTURAL,
    "reshape": STRUCTURAL,
    "unsqueeze": STRUCTURAL,
    "squeeze": STRUCTURAL,
    "permute": STRUCTURAL,
    "transpose": STRUCTURAL,
    "contiguous": STRUCTURAL,
    "size": META,
    "dim": META,
}

_ARITHMETIC = {
    operator.add: SUM,
    operator.iadd: SUM,
    torch.add: SUM,
    "add": SUM,
    "add_": SUM,
    operator.sub: SHIFT,
    operator.isub: SHIFT,
    operator.mul: SCALE,
    operator.imul: SCALE,
    torch.mul: SCALE,
    "mul": SCALE,
    operator.truediv: SCALE,
    torch.div: SCALE,
    "div": SCALE,
}


_DIVISIONS = (operator.truediv, torch.div, "div")
#: attributes of a tensor that are metadata, not values (``getattr`` nodes reading anything else are refused)
META_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"})


def module_kind(module: nn.Module) -> str | None:
    """The canonical kind of a leaf module, or None when LRP has no rule for it."""
    if getattr(module, "return_indices", False):
        return None  # a max pool that also returns its indices: a tuple, not a map
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return None


def function_kind(target, tensor_args: int, first_is_tensor: bool = True) -> str | None:
    """The canonical kind of a traced function or method call with ``tensor_args`` tensor operands (counted with
    repeats: ``y * y`` has two) of which the first positional one is a tensor when ``first_is_tensor``."""
    if target in _ARITHMETIC:
        kind = _ARITHMETIC[target]
        if kind == SUM:
            return SUM if tensor_args >= 2 else SHIFT
        if tensor_args >= 2:
            return None  # products and differences of two tensors have no LRP rule here
        if target in _DIVISIONS and not first_is_tensor:
            return None  # c / y is not linear in y
        return kind
    if isinstance(target, str):
        return _METHOD_KINDS.get(target)
    return _FUNCTION_KINDS.get(target)


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """Fold an inference-mode BatchNorm that follows a Conv/Linear layer into that layer's weight and bias."""
    mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias
