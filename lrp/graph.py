"""The network as a list of steps: traced once with torch.fx, canonized, then run forward and walked backward.

Tracing (instead of module hooks) lets LRP see the real data flow: residual sums, concatenations and functional calls
are nodes like any layer, so each gets its own rule, and anything without a rule is refused up front with the name of
the module or call, never silently passed through as a gradient.

The model is traced in eval mode (inference semantics: Dropout off, BatchNorm with running statistics) and its
training flag is restored afterwards; its parameters are shared, never copied or modified.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from . import canonizers as C
from .layers import LinearLayer, UnsupportedLayerError


@dataclass(frozen=True)
class Ref:
    """A placeholder for the value of step ``index`` inside a call's argument template."""

    index: int


def _resolve(template, lookup: Callable[[int], Any]):
    if isinstance(template, Ref):
        return lookup(template.index)
    if isinstance(template, (list, tuple)):
        return type(template)(_resolve(t, lookup) for t in template)
    if isinstance(template, dict):
        return {k: _resolve(v, lookup) for k, v in template.items()}
    return template


@dataclass
class Step:
    """One node of the canonical graph."""

    index: int
    name: str
    kind: str
    inputs: list[int] = field(default_factory=list)  # indices of the tensor-valued steps it reads (deduplicated)
    target: Any = None  # the function, method name or module called
    args: Any = ()
    kwargs: Any = None
    layer: LinearLayer | None = None
    nonnegative: bool = False  # the output is >= 0 by construction (after a ReLU, through pools, reshapes and sums)
    inputs_nonnegative: bool = False  # every tensor input is; rules then skip their x^- branches without a check

    def call(self, lookup: Callable[[int], Any]):
        """Run the step's forward computation, reading earlier values through ``lookup``."""
        args = _resolve(self.args, lookup)
        kwargs = _resolve(self.kwargs or {}, lookup)
        if self.kind == C.LINEAR:
            return self.layer.forward(args[0], *self.layer.params())
        if self.kind == C.ACTIVATION:
            return torch.relu(args[0])  # never in place: the pre-activation is needed for the backward pass
        if self.kind == C.IDENTITY:
            return args[0]
        if self.kind == C.SUM:
            if kwargs.get("alpha", 1) != 1:
                raise UnsupportedLayerError(f"{self.name}: torch.add with alpha is not supported")
            return args[0] + args[1]
        if isinstance(self.target, nn.Module):
            return self.target.forward(*args, **kwargs)  # .forward: the model's own hooks never fire
        if isinstance(self.target, str):
            self_arg, *rest = args
            method = self.target[:-1] if self.target.endswith("_") and self.target != "relu_" else self.target
            return getattr(self_arg, method)(*rest, **kwargs)
        if self.target in _INPLACE_SAFE:
            return _INPLACE_SAFE[self.target](*args, **kwargs)
        kwargs.pop("inplace", None)
        return self.target(*args, **kwargs)


class _HookFreeTracer(fx.Tracer):
    """torch.fx's tracer, but entering submodules through ``forward``: the model's hooks never see the trace."""

    def call_module(self, m, forward, args, kwargs):
        return super().call_module(m, m.forward, args, kwargs)


import operator as _op

_INPLACE_SAFE = {_op.iadd: _op.add, _op.isub: _op.sub, _op.imul: _op.mul}


