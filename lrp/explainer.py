"""The Explainer: one forward pass, then one backward walk over the traced steps applying each step's rule.

No autograd graph is built for the forward pass and no weight gradient is ever computed: a linear step's backward is
its transposed map (``convolution_backward`` for the input only), so an epsilon explanation costs about one forward
plus one input-gradient pass. Only parameter-free steps whose relevance is a vector-Jacobian product (max pooling,
reshapes, concatenations) use autograd, on their own inputs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .composites import Composite, make_composite
from . import structural
from .graph import Network, Ref
from .kinds import NO_RELEVANCE, Kind
from .rules import StepContext


@dataclass
class Explanation:
    """The result of explaining a batch."""

    relevance: torch.Tensor  # same shape as the input
    output: torch.Tensor  # (B,) the explained logits f(x)
    target: torch.Tensor  # (B,) the explained class per row
    logits: torch.Tensor  # (B, classes) all logits, for predictions

    @property
    def residual(self) -> torch.Tensor:
        """Per-row conservation residual ``sum_p R_p - f(x)`` (0 for an exactly conserving explanation)."""
        return self.relevance.flatten(1).sum(1) - self.output


class Explainer:
    """Explain a classifier's target logits with a named composite (or a :class:`Composite`).

    >>> explainer = Explainer(model, composite="epsilon_gamma_box", gamma=0.25, low=-3.0, high=3.0)
    >>> result = explainer(x, target)   # result.relevance has the shape of x
    >>> result = explainer(x, None)     # explain each row's predicted class

    The computation runs in the dtype and on the device of the model; ``x`` must match (``model.double()`` and
    ``x.double()`` for float64 verification). The model is never modified.

    On CUDA, float32 means full float32: PyTorch's default TF32 convolutions (Ampere and later GPUs) keep 10 mantissa
    bits, which moved heatmaps by up to 8% (relative L2, random GoogLeNet on an H100) and spoils conservation checks.
    ``tf32=True`` lets PyTorch's global TF32 settings apply, for speed when a rough map is enough.

    ``autocast="bfloat16"`` (or ``"float16"``) runs the *forward* pass under ``torch.autocast`` on the input's device;
    the activations are cast back to the model's dtype before the backward walk, so the relevance is computed and
    returned in float32 from reduced-precision activations (measured error: benchmarks/RESULTS.md). Off by default.

    ``recompute=True`` (the default) drops the outputs of elementwise activations (ReLU, GELU, SiLU, ...) after the
    forward pass has used them and computes them again when the backward walk reaches their consumers: the same
    values bit for bit, in less memory (measured in benchmarks/RESULTS.md). ``recompute=False`` keeps every value.
    With ``autocast`` every value is kept.

    ``x`` is not checked for NaN or infinite values (on a GPU that check would be a host synchronisation per call):
    such a row gets a NaN logit and NaN relevance, and the other rows of the batch are explained as without it.
    """

    def __init__(self, model: nn.Module, composite: str | Composite = "epsilon_plus", *, tf32: bool = False,
                 autocast: str | None = None, recompute: bool = True, **params):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (an instance), got {model!r}")
        for name, flag in (("tf32", tf32), ("recompute", recompute)):
            if not isinstance(flag, bool):  # "false" or "no" would be true: TF32 on, silently
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if isinstance(composite, Composite):
            if params:
                raise TypeError("parameters are given to make_composite(), not with a Composite instance")
            self.composite = composite
        else:
            self.composite = make_composite(composite, **params)
        self.model = model
        self.tf32 = tf32
        if autocast not in AUTOCAST:
            raise ValueError(f"autocast {autocast!r} unknown: use one of {', '.join(map(str, AUTOCAST))}")
        self.autocast = AUTOCAST[autocast]
        self.recompute = recompute
        self.network = Network(model)
        self._first = self.composite.first_layer(self.network)
        self._traced_checked = False  # see _check_traced

    def __repr__(self):
        return f"Explainer({type(self.model).__name__}, composite={self.composite.name!r})"

    def __call__(self, x: torch.Tensor, target) -> Explanation:
        self.network.check_unchanged()  # hooks added or modules replaced since the explainer was built are refused
        x = self._check_input(x)
        with _precision(x, self.tf32):
            return self._explain(x, target)

    def _explain(self, x: torch.Tensor, target) -> Explanation:
        # inference_mode(False): pooling and reshape steps use autograd on their own inputs, which inference tensors
        # (e.g. from a caller's torch.inference_mode block) cannot take part in
        with torch.inference_mode(False), torch.no_grad():
            if x.is_inference():
                x = x.clone()
            values = self._forward(x)
            logits = values[self.network.output_index]
            target = self._check_target(target, logits, len(x))
            if not self._traced_checked:
                self._check_traced(x, logits)
            rows = torch.arange(logits.shape[0], device=logits.device)
            output = logits[rows, target]
            seed = torch.zeros_like(logits)
            seed[rows, target] = output if self.composite.seed == "relevance" else 1.0
            relevance = self._backward(values, seed, self.composite.prepare(self.network, self._first, x))
        if self.composite.times_input:
            relevance = relevance * x
        return Explanation(relevance=relevance, output=output, target=target, logits=logits)

    def _forward(self, x: torch.Tensor) -> list:
        """Every step's value; with ``autocast``, computed in reduced precision and cast back to ``x``'s dtype."""
        if self.autocast is None:
            return self.network.forward(x, lean=self.recompute)
        with torch.autocast(x.device.type, dtype=self.autocast):
            values = self.network.forward(x)
        return [v.to(x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]

    # -- checks -------------------------------------------------------------------------------------------------
    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        param = next(self.model.parameters(), None)
        if param is not None and (param.dtype != x.dtype or param.device != x.device):
            raise TypeError(
                f"x is {x.dtype} on {x.device} but the model is {param.dtype} on {param.device}; "
                "move both to the same dtype and device (model.double() and x.double() for float64)"
            )
        if x.dim() == 0:
            raise ValueError("x must be a batch with the batch axis first, got a 0-d tensor")
        return x.detach()

    def _check_traced(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Once, on the first call: the traced steps give the model's own logits for the first row.

        A trace records what the model does to tensors, not what Python does around them: ``b = a; a += c`` is
        traced as ``a = a + c`` (``b`` keeps the old value, eager PyTorch's ``b`` the new), and randomness or Python
        state in ``forward`` is frozen. Such a model would get a map of another function, with conservation intact;
        one eager forward of one row finds it. The tolerance allows BatchNorm folding and batch-size-dependent
        kernels (float32: 1e-3 of the largest logit), and reduced precision (TF32, autocast, half: 5e-2)."""
        if x.is_meta:
            return  # no values to compare (shape-only runs)
        training = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            if self.autocast is None:
                eager = self.model(x[:1])
            else:
                with torch.autocast(x.device.type, dtype=self.autocast):
                    eager = self.model(x[:1])
        finally:
            for module, flag in training.items():
                module.training = flag
        if not isinstance(eager, torch.Tensor) or eager.shape != logits[:1].shape:
            raise ValueError(f"the model returns {type(eager).__name__} "
                             f"{tuple(eager.shape) if isinstance(eager, torch.Tensor) else ''} for one row, the traced "
                             f"steps logits of shape {tuple(logits[:1].shape)}: the trace does not compute the model")
        ours, eager = logits[:1].double(), eager.detach().double()
        reduced = self.autocast is not None or x.dtype in (torch.float16, torch.bfloat16) or (x.is_cuda and self.tf32)
        relative = 5e-2 if reduced else 1e-3 if x.dtype == torch.float32 else 1e-9
        scale = eager.abs().nan_to_num(posinf=0.0, neginf=0.0).amax().clamp_min(1e-12)
        same = (ours == eager) | (ours.isnan() & eager.isnan())  # NaN rows (NaN in x) and infinities agree too
        if bool((~((ours - eager).abs() <= relative * scale) & ~same).any()):  # one host synchronisation, once
            gap, scale = float((ours - eager).abs().nan_to_num(nan=float("inf")).max()), float(scale)
            raise ValueError(
                f"the traced steps compute other logits than the model itself for the first row (largest difference "
                f"{gap:.3g}, largest logit {scale:.3g}): the model does something in Python that torch.fx does not "
                "record, e.g. changes a tensor in place that it reads again under another name (b = a; a += c), or "
                "uses randomness or Python state in forward; a map would explain another function")
        self._traced_checked = True

    @staticmethod
    def _check_target(target, logits: torch.Tensor, rows: int) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits of shape (batch, classes), got {tuple(logits.shape)}")
        batch, classes = logits.shape
        if batch != rows:  # a model that mixes the rows of its batch (x.reshape(1, -1)) has no per-row explanation
            raise ValueError(f"the model returns logits of shape {tuple(logits.shape)} for a batch of {rows}: LRP "
                             "needs one row of logits per row of x")
        if target is None:  # explain the prediction
            return logits.argmax(1)
        # checked where it lives: targets from the host (ints, lists, numpy, CPU tensors: a pipeline's labels) are
        # checked there and then copied without waiting; a device tensor's check is a host synchronisation
        target = _target_tensor(target)
        if target.numel() == 1:
            target = target.expand(batch)
        if target.numel() != batch:
            raise ValueError(f"target has {target.numel()} entries for a batch of {batch}")
        if bool(((target < 0) | (target >= classes)).any()):
            raise ValueError(f"target {target.tolist()} outside the model's {classes} classes (0..{classes - 1})")
        # pageable host memory is staged at once, so the copy need not wait; a pinned tensor the caller still owns
        # would be read later by the device, so that copy waits
        return target.to(logits.device, non_blocking=not target.is_pinned())

    # -- the backward walk --------------------------------------------------------------------------------------
    def _backward(self, values: list, seed: torch.Tensor, composite: Composite) -> torch.Tensor:
        network = self.network
        steps = network.steps
        relevance: dict[int, torch.Tensor] = {self.network.output_index: seed}
        for step in reversed(steps):
            r = relevance.pop(step.index, None)
            if step.kind == Kind.INPUT:
                return r if r is not None else torch.zeros_like(values[step.index])
            if r is None or step.kind in NO_RELEVANCE:
                values[step.index] = None
                continue
            for j in (*network.refs[step.index], step.index):  # what a lean forward dropped, computed again
                network.value(values, j)
            ctx = StepContext(step, [values[j] for j in step.inputs], values[step.index], _Vjp(step, values),
                              step.arguments(values.__getitem__))
            rule = composite.rule_for(step, self._first)
            for j, r_in in zip(step.inputs, rule(ctx, r)):
                if r_in is not None:
                    _check_shape(rule, step, r_in, values[j])
                    relevance[j] = relevance[j] + r_in if j in relevance else r_in
            values[step.index] = None  # every consumer of this value has been processed
        raise AssertionError("the input step was not reached")


