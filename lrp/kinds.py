"""Node kinds of the canonical graph: what a traced step *is* to LRP, which decides the rule a composite gives it.

A ``str`` enum, so a kind prints as its name and compares equal to it (``Kind.LINEAR == "linear"``).
"""
from __future__ import annotations

from enum import Enum


class Kind(str, Enum):  # noqa: UP042 (str() of a member stays "Kind.X", as the messages expect)
    """One kind per way relevance can be redistributed (see the rule table in docs/engine.md)."""

    INPUT = "input"
    OUTPUT = "output"
    LINEAR = "linear"  # Conv1d/2d/3d (grouped and depthwise too) and Linear, with a folded BatchNorm
    ACTIVATION = "activation"  # ReLU: a mask, relevance passes
    POINTWISE = "pointwise"  # ReLU6, Hardswish, Hardsigmoid, SiLU, GELU, Sigmoid, Tanh, ...: identity rule
    GATE = "gate"  # gated * gate (squeeze-and-excitation): the gate is a constant scale
    AFFINE = "affine"  # a BatchNorm that cannot be folded: elementwise x * s + t with constants s, t
    LAYERNORM = "layernorm"  # LayerNorm with the variance as a constant (AttnLRP)
    ATTENTION = "attention"  # nn.MultiheadAttention self-attention (AttnLRP or CP-LRP)
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"  # average pooling, adaptive average pooling, mean over spatial axes
    SUM = "sum"  # a + b of two tensors (residual connections)
    SCALE = "scale"  # one tensor times / divided by constants (GoogLeNet's input transform, ConvNeXt's layer scale)
    SHIFT = "shift"  # one tensor plus / minus constants (ViT's position embedding)
    IDENTITY = "identity"  # Dropout, Identity, folded BatchNorm: the identity at inference
    STRUCTURAL = "structural"  # reshape, flatten, cat, chunk, split, indexing: relevance is moved, never changed
    META = "meta"  # non-tensor values (x.shape, x.size(0))
    CONSTANT = "constant"  # tensors that do not depend on the input (parameters read in forward, class tokens)
    TUPLE = "tuple"  # a call returning a tuple (chunk, split, attention); each element read is its own step
    BATCHNORM = "batchnorm"  # only before the BatchNorm pass

    def __str__(self):
        return self.value


#: Kinds whose values carry no relevance: the backward walk skips them, and they are not tensor operands.
NO_RELEVANCE = frozenset({Kind.META, Kind.CONSTANT})
