"""The network as a list of steps: traced once with torch.fx, canonized, then run forward and walked backward.

Tracing (instead of module hooks) lets LRP see the real data flow: residual sums, concatenations and functional calls
are nodes like any layer, so each gets its own rule, and anything without a rule is refused up front with the name of
the module or call, never silently passed through as a gradient.

The model is traced in eval mode (inference semantics: Dropout off, BatchNorm with running statistics, stochastic
depth off) and its training flag is restored afterwards; its parameters are shared, never copied or modified.
"""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module_globals

from . import attention, windows
from . import canonizers as canon
from .kinds import NO_RELEVANCE, Kind
from .layers import LinearLayer, UnsupportedLayerError


@dataclass(frozen=True)
class Ref:
    """A placeholder for the value of step ``index`` inside a call's argument template."""

    index: int


def _refs(template) -> set[int]:
    """The step indices a call's argument template reads."""
    if isinstance(template, Ref):
        return {template.index}
    if isinstance(template, (list, tuple)):
        return set().union(*map(_refs, template)) if template else set()
    if isinstance(template, dict):
        return _refs(list(template.values()))
    return set()


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
    kind: Kind | None
    inputs: list[int] = field(default_factory=list)  # the relevance-carrying steps it reads (deduplicated)
    target: Any = None  # the function, method name or module called
    args: Any = ()
    kwargs: Any = None
    layer: LinearLayer | None = None
    element: int | None = None  # for a call returning a tuple (chunk, attention): the element this step is
    nonnegative: bool = False  # the output is >= 0 by construction (after a ReLU, through pools, reshapes and sums)
    inputs_nonnegative: bool = False  # every tensor input is; rules then skip their x^- branches without a check
    signed: bool = False  # the output takes both signs: an affine map's, not rectified since (mark_nonnegative)
    inputs_signed: bool = False  # some tensor input is; rules then take their signed form without a check

    def arguments(self, lookup: Callable[[int], Any]) -> tuple[tuple, dict]:
        """The call's positional and keyword arguments with the values of earlier steps filled in."""
        return _resolve(self.args, lookup), _resolve(self.kwargs or {}, lookup)

    def call(self, lookup: Callable[[int], Any]):
        """Run the step's forward computation, reading earlier values through ``lookup``."""
        args, kwargs = self.arguments(lookup)
        return _FORWARD.get(self.kind, _call_target)(self, args, kwargs)


def _call_target(step: Step, args, kwargs):
    target = step.target
    if isinstance(target, nn.Module):
        value = target.forward(*args, **kwargs)  # .forward: the model's own hooks never fire
    elif isinstance(target, str):
        self_arg, *rest = args
        method = target[:-1] if target.endswith("_") and target != "relu_" else target
        value = getattr(self_arg, method)(*rest, **kwargs)
    elif target in _INPLACE_SAFE:
        value = _INPLACE_SAFE[target](*args, **kwargs)
    else:
        kwargs.pop("inplace", None)
        value = target(*args, **kwargs)
    return value if step.element is None else value[step.element]


def _sum(step, args, kwargs):
    if kwargs.get("alpha", 1) != 1:
        raise UnsupportedLayerError(f"{step.name}: torch.add with alpha is not supported")
    return args[0] + args[1]


def _pointwise(step, args, kwargs):
    if isinstance(step.target, nn.Module) and getattr(step.target, "inplace", False):
        return step.target.forward(args[0].clone())  # the input is kept for the backward pass
    return _call_target(step, args, kwargs)


