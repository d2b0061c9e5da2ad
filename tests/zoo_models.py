"""Helpers for the zoo tests and the engine benchmark: torchvision models at random init on small inputs."""
from __future__ import annotations

import warnings

import torch
import torchvision
from torch import nn

ZOO = torchvision.models.list_models(module=torchvision.models)

#: models refused with the layer that has no rule (docs/engine.md, "Models"): none since lrp/windows.py
REFUSED: dict[str, str] = {}


def build(name: str, seed: int = 0, meta: bool = False) -> tuple[nn.Module, int]:
    """A random-init model with 10 classes in eval mode and the side of the smallest input it takes cheaply.

    ``meta``: on PyTorch's meta device (shapes, no data: nothing is computed, and any read of a value, ``.item()`` or
    a value-dependent shape, raises); built there directly where the constructor allows it (RegNet's reads its
    width schedule back as numbers, so it is built on the CPU and moved)."""
    if meta:
        try:
            with torch.device("meta"):
                return _build(name, seed, fix_zeros=False)
        except NotImplementedError:  # "Cannot copy out of meta tensor": a constructor that reads values
            model, size = _build(name, seed, fix_zeros=False)
            return model.to("meta"), size
    return _build(name, seed)


def _build(name: str, seed: int, fix_zeros: bool = True) -> tuple[nn.Module, int]:
    kwargs, size = {"num_classes": 10}, 64
    if name.startswith("vit"):
        size = kwargs["image_size"] = 28 if name.endswith("14") else 32
    if name == "maxvit_t":
        size = 224  # its partition size 7 must divide every stage's map: 224 / 32 = 7
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
        size = 80 if name == "inception_v3" else 64
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    if not fix_zeros:
        return model, size
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and not parameter.abs().gt(0).any():
                parameter.normal_(0, 0.1)  # zero-initialised heads (ViT) would explain a constant 0
    return model, size


def positive_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """The model with every weight made positive and normalised to a weighted mean per output, positive biases and
    BatchNorm/LayerNorm parameters that keep every pre-activation positive: with positive inputs no denominator of
    the z rule comes near zero, so float64 conservation checks test the rules, not the cancellation of random init."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith("weight") and parameter.dim() >= 2:
                    parameter.abs_().add_(1e-3)
                    parameter.div_(parameter.sum(dim=tuple(range(1, parameter.dim())), keepdim=True))
                elif name.endswith("bias"):
                    uniform(parameter, 0.0, 0.2)
                else:  # BatchNorm / LayerNorm scales, layer scales, class tokens, position embeddings
                    uniform(parameter, 0.5, 1.5)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                uniform(module.running_mean, -0.5, 0.0)
                uniform(module.running_var, 0.5, 2.0)
    return model
