"""Vector-Jacobian products of the common structural steps, written out instead of taken from autograd.

A structural step (reshape, transpose, concatenation, a chunk's element) only moves values, so its vector-Jacobian
product moves the message back: reshaped to the input's shape, transposed back, split along the concatenated axis, or
placed into zeros where the chunk came from. Autograd gives the same tensors but re-runs the step's forward (for
DenseNet's concatenations a copy of every growing feature map) and pays its graph overhead on each of the hundred-odd
small steps of ShuffleNet's channel shuffles. Anything not matched here (other signatures, keyword forms) returns None
and the caller falls back to autograd.
"""
from __future__ import annotations

import torch

_RESHAPES = frozenset({"view", "reshape", "flatten", "contiguous", "unsqueeze", "squeeze", torch.flatten,
                       torch.reshape, torch.unsqueeze, torch.squeeze})
_TRANSPOSES = frozenset({"transpose", torch.transpose})
_CATS = frozenset({torch.cat, torch.concat})
_CHUNKS = frozenset({"chunk", torch.chunk})


def vjp(step, values: list, message: torch.Tensor, refs: type) -> tuple | None:
    """The step's input gradients for ``message`` (one per ``step.inputs``), or None when it is not a covered form.

    ``refs`` is :class:`lrp.graph.Ref` (passed in: this module sits below the graph module).
    """
    target, args, kwargs = step.target, step.args, step.kwargs or {}
    if isinstance(target, torch.nn.Flatten | torch.nn.Unflatten):
        target = "reshape"
    if not _hashable(target):
        return None
    single = len(step.inputs) == 1 and bool(args) and isinstance(args[0], refs) and args[0].index == step.inputs[0]
    if single and step.element is None and target in _RESHAPES:
        return (message.reshape(values[step.inputs[0]].shape),)
    if single and step.element is None and target in _TRANSPOSES and not kwargs and len(args) == 3:
        return (message.transpose(args[1], args[2]),)
    if single and step.element is not None and target in _CHUNKS:
        return _chunk(values[step.inputs[0]], message, step.element, args[1:], kwargs)
    if step.element is None and target in _CATS:
        return _cat(step, values, message, args, kwargs, refs)
    return None


def _hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _chunk(x: torch.Tensor, message: torch.Tensor, element: int, rest: tuple, kwargs: dict) -> tuple | None:
    bound = dict(zip(("chunks", "dim"), rest)) | kwargs
    if set(bound) - {"chunks", "dim"} or not isinstance(bound.get("chunks"), int):
        return None
    gradient = message.new_zeros(x.shape)
    gradient.chunk(bound["chunks"], bound.get("dim", 0))[element].copy_(message)
    return (gradient,)


def _cat(step, values, message, args, kwargs, refs) -> tuple | None:
    bound = dict(zip(("tensors", "dim"), args)) | kwargs
    parts, dim = bound.get("tensors"), bound.get("dim", 0)
    if set(bound) - {"tensors", "dim"} or not isinstance(parts, list | tuple) or not isinstance(dim, int):
        return None
    tensors = [values[p.index] if isinstance(p, refs) else p for p in parts]
    if not all(isinstance(t, torch.Tensor) and t.dim() == message.dim() for t in tensors):
        return None  # legacy empty 1-D operands and the like: autograd knows them
    grads: dict = {}
    for part, piece in zip(parts, message.split([t.shape[dim] for t in tensors], dim)):
        if isinstance(part, refs) and part.index in step.inputs:
            grads[part.index] = piece if part.index not in grads else grads[part.index] + piece
    return tuple(grads.get(j) for j in step.inputs)