def _batchnorm(step, args, kwargs):
    bn = step.target  # inference semantics whatever the module's training flag
    return F.batch_norm(args[0], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _layer_norm(step, args, kwargs):
    if isinstance(step.target, nn.LayerNorm):
        m = step.target
        return F.layer_norm(args[0], m.normalized_shape, m.weight, m.bias, m.eps)
    return _call_target(step, args, kwargs)


_FORWARD = {
    Kind.LINEAR: lambda step, args, kwargs: step.layer.forward(args[0], *step.layer.params()),
    Kind.ACTIVATION: lambda step, args, kwargs: torch.relu(args[0]),  # never in place: the input is kept
    Kind.IDENTITY: lambda step, args, kwargs: args[0],
    Kind.SUM: _sum,
    Kind.POINTWISE: _pointwise,
    Kind.AFFINE: _batchnorm,
    Kind.LAYERNORM: _layer_norm,
    Kind.ATTENTION: lambda step, args, kwargs: attention.forward(step.target, args[0]),
}

#: the kinds a lean forward drops and the backward walk computes again (see Network._plan_recompute)
_RECOMPUTED = (Kind.ACTIVATION, Kind.POINTWISE, Kind.IDENTITY, Kind.LAYERNORM, Kind.AFFINE)

_INPLACE_SAFE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul}


class _Attribute:
    """A tensor the model reads in forward (``self.class_token``): a constant, fetched fresh at each call."""

    def __init__(self, root: nn.Module, path: str):
        self.root, self.path = root, path

    def __call__(self):
        value = self.root
        for part in self.path.split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, torch.Tensor) else value


def refuse_hooks(model: nn.Module) -> None:
    """The explainer computes each module without its forward hooks and pre-hooks; a hook that changes an output
    would make it explain another function than the model's, so models with such hooks are refused up front."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        raise UnsupportedLayerError(
            "a global forward hook or pre-hook is registered (torch.nn.modules.module.register_module_forward_hook): "
            "the explainer does not run hooks, so it could explain another function than the model; remove it")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise UnsupportedLayerError(
                f"module {name!r} ({type(module).__name__}) has not been initialised yet: run the model once on an "
                "input (model(x)) so that lazy modules take their shapes, then build the explainer")
        found = [what for what, hooks in (("forward hook", module._forward_hooks),
                                          ("forward pre-hook", module._forward_pre_hooks)) if hooks]
        if found:
            where = repr(name) if name else f"{type(model).__name__} (the model itself)"
            raise UnsupportedLayerError(
                f"module {where} ({type(module).__name__}) has a {' and a '.join(found)}: the explainer computes the "
                "model without hooks, so a hook that changes an input or output would make it explain another "
                "function; remove the hook while explaining (handle.remove())")


class _HookFreeTracer(fx.Tracer):
    """torch.fx's tracer, but entering submodules through ``forward``: the model's hooks never see the trace."""

    def call_module(self, m, forward, args, kwargs):
        return super().call_module(m, m.forward, args, kwargs)

    def is_leaf_module(self, m, qualname):
        return windows.is_attention_module(m) or super().is_leaf_module(m, qualname)


def _prune_unused_elements(graph: fx.Graph) -> None:
    """Drop reads of tuple elements nobody uses (``x, _ = attention(...)``), so no step computes them."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)


#: calls whose result may share storage with their first argument (a view, or the argument itself)
_ALIAS_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "unsqueeze", "squeeze",
                            "permute", "transpose", "t", "contiguous", "expand", "expand_as", "narrow", "select",
                            "swapaxes", "swapdims", "movedim", "chunk", "split", "unbind", "tensor_split", "detach"})
_ALIAS_FUNCTIONS = (operator.getitem, torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze, torch.permute,
                    torch.transpose, torch.narrow, torch.select, torch.swapaxes, torch.swapdims, torch.movedim,
                    torch.chunk, torch.split, torch.unbind, torch.tensor_split, torch.detach, F.dropout)
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout)
_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_, F.relu_)