def _target_tensor(target) -> torch.Tensor:
    """``target`` as a 1-D int64 tensor (not yet expanded to the batch); a clear error for what is no class index."""
    given = target
    if not isinstance(target, torch.Tensor) and hasattr(target, "__array__"):
        target = np.ascontiguousarray(target)  # torch refuses numpy's negative strides (labels[::-1])
    try:
        target = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"target must be None, an int, a sequence of ints or an integer tensor of class indices, "
                        f"got {type(given).__name__} {given!r:.80} ({error})") from None
    if target.numel() == 0:
        return target.long().reshape(-1)  # [] is read as float; an empty target has no value of a wrong type
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if sum(size != 1 for size in target.shape) > 1:
        raise ValueError(f"target has shape {tuple(target.shape)}: give one class index per row, shape (batch,) "
                         "(a one-hot or score matrix: .argmax(1))")
    return target.long().reshape(-1)


def _check_shape(rule, step, r_in: torch.Tensor, value) -> None:
    """The Rule contract: an input's relevance is shaped like that input (a Pass on a Conv would hand its output's
    relevance on as the input's, and the map would not have the shape of x)."""
    if isinstance(value, torch.Tensor) and r_in.shape != value.shape:
        raise ValueError(f"rule {rule!r} at step {step.name!r} ({step.kind}) returned relevance of shape "
                         f"{tuple(r_in.shape)} for an input of shape {tuple(value.shape)}: it does not fit that step")


