"""Conv and Linear layers as the LRP rules see them: an affine map with (folded) weight and bias.

Rules need three primitives: the affine map with modified parameters (``forward``), its transpose applied to a
relevance message (``transpose``: the input gradient, computed without building an autograd graph and without weight
gradients), and cached parameter variants (``variant``) such as ``w + gamma * w.clamp(min=0)``, so a modified weight is
computed once per model state rather than once per batch. The cache is keyed on the parameters' version counters, so
an in-place update of the model (training, ``load_state_dict``) invalidates it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class UnsupportedLayerError(TypeError):
    """A layer or operation has no LRP rule; the message names the module or call."""


class LinearLayer:
    """A Conv1d/2d/3d or Linear module, optionally followed by a BatchNorm folded into it."""

    def __init__(self, name: str, module: nn.Module, batchnorm: nn.modules.batchnorm._BatchNorm | None = None):
        self.name = name
        self.module = module
        self.batchnorm = batchnorm
        self.is_conv = isinstance(module, nn.modules.conv._ConvNd)
        if self.is_conv:
            if module.transposed:
                raise UnsupportedLayerError(f"{name}: transposed convolutions are not supported")
            if module.padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"{name}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
                )
            self._conv = _CONV[len(module.kernel_size)]
            self._padding = self._int_padding(name, module)
        features = module.out_channels if self.is_conv else module.out_features
        if batchnorm is not None and batchnorm.num_features != features:
            raise UnsupportedLayerError(
                f"{name}: the BatchNorm after it normalizes {batchnorm.num_features} features, "
                f"the layer has {features} outputs (it normalizes another axis) and cannot be folded")
        if batchnorm is not None and not batchnorm.track_running_stats:
            raise UnsupportedLayerError(
                f"{name}: the BatchNorm after it has no running statistics (track_running_stats=False) "
                "and cannot be folded"
            )
        self._cache: dict = {}
        self._cache_key = None
        self._cache_sources: list[torch.Tensor] = []

    @staticmethod
    def _int_padding(name: str, module) -> tuple[int, ...]:
        padding = module.padding
        if padding == "valid":
            return (0,) * len(module.kernel_size)
        if padding == "same":
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if any(t % 2 for t in totals):
                raise UnsupportedLayerError(f"{name}: padding='same' with an even kernel (times dilation) pads "
                                            "asymmetrically; not supported")
            return tuple(t // 2 for t in totals)
        return tuple(padding)

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [self.module.weight, self.module.bias]
        if self.batchnorm is not None:
            bn = self.batchnorm
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return [t for t in tensors if t is not None]

    def _key(self):
        # data_ptr: ``param.data = new`` swaps the storage without bumping _version; a folded BatchNorm's eps is a
        # float attribute that enters the folded weights too
        key = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in self._tensors())
        return key if self.batchnorm is None else (*key, self.batchnorm.eps)

    def variant(self, name, make: Callable[[torch.Tensor, torch.Tensor | None], tuple]) -> tuple:
        """Parameters ``make(weight, bias)`` derived from the folded ones, cached until the model changes."""
        key = self._key()
        if key != self._cache_key:
            self._cache = {}
            self._cache_key = key
            # hold the source storages so that a freed one's address cannot be reused by a new tensor and fool the key
            self._cache_sources = [t.detach() for t in self._tensors()]
        if name not in self._cache:
            with torch.no_grad():
                if name == "params":
                    weight = self.module.weight.detach()
                    bias = None if self.module.bias is None else self.module.bias.detach()
                    if self.batchnorm is not None:
                        weight, bias = fold_batchnorm(weight, bias, self.batchnorm)
                        bias = bias.detach()
                    self._cache[name] = (weight.detach(), bias)
                else:
                    self._cache[name] = make(*self.params())
        return self._cache[name]

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The folded weight and bias (bias may be None)."""
        return self.variant("params", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The affine map with the given parameters."""
        if not self.is_conv:
            if self.batchnorm is not None and x.dim() != 2:
                # BatchNorm1d normalizes dim 1, which is the Linear's output features only for (B, F) inputs
                raise UnsupportedLayerError(
                    f"{self.name}: a Linear on a {x.dim()}-D input followed by BatchNorm normalizes another axis "
                    "than its output features and cannot be folded")
            return F.linear(x, weight, bias)
        m = self.module
        if x.dim() != len(m.kernel_size) + 2:  # F.conv2d would take a 3-D input as one unbatched image
            raise ValueError(
                f"layer {self.name!r} ({type(m).__name__}) got a {x.dim()}-D input of shape {tuple(x.shape)}; the "
                f"explainer needs a batch, {len(m.kernel_size) + 2}-D (batch, channels, ...): x[None] explains one "
                "image")
        return self._conv(x, weight, bias, m.stride, self._padding, m.dilation, m.groups)

    def transpose(self, message: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``W^T message``: the gradient of ``forward(x, weight)`` with respect to ``x``, given ``message``."""
        if not self.is_conv:
            return message @ weight
        m = self.module
        return torch.ops.aten.convolution_backward(
            message, x, weight, None, m.stride, self._padding, m.dilation, False,
            [0] * len(m.kernel_size), m.groups, [True, False, False],
        )[0]

    def expand_bias(self, bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The bias broadcast against an output tensor."""
        if not self.is_conv:
            return bias
        return bias.reshape((1, -1) + (1,) * (like.dim() - 2))


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """Fold an inference-mode BatchNorm that follows a Conv/Linear layer into that layer's weight and bias."""
    scale, shift = batchnorm_affine(bn)
    folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight, folded_bias


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An inference-mode BatchNorm as ``x * scale + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