def _mutates_first(node: fx.Node, root: nn.Module) -> bool:
    """Whether the call changes its first argument in place (``y.relu_()``, ``a += b``, ``nn.ReLU(inplace=True)``)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "inplace", False) is True
    return node.op == "call_function" and (node.kwargs.get("inplace") is True or node.target in _INPLACE_FUNCTIONS)


def _aliases_first(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _ALIAS_MODULES)
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


def _follow_inplace(graph: fx.Graph, root: nn.Module) -> None:
    """Make later reads of a tensor changed in place read the changed value, as they do in eager PyTorch.

    The trace records ``y.relu_()`` (or ``z = relu_inplace(y)``, ``a += b``) as a new node, but later code that still
    says ``y`` reads the old node: the steps would compute those uses from the value before the change, a different
    function than the model's. Uses of ``y`` after the change are pointed at the changed value. Where the change
    also reaches another tensor through shared storage (``y`` is a view of ``x`` and ``x`` is read later) no such
    rewrite is exact: refused, naming the call."""
    nodes = list(graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    for node in nodes:
        if node.op not in ("call_method", "call_module", "call_function") or not _mutates_first(node, root):
            continue
        changed = node.args[0]
        for user in list(changed.users):
            if order[user] > order[node]:
                user.replace_input_with(changed, node)
        for other in _storage_sharers(changed, root, order):
            if other is not changed and order[other] < order[node] and any(order[u] > order[node]
                                                                           for u in other.users):
                raise UnsupportedLayerError(
                    f"the in-place call {node.name!r} ({_describe(node.target)}) changes {changed.name!r}, which "
                    f"shares its storage with {other.name!r}, read again later: LRP traces values, not storage; "
                    "make the call out of place (inplace=False, or y = y.relu() instead of y.relu_())")


def _storage_sharers(node: fx.Node, root: nn.Module, order: dict) -> set[fx.Node]:
    """The values that may share ``node``'s storage: views of it, what it is a view of, and so on (in-place calls
    return their argument, so they count as views)."""
    def linked(n):
        return n.op in ("call_method", "call_module", "call_function") and (
            _aliases_first(n, root) or _mutates_first(n, root))
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        near = [u for u in n.users if linked(u) and u.args and u.args[0] is n]
        if linked(n) and isinstance(n.args[0], fx.Node):
            near.append(n.args[0])
        for m in near:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


class Network:
    """A model traced into canonical steps (see :mod:`lrp.canonizers` for the kinds and the passes)."""

    def __init__(self, model: nn.Module):
        self.model = model
        refuse_hooks(model)
        training = {m: m.training for m in model.modules()}
        model.eval()
        # a bare layer (nn.Linear, nn.Conv2d) is a leaf to fx: wrap it so that it becomes one traced call
        self._root = nn.Sequential(model) if canon.module_kind(model) is not None else model
        try:
            graph = _HookFreeTracer().trace(self._root)
        except Exception as error:  # fx raises many types; all mean the same to the user
            raise UnsupportedLayerError(
                f"could not trace {type(model).__name__} with torch.fx ({type(error).__name__}: {error}); "
                "LRP needs a model without data-dependent control flow, built from supported layers"
            ) from error
        finally:
            for module, flag in training.items():
                module.training = flag
        _prune_unused_elements(graph)
        _follow_inplace(graph, self._root)
        self.steps: list[Step] = _Builder(self._root).build(graph)
        for canonical_pass in canon.PASSES:
            canonical_pass(self.steps)
        self.input_index = next(s.index for s in self.steps if s.kind == Kind.INPUT)
        self.output_index = next(s.index for s in self.steps if s.kind == Kind.OUTPUT)
        linear = [s for s in self.steps if s.kind == Kind.LINEAR]
        if not linear:
            raise UnsupportedLayerError(f"{type(model).__name__} has no Conv or Linear layer to explain")
        self.first_linear = linear[0].index
        self._modules = list(model.named_modules())  # what was traced: see replaced_modules
        self._snapshot()
        self._plan_recompute()

    def _snapshot(self) -> None:
        self._children = [(module, tuple(module._modules.values())) for _, module in self._modules]

    def unchanged(self) -> bool:
        """Whether the model is as traced, checked cheaply before every call: each traced module still has the same
        children and no forward hook, and no global hook is set. One pass over the modules' own dicts (about 30 µs
        on resnet50, where ``refuse_hooks`` and ``replaced_modules`` walk ``named_modules()`` in 220 µs); when it
        says no, those two say what changed. A change that alters nothing computed (children reordered) is taken
        into the snapshot."""
        if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
            return False
        return all(tuple(module._modules.values()) == children
                   and not module._forward_hooks and not module._forward_pre_hooks
                   for module, children in self._children)

    def check_unchanged(self) -> None:
        """Raise when the model gained a forward hook or had a module replaced, added or removed since it was
        traced (the steps would compute the traced modules, e.g. an old classifier head)."""
        if self.unchanged():
            return
        refuse_hooks(self.model)
        replaced = self.replaced_modules()
        if replaced:
            raise ValueError(
                f"the model's modules changed since this explainer traced it ({', '.join(map(repr, replaced[:5]))} "
                "replaced, added or removed): it would explain the old ones; build a new lrp.Explainer for the model")
        self._snapshot()

    def replaced_modules(self) -> list[str]:
        """Paths of the model's modules that are not those traced: replaced, added or removed since (the steps would
        still compute the traced ones, e.g. an old classifier head after ``model.fc = nn.Linear(...)``)."""
        now = list(self.model.named_modules())
        if len(now) == len(self._modules) and all(
                name == old_name and module is old for (name, module), (old_name, old) in zip(now, self._modules)):
            return []
        traced, current = dict(self._modules), dict(now)
        return sorted(name for name in traced.keys() | current.keys() if traced.get(name) is not current.get(name))

    def _plan_recompute(self) -> None:
        """Which values a lean forward drops after their last use, to be recomputed in the backward walk.

        Elementwise steps (ReLU, GELU, SiLU, ..., LayerNorm, an unfolded BatchNorm) cost one cheap pass to compute
        again, and their outputs are a large share of what a forward keeps (29% on ConvNeXt, 40% on EfficientNet, 18%
        on ViT); rules never need them before the walk reaches their consumers. Recomputing runs the same op on the
        same input, so the values (and the relevance) are bit for bit those of a full forward. Identities (Dropout, a
        folded BatchNorm) return their input itself: dropped too, else they would keep an activation's storage alive,
        and free to restore. Kept: what the model returns, and values that a structural step views (a reshape or slice
        would keep the storage alive, and a recomputed copy would sit beside it).
        """
        self.refs: list[frozenset[int]] = [frozenset(_refs((s.args, s.kwargs or {}))) for s in self.steps]
        returned = self.refs[self.output_index]
        viewed = {j for s in self.steps if s.kind == Kind.STRUCTURAL for j in self.refs[s.index]}
        self.recomputable = frozenset(
            s.index for s in self.steps
            if s.kind in _RECOMPUTED and s.element is None and s.index not in returned | viewed)
        last_use: dict[int, int] = {}
        for step in self.steps:
            for j in self.refs[step.index] & self.recomputable:
                last_use[j] = max(last_use.get(j, -1), step.index)
        self._drop_after: dict[int, list[int]] = {}
        for j, i in last_use.items():
            self._drop_after.setdefault(i, []).append(j)

    # -- execution ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, until: int | None = None, lean: bool = False) -> list:
        """All step values for input ``x`` (the last one is the output), or those up to step ``until``.

        ``lean``: the :attr:`recomputable` values are dropped (None) once their last consumer has run; :meth:`value`
        computes one again when the backward walk needs it.
        """
        drop = self._drop_after if lean and until is None else {}
        values: list = [None] * len(self.steps)
        values[self.input_index] = x
        for step in self.steps:
            if until is not None and step.index > until:
                break
            if step.kind in (Kind.INPUT, Kind.TUPLE):
                continue  # a tuple is computed by the steps that read its elements
            if step.kind == Kind.OUTPUT:
                values[step.index] = values[step.args[0].index]
                continue
            try:
                values[step.index] = step.call(values.__getitem__)
            except RuntimeError as error:  # PyTorch's message names no layer: say which step, on which input
                error.add_note(f"(lrp: in step {step.name!r} ({step.kind}) of the traced model, explaining x of "
                               f"shape {tuple(x.shape)})")
                raise
            for j in drop.get(step.index, ()):
                values[j] = None
        return values

    def value(self, values: list, index: int):
        """Step ``index``'s value in ``values``, recomputed (and stored there) if a lean forward dropped it."""
        if values[index] is None and index in self.recomputable:
            values[index] = self.steps[index].call(lambda j: self.value(values, j))
        return values[index]


