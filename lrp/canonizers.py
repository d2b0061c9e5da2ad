"""Canonizers: which kind each traced call is, and the passes that rewrite the traced steps into canonical form.

zennit applies canonizers by mutating the model and undoing it afterwards; here they act on the traced graph only, so
the user's model is never touched. The classification tables below say which fx call is which :class:`Kind`; the
passes (:data:`PASSES`, run in order by :class:`lrp.graph.Network`) then rewrite the steps:

* :func:`fold_batchnorms`: ``BN(conv(x))`` becomes one affine layer ``conv'(x)`` with ``W' = W s`` and
  ``b' = (b - mu) s + beta``, ``s = gamma / sqrt(var + eps)``, so LRP rules see the pre-activation that reaches the
  ReLU. A BatchNorm that does not directly follow a Conv/Linear (DenseNet's after a concatenation) becomes an
  ``affine`` step (elementwise ``x * s + t``) with its own rule.
* :func:`mark_nonnegative`: which values cannot be negative by construction (after a ReLU), so rules skip their
  ``x^-`` branches without a per-batch check, and which take both signs (an affine map's output with no rectifier
  after it), so rules take the signed form without one either.

Residual sums (``a + b``) are ``sum`` steps (a proportional ``Norm`` rule instead of the gradient's copy, which would
double the relevance); concatenations, chunks and splits are ``structural`` (relevance split back exactly).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import windows
from .kinds import Kind
from .layers import LinearLayer, UnsupportedLayerError

_POINTWISE_MODULES = (nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                      nn.ELU, nn.Mish)  # nn.ReLU6 is a Hardtanh

_MODULE_KINDS = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), Kind.LINEAR),
    ((nn.modules.batchnorm._BatchNorm,), Kind.BATCHNORM),
    ((nn.ReLU,), Kind.ACTIVATION),
    (_POINTWISE_MODULES, Kind.POINTWISE),
    ((nn.LayerNorm,), Kind.LAYERNORM),
    ((nn.MultiheadAttention,), Kind.TUPLE),  # (output, weights): the output read is an attention step
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
     Kind.MAXPOOL),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
     Kind.AVGPOOL),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity), Kind.IDENTITY),
    ((nn.Flatten, nn.Unflatten), Kind.STRUCTURAL),
]

#: gate activations: a product of a tensor with one of these is a squeeze-and-excitation gate
GATE_ACTIVATIONS = (nn.Sigmoid, nn.Hardsigmoid, torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid")
#: pointwise functions whose output is >= 0
_NONNEGATIVE_POINTWISE = (nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid,
                          "sigmoid")

_FUNCTION_KINDS = {
    F.relu: Kind.ACTIVATION, torch.relu: Kind.ACTIVATION,
    **{f: Kind.POINTWISE for f in (F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.sigmoid,
                                   torch.sigmoid, F.tanh, torch.tanh, F.leaky_relu, F.elu, F.mish)},
    F.layer_norm: Kind.LAYERNORM,
    **{f: Kind.MAXPOOL for f in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d)},
    **{f: Kind.AVGPOOL for f in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                                 F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.mean)},
    **{f: Kind.IDENTITY for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)},
    **{f: Kind.STRUCTURAL for f in (torch.flatten, torch.cat, torch.concat, torch.reshape, torch.unsqueeze,
                                    torch.squeeze, torch.permute, torch.transpose, operator.getitem, torch.roll,
                                    torch.swapaxes, torch.swapdims, torch.movedim)},
    **{f: Kind.TUPLE for f in (torch.chunk, torch.split, torch.unbind, torch.tensor_split)},
    getattr: Kind.META,
}

_METHOD_KINDS = {
    "relu": Kind.ACTIVATION, "relu_": Kind.ACTIVATION,
    "sigmoid": Kind.POINTWISE, "tanh": Kind.POINTWISE,
    "mean": Kind.AVGPOOL,
    **{m: Kind.STRUCTURAL for m in ("flatten", "view", "reshape", "unsqueeze", "squeeze", "permute", "transpose",
                                    "contiguous", "expand", "roll", "swapaxes", "swapdims", "movedim")},
    **{m: Kind.TUPLE for m in ("chunk", "split", "unbind", "tensor_split")},
    "size": Kind.META, "dim": Kind.META,
}

#: arithmetic calls and the kind they have with one tensor operand (a sum needs two)
ARITHMETIC = {
    operator.add: Kind.SUM, operator.iadd: Kind.SUM, torch.add: Kind.SUM, "add": Kind.SUM, "add_": Kind.SUM,
    operator.sub: Kind.SHIFT, operator.isub: Kind.SHIFT,
    operator.mul: Kind.SCALE, operator.imul: Kind.SCALE, torch.mul: Kind.SCALE, "mul": Kind.SCALE,
    operator.truediv: Kind.SCALE, torch.div: Kind.SCALE, "div": Kind.SCALE,
}
#: products: with two tensor operands they are gates when one operand is a gate activation
MULTIPLICATIONS = (operator.mul, operator.imul, torch.mul, "mul")
_DIVISIONS = (operator.truediv, torch.div, "div")
#: attributes of a tensor that are metadata, not values (``getattr`` nodes reading anything else are refused)
META_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"})


def module_kind(module: nn.Module) -> Kind | None:
    """The canonical kind of a leaf module, or None when LRP has no rule for it."""
    if getattr(module, "return_indices", False):
        return None  # a max pool that also returns its indices: a tuple, not a map
    if windows.is_attention_module(module):
        return Kind.WINDOW_ATTENTION
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return None


def function_kind(target, tensor_args: int, first_is_tensor: bool = True) -> Kind | None:
    """The canonical kind of a traced function or method call with ``tensor_args`` tensor operands (counted with
    repeats: ``y * y`` has two) of which the first positional one is a tensor when ``first_is_tensor``."""
    if target in ARITHMETIC:
        kind = ARITHMETIC[target]
        if kind == Kind.SUM:
            return Kind.SUM if tensor_args >= 2 else Kind.SHIFT
        if tensor_args >= 2:
            return None  # products and differences of two tensors have no LRP rule (gates are found by the graph)
        if target in _DIVISIONS and not first_is_tensor:
            return None  # c / y is not linear in y
        return kind
    if isinstance(target, str):
        return _METHOD_KINDS.get(target)
    return _FUNCTION_KINDS.get(target)


def library_function_kind(target, args, kwargs) -> Kind | None:
    """Kinds of functions of libraries lrp does not import (torchvision wraps them as leaves of the fx trace)."""
    if windows.function_kind(target) is not None:
        return windows.function_kind(target)
    name = (getattr(target, "__module__", None) or "", getattr(target, "__name__", None))
    if name == ("torchvision.ops.stochastic_depth", "stochastic_depth"):
        training = kwargs.get("training", args[3] if len(args) > 3 else True)
        return Kind.IDENTITY if training is False else None  # traced in eval mode: the identity
    return None


def is_gate_activation(step) -> bool:
    """Whether a step is a sigmoid-like gate (squeeze-and-excitation's last activation)."""
    return step.kind == Kind.POINTWISE and _matches(step.target, GATE_ACTIVATIONS)


def _matches(target, entries) -> bool:
    types = tuple(e for e in entries if isinstance(e, type))
    return isinstance(target, types) or any(target is e or target == e for e in entries if not isinstance(e, type))


# -- passes over the traced steps ---------------------------------------------------------------------------------
def fold_batchnorms(steps: list) -> None:
    """Fold each BatchNorm into the Conv/Linear before it where that layer's output feeds only the BatchNorm;
    any other BatchNorm becomes an ``affine`` step (elementwise ``x * s + t`` with its running statistics)."""
    consumers: dict[int, list[int]] = {}
    for step in steps:
        if step.kind in (Kind.META, Kind.CONSTANT):
            continue  # y.shape reads the folded layer's output as well as the BatchNorm's
        for j in step.inputs:
            consumers.setdefault(j, []).append(step.index)
    for step in steps:
        if step.kind != Kind.BATCHNORM:
            continue
        producer = steps[step.inputs[0]]
        foldable = (producer.kind == Kind.LINEAR and producer.layer.batchnorm is None
                    and consumers[producer.index] == [step.index])
        if foldable:
            producer.layer = LinearLayer(producer.layer.name, producer.layer.module, step.target)
            step.kind = Kind.IDENTITY  # the folded layer already produces the normalized output
            continue
        if not step.target.track_running_stats:
            raise UnsupportedLayerError(
                f"BatchNorm {step.name!r} has no running statistics (track_running_stats=False): at inference it "
                "normalizes with the batch's own statistics, which has no LRP rule")
        step.kind = Kind.AFFINE


def mark_nonnegative(steps: list) -> None:
    """Decide from the graph alone which values cannot be negative, and which take both signs, so that rules check a
    layer input's sign per batch (``amin``: on a GPU, a host synchronisation each) only where the graph cannot tell.

    Signed: the output of an affine map with no rectifier after it (a BatchNorm-folded Conv or Linear, an unfolded
    BatchNorm, a LayerNorm, attention), and what pooling, reshapes, sums, scales, shifts, gates and the smooth
    activations with a negative range (SiLU, GELU, Hardswish, Tanh) make of it. In a trained network such a value has
    negative entries in every batch, so a check would cost a synchronisation to answer "signed"; where it has none,
    the signed form gives the same relevance (its x^- terms are zeros), only more slowly. Left unknown, and checked:
    the model's input (images in [0, 1]) and what the graph cannot see through."""
    keeps_sign = (Kind.MAXPOOL, Kind.AVGPOOL, Kind.IDENTITY, Kind.STRUCTURAL, Kind.SUM)
    makes_signed = (Kind.LINEAR, Kind.AFFINE, Kind.LAYERNORM, Kind.ATTENTION, Kind.WINDOW_ATTENTION)
    keeps_signed = (*keeps_sign, Kind.SCALE, Kind.SHIFT, Kind.GATE, Kind.POINTWISE)
    for step in steps:
        inputs = [steps[j] for j in step.inputs]
        step.inputs_nonnegative = bool(inputs) and all(s.nonnegative for s in inputs) and not _joins_constants(step)
        step.inputs_signed = any(s.signed for s in inputs)
        step.nonnegative = (
            step.kind == Kind.ACTIVATION
            or (step.kind in keeps_sign and step.inputs_nonnegative)
            or (step.kind == Kind.POINTWISE and _matches(step.target, _NONNEGATIVE_POINTWISE))
            or (step.kind == Kind.GATE and inputs[0].nonnegative)  # gate values are >= 0
        )
        step.signed = not step.nonnegative and (
            step.kind in makes_signed
            or (step.kind in keeps_signed and step.inputs_signed))


def _joins_constants(step) -> bool:
    """A concatenation with a tensor that carries no relevance (a parameter, a buffer, ``torch.full(...)``): its sign
    is not the graph's to know."""
    if step.kind != Kind.STRUCTURAL or step.target not in (torch.cat, torch.concat):
        return False
    tensors = step.args[0] if step.args else (step.kwargs or {}).get("tensors", ())
    return any(getattr(t, "index", None) not in step.inputs for t in tensors)


def dropout_active(target, args, kwargs) -> bool:
    """``F.dropout(x, p)``: its ``training`` defaults to True, so it drops at inference too (a random function)."""
    if target not in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
        return False
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return training is not False


#: the passes Network runs after tracing, in order
PASSES = (fold_batchnorms, mark_nonnegative)
