"""The zennit 0.5.1 oracle the LRP tests compare with: its composites for our names, its attributions, and
random BatchNorm statistics (see tests/test_lrp_zennit.py for the two zennit quirks worked around)."""
from __future__ import annotations

import torch
from torch import nn
from zennit.composites import (
    DeconvNet,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.rules import AlphaBeta, Epsilon
from zennit.types import Convolution

LOW, HIGH = -3.0, 3.0  # the input box of the z^B rule; inputs are clamped into it

_ZENNIT_NAMED = {
    "epsilon_plus": EpsilonPlus,
    "epsilon_plus_flat": EpsilonPlusFlat,
    "epsilon_gamma_box": EpsilonGammaBox,
    "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
    "epsilon_alpha2_beta1_flat": EpsilonAlpha2Beta1Flat,
}


# -- the oracle -------------------------------------------------------------------------------------------------------
def zennit_composite(name: str, canonizers=(), include_bias: bool = True, **params):
    """zennit's composite for one of our composite names, with the same parameters."""
    canonizers = list(canonizers)
    zero_params = None if include_bias else "bias"
    if name == "deconvnet":
        return DeconvNet(canonizers=canonizers)
    if name in _ZENNIT_NAMED:
        return _ZENNIT_NAMED[name](zero_params=zero_params, canonizers=canonizers, **params)
    stabilizer = params.pop("stabilizer", 1e-6)
    if name == "epsilon":
        rule = Epsilon(zero_params=zero_params, **params)
    elif name == "alpha_beta":
        rule = AlphaBeta(stabilizer=stabilizer, zero_params=zero_params, **params)
    else:
        raise KeyError(name)
    layer_map = layer_map_base(stabilizer) + [(Convolution, rule), (nn.Linear, rule)]
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def zennit_relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite, seed_ones=False):
    """zennit's attribution: backward of the logits with the target's logit (or 1) as seed, under the composite."""
    x = x.detach().clone().requires_grad_(True)
    rows = torch.arange(x.shape[0])
    with composite.context(model) as modified:
        out = modified(x)
        seed = torch.zeros_like(out)
        seed[rows, target] = 1.0 if seed_ones else out[rows, target].detach()
        (relevance,) = torch.autograd.grad(out, x, seed)
    return relevance.detach()


def autograd_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (gradient,) = torch.autograd.grad(out[torch.arange(x.shape[0]), target].sum(), x)
    return gradient


def randomize(model: nn.Module, seed: int = 0, bn_eps: float | None = 0.0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (so folding is exercised) and small random biases."""
    generator = torch.Generator().manual_seed(seed)

    def rand(t, low, high):
        return torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(rand(module.running_mean, -0.2, 0.2))
                module.running_var.copy_(rand(module.running_var, 0.5, 2.0))
                module.weight.copy_(rand(module.weight, 0.5, 1.5))
                module.bias.copy_(rand(module.bias, -0.1, 0.2))
                if bn_eps is not None:
                    module.eps = bn_eps  # zennit quirk (1), see the module docstring
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(rand(module.bias, -0.05, 0.1))
    return model