_SUPPORTED_MODULES = ("Conv, Linear, BatchNorm, ReLU, ReLU6, Hardswish, Hardsigmoid, SiLU, GELU, Sigmoid, Tanh, "
                      "LayerNorm, MultiheadAttention (self-attention), Swin / MaxViT window attention, MaxPool, "
                      "AvgPool, AdaptiveAvgPool, Dropout, Flatten")


class _Builder:
    """Turns an fx graph into steps, one handler per node op (see ``_HANDLERS``)."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.steps: list[Step] = []
        self.index_of: dict[fx.Node, int] = {}

    def build(self, graph: fx.Graph) -> list[Step]:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedLayerError(
                f"the model's forward takes {len(placeholders)} inputs; LRP explains models with exactly one input"
            )
        for node in graph.nodes:
            index = len(self.steps)
            def to_ref(n):
                return Ref(self.index_of[n])
            inputs = []
            for n in node.all_input_nodes:
                j = self.index_of[n]
                if self.steps[j].kind not in NO_RELEVANCE and j not in inputs:
                    inputs.append(j)
            step = Step(index, node.name, None, inputs, node.target, fx.node.map_arg(node.args, to_ref),
                        fx.node.map_arg(node.kwargs, to_ref))
            self._HANDLERS[node.op](self, node, step)
            self._refuse_tuple_reads(node, step)
            self.index_of[node] = index
            self.steps.append(step)
        return self.steps

    def _kind_of(self, node: fx.Node) -> Kind:
        return self.steps[self.index_of[node]].kind

    def _placeholder(self, node, step):
        step.kind = Kind.INPUT

    def _output(self, node, step):
        if not isinstance(node.args[0], fx.Node):
            raise UnsupportedLayerError(
                "the model returns a tuple or dict; LRP explains a single logits tensor (B, classes)")
        step.kind = Kind.OUTPUT

    def _attribute(self, node, step):
        step.kind, step.target, step.args, step.kwargs = Kind.CONSTANT, _Attribute(self.root, node.target), (), {}

    def _constant_inputs(self, node) -> Kind | None:
        """META or CONSTANT when every input is one (a value that does not depend on the model's input)."""
        kinds = {self._kind_of(n) for n in node.all_input_nodes}
        if not kinds or not kinds <= NO_RELEVANCE:
            return None
        return Kind.META if kinds == {Kind.META} else Kind.CONSTANT

    def _module(self, node, step):
        original = self.root.get_submodule(node.target)
        step.name, step.target = node.target, original  # the module path users know ('features.3')
        step.kind = self._constant_inputs(node) or canon.module_kind(original)
        if step.kind is None:
            why = " with return_indices=True" if getattr(original, "return_indices", False) else ""
            raise UnsupportedLayerError(
                f"module {node.target!r} ({type(original).__name__}{why}) has no LRP rule; supported: "
                f"{_SUPPORTED_MODULES}")
        if step.kind == Kind.LINEAR:
            step.layer = LinearLayer(node.target, original)

    def _function(self, node, step):
        constant = self._constant_inputs(node)
        if constant is not None:
            step.kind = constant
            return
        if node.target is operator.getitem and self._kind_of(node.args[0]) == Kind.TUPLE:
            self._element(node, step)
            return
        # operands counted with repeats (y * y is a product of two tensors), and whether the first is one
        operands: list = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: operands.append(self._kind_of(n) not in NO_RELEVANCE))
        first = (bool(node.args) and isinstance(node.args[0], fx.Node)
                 and self._kind_of(node.args[0]) not in NO_RELEVANCE)
        step.kind = canon.function_kind(node.target, sum(operands), first)
        if step.kind is None:
            step.kind = canon.library_function_kind(node.target, node.args, node.kwargs)
        if step.kind == Kind.META and node.target is getattr and node.args[1] not in canon.META_ATTRIBUTES:
            step.kind = None  # x.data, x.mT, x.T: tensors, not metadata
        if step.kind is None and node.target in canon.MULTIPLICATIONS and sum(operands) == 2:
            self._gate(step)
        if step.kind is None:
            raise UnsupportedLayerError(_no_rule_message(node))
        if canon.dropout_active(node.target, node.args, node.kwargs):
            raise UnsupportedLayerError(
                f"{_describe(node.target)} (node {node.name!r}) drops at random even in eval mode (its training "
                "argument defaults to True): the model is not one function to explain; pass training=self.training")

    def _gate(self, step):
        """``gated * gate`` with gate a sigmoid-like activation: the gate is a constant scale of the gated path."""
        gates = [j for j in step.inputs if canon.is_gate_activation(self.steps[j])]
        if len(step.inputs) == 2 and len(gates) == 1:
            step.kind = Kind.GATE
            step.inputs = [j for j in step.inputs if j != gates[0]] + gates  # the gated path first

    def _element(self, node, step):
        """``tuple_call(...)[i]`` as one step computing element i: chunk/split elements move relevance exactly."""
        producer = self.steps[self.index_of[node.args[0]]]
        index = node.args[1]
        step.name = f"{producer.name}[{index}]"
        step.target, step.args, step.kwargs = producer.target, producer.args, producer.kwargs
        step.inputs = producer.inputs
        step.element = index
        step.kind = Kind.STRUCTURAL
        if isinstance(producer.target, nn.MultiheadAttention):
            if index != 0:
                raise UnsupportedLayerError(
                    f"the model reads the attention weights of {producer.name!r}; LRP explains its output only")
            try:  # by name, as the module reads them: a mask given by position is a mask too
                bound = inspect.signature(producer.target.forward).bind(*producer.args, **(producer.kwargs or {}))
            except TypeError as error:
                raise UnsupportedLayerError(f"attention {producer.name!r}: {error}") from None
            called = bound.arguments
            same = len({repr(called.get(k)) for k in ("query", "key", "value")}) == 1
            try:
                attention.check(producer.name, producer.target, same, called)
            except attention.AttentionError as error:
                raise UnsupportedLayerError(str(error)) from None
            step.kind, step.element, step.args, step.kwargs = Kind.ATTENTION, None, (called["query"],), {}

    def _refuse_tuple_reads(self, node, step):
        if step.kind == Kind.TUPLE or step.element is not None or step.kind == Kind.ATTENTION:
            return
        for j in step.inputs:
            if self.steps[j].kind == Kind.TUPLE:
                raise UnsupportedLayerError(
                    f"{node.name!r} reads the tuple returned by {self.steps[j].name!r} as a whole; LRP needs its "
                    "elements read one by one (a, b = x.chunk(2))")

    _HANDLERS: ClassVar[dict] = {
        "placeholder": _placeholder, "output": _output, "get_attr": _attribute,
        "call_module": _module, "call_function": _function, "call_method": _function,
    }


def _no_rule_message(node: fx.Node) -> str:
    where = f" at {node.stack_trace.strip().splitlines()[-2].strip()}" if node.stack_trace else ""
    hint = ""
    if node.target is getattr:
        hint = f": it reads the tensor attribute {node.args[1]!r}, not metadata like .shape"
    elif node.target in canon.ARITHMETIC:
        hint = (": LRP has rules for sums of tensors, for scaling or shifting one tensor by constants, and for "
                "gates (a tensor times a sigmoid of another)")
    return f"operation {_describe(node.target)} (node {node.name!r}{where}) has no LRP rule{hint}"


def _describe(target) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}()"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