AUTOCAST = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # forward-pass autocast dtypes

@contextmanager
def _precision(x: torch.Tensor, tf32: bool):
    """Full float32 on CUDA for the duration of a call (unless ``tf32``); PyTorch's global settings are restored
    after."""
    if not x.is_cuda or tf32:
        yield
        return
    with ieee_float32():
        yield


@contextmanager
def ieee_float32():
    """IEEE float32 matmuls and convolutions (no TF32), through PyTorch's ``fp32_precision`` settings, restored after.

    The ``fp32_precision`` API is the one the legacy ``allow_tf32`` flags and ``set_float32_matmul_precision`` map
    onto; saving and restoring it leaves whichever the user set as it was.
    """
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch before 2.9: only the legacy flags
        saved_flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_flags
        return
    # cuDNN's RNN setting goes with its conv one: the legacy ``cudnn.allow_tf32`` reads both and refuses a mix
    backends = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


class _Vjp:
    """Vector-Jacobian product of one parameter-free step with respect to its tensor inputs."""

    def __init__(self, step, values):
        self.step, self.values = step, values

    def __call__(self, message: torch.Tensor) -> tuple:
        if self.step.kind == Kind.STRUCTURAL:
            direct = structural.vjp(self.step, self.values, message, Ref)
            if direct is not None:
                return direct
        if self.step.kind == Kind.SUM and len(self.step.inputs) == 2 and all(
                self.values[j].shape == message.shape for j in self.step.inputs):
            return message, message  # a + b of two distinct tensors of one shape (no broadcast): both get the message
        leaves = {j: self.values[j].detach().requires_grad_(True) for j in self.step.inputs}
        with torch.enable_grad():
            out = self.step.call(lambda j: leaves.get(j, self.values[j]))
            grads = torch.autograd.grad(out, list(leaves.values()), message, allow_unused=True)
        return grads