class Network:
    """A model traced into canonical steps (see :mod:`lrp.canonizers` for the kinds)."""

    def __init__(self, model: nn.Module):
        self.model = model
        training = {m: m.training for m in model.modules()}
        model.eval()
        # a bare layer (nn.Linear, nn.Conv2d) is a leaf to fx: wrap it so that it becomes one traced call
        self._root = nn.Sequential(model) if C.module_kind(model) is not None else model
        try:
            graph_module = fx.GraphModule(self._root, _HookFreeTracer().trace(self._root))
        except Exception as error:  # fx raises many types; all mean the same to the user
            raise UnsupportedLayerError(
                f"could not trace {type(model).__name__} with torch.fx ({type(error).__name__}: {error}); "
                "LRP needs a model without data-dependent control flow, built from supported layers"
            ) from error
        finally:
            for module, flag in training.items():
                module.training = flag
        self.steps: list[Step] = []
        self._build(graph_module)
        self._fold_batchnorms()
        self._mark_nonnegative()
        self.input_index = next(s.index for s in self.steps if s.kind == C.INPUT)
        self.output_index = next(s.index for s in self.steps if s.kind == C.OUTPUT)
        linear = [s for s in self.steps if s.kind == C.LINEAR]
        if not linear:
            raise UnsupportedLayerError(f"{type(model).__name__} has no Conv or Linear layer to explain")
        self.first_linear = linear[0].index

    # -- construction -------------------------------------------------------------------------------------------
    def _build(self, graph_module: fx.GraphModule):
        index_of: dict[fx.Node, int] = {}
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedLayerError(
                f"the model's forward takes {len(placeholders)} inputs; LRP explains models with exactly one input"
            )
        for node in graph_module.graph.nodes:
            index = len(self.steps)
            to_ref = lambda n: Ref(index_of[n])  # noqa: E731
            args = fx.node.map_arg(node.args, to_ref)
            kwargs = fx.node.map_arg(node.kwargs, to_ref)
            inputs = []
            for n in node.all_input_nodes:
                if self.steps[index_of[n]].kind != C.META and index_of[n] not in inputs:
                    inputs.append(index_of[n])
            step = Step(index, node.name, "", inputs, node.target, args, kwargs)
            if node.op == "call_module":
                step.name = node.target  # the module path users know ('features.3'), not fx's 'features_3'
            if node.op == "placeholder":
                step.kind = C.INPUT
            elif node.op == "output":
                if not isinstance(node.args[0], fx.Node):
                    raise UnsupportedLayerError(
                        "the model returns a tuple or dict; LRP explains a single logits tensor (B, classes)"
                    )
                step.kind = C.OUTPUT
            elif node.op == "call_module":
                module = graph_module.get_submodule(node.target)
                original = self._root.get_submodule(node.target)
                step.target = original
                step.kind = C.module_kind(module)
                if step.kind is None:
                    why = " with return_indices=True" if getattr(module, "return_indices", False) else ""
                    raise UnsupportedLayerError(
                        f"module {node.target!r} ({type(module).__name__}{why}) has no LRP rule; supported: Conv, "
                        "Linear, BatchNorm after Conv/Linear, ReLU, MaxPool, AvgPool, AdaptiveAvgPool, Dropout, Flatten"
                    )
                if step.kind == C.LINEAR:
                    step.layer = LinearLayer(node.target, original)
            elif node.op in ("call_function", "call_method"):
                all_meta = node.all_input_nodes and all(self.steps[index_of[n]].kind == C.META for n in node.all_input_nodes)
                # operands counted with repeats (y * y is a product of two tensors), and whether the first is one
                operands: list = []
                fx.node.map_arg((node.args, node.kwargs), lambda n: operands.append(self.steps[index_of[n]].kind != C.META))
                first = bool(node.args) and isinstance(node.args[0], fx.Node) and self.steps[index_of[node.args[0]]].kind != C.META
                step.kind = C.META if all_meta else C.function_kind(node.target, sum(operands), first)
                if step.kind == C.META and node.target is getattr and node.args[1] not in C.META_ATTRIBUTES:
                    step.kind = None  # x.data, x.mT, x.T: tensors, not metadata
                if step.kind is None:
                    where = f" at {node.stack_trace.strip().splitlines()[-2].strip()}" if node.stack_trace else ""
                    hint = ""
                    if node.target is getattr:
                        hint = f": it reads the tensor attribute {node.args[1]!r}, not metadata like .shape"
                    elif node.target in C._ARITHMETIC:
                        hint = ": LRP has rules for sums of tensors and for scaling or shifting one tensor by constants"
                    raise UnsupportedLayerError(
                        f"operation {_describe(node.target)} (node {node.name!r}{where}) has no LRP rule{hint}"
                    )
            elif node.op == "get_attr":
                raise UnsupportedLayerError(
                    f"the model reads tensor attribute {node.target!r} directly in forward; LRP cannot attribute to it"
                )
            index_of[node] = index
            self.steps.append(step)

    def _fold_batchnorms(self):
        consumers: dict[int, list[int]] = {}
        for step in self.steps:
            for j in step.inputs:
                consumers.setdefault(j, []).append(step.index)
        for step in self.steps:
            if step.kind != C.BATCHNORM:
                continue
            producer = self.steps[step.inputs[0]]
            if producer.kind != C.LINEAR or producer.layer.batchnorm is not None or consumers[producer.index] != [step.index]:
                raise UnsupportedLayerError(
                    f"BatchNorm {step.name!r} does not directly follow a Conv/Linear layer whose output only it reads; "
                    "it cannot be folded, and LRP has no rule for a standalone BatchNorm"
                )
            producer.layer = LinearLayer(producer.layer.name, producer.layer.module, step.target)
            step.kind = C.IDENTITY  # the folded layer already produces the normalized output

    def _mark_nonnegative(self):
        """Decide from the graph alone which values cannot be negative, so rules need no per-batch ``(x >= 0).all()``."""
        keeps_sign = (C.MAXPOOL, C.AVGPOOL, C.IDENTITY, C.STRUCTURAL, C.SUM)
        for step in self.steps:
            inputs = [self.steps[j] for j in step.inputs]
            step.inputs_nonnegative = bool(inputs) and all(s.nonnegative for s in inputs)
            step.nonnegative = step.kind == C.ACTIVATION or (step.kind in keeps_sign and step.inputs_nonnegative)

    # -- execution ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, until: int | None = None) -> list:
        """All step values for input ``x`` (the last one is the output), or those up to step ``until``."""
        values: list = [None] * len(self.steps)
        values[self.input_index] = x
        for step in self.steps:
            if until is not None and step.index > until:
                break
            if step.kind == C.INPUT:
                continue
            if step.kind == C.OUTPUT:
                values[step.index] = values[step.args[0].index]
                continue
            values[step.index] = step.call(values.__getitem__)
        return values


def _describe(target) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}()"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
