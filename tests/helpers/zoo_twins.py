"""zennit twins of torchvision zoo models: the same function, written so that zennit's module hooks see our rules.

zennit hooks modules; operations written in ``forward`` (``a + b``, ``scale * x``, functional pools) get a plain
gradient, which is not an LRP rule (a residual ``a + b`` under autograd passes the whole relevance to both branches).
Our engine traces those operations and gives each its documented rule. To compare the same rule assignment, the
twin computes the same function through modules zennit has rules for:

* a residual ``x + f(x)`` becomes zennit's ``Sum`` module (the ``Norm`` rule, what its ResNet canonizer inserts);
* a squeeze-and-excitation gate ``scale * x`` becomes a ``Gate`` module with ``scale`` detached, hooked with zennit's
  ``Pass`` rule: relevance to the gated path only (our ``gate`` kind);
* a functional average pool (``F.adaptive_avg_pool2d``, ``x.mean([2, 3])``) becomes a module pool, which both
  engines then explain (zennit's ``Norm`` on ``AvgPool`` modules is our ``avgpool`` rule);
* a BatchNorm that cannot be merged into a Conv (DenseNet's after a concatenation) gets zennit's ``Epsilon`` rule by
  name: on ``z = s x + t`` that is our ``Affine`` rule, ``R_x = s x / (s x + t) R``.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torchvision.models import densenet, efficientnet, mnasnet, mobilenetv2, mobilenetv3, regnet
from torchvision.ops import misc
from zennit.canonizers import NamedMergeBatchNorm, SequentialMergeBatchNorm
from zennit.composites import MixedComposite, NameMapComposite
from zennit.layer import Sum
from zennit.rules import Epsilon, Pass
from zennit.torchvision import ResNetCanonizer


class Gate(nn.Module):
    """``x * scale`` with the scale set (detached) just before the call: a constant scale of the gated path."""

    scale: torch.Tensor | None = None

    def forward(self, x):
        return x * self.scale


def _sum(module, a, b):
    return module.zennit_sum(torch.stack([a, b], dim=-1))


def _mobilenet_v2_block(self, x):
    return _sum(self, x, self.conv(x)) if self.use_res_connect else self.conv(x)


def _block_with_residual(self, x):  # MobileNetV3's InvertedResidual, EfficientNet's MBConv (stochastic depth: eval)
    result = self.block(x)
    return _sum(self, result, x) if self.use_res_connect else result


def _regnet_block(self, x):
    skip = x if self.proj is None else self.proj(x)
    return self.activation(_sum(self, skip, self.f(x)))


def _mnasnet_block(self, x):
    return _sum(self, self.layers(x), x) if self.apply_residual else self.layers(x)


def _squeeze_excitation(self, x):
    self.gate.scale = self._scale(x).detach()
    return self.gate(x)


_TWIN_FORWARDS = {
    mobilenetv2.InvertedResidual: _mobilenet_v2_block,
    mobilenetv3.InvertedResidual: _block_with_residual,
    efficientnet.MBConv: _block_with_residual,
    regnet.ResBottleneckBlock: _regnet_block,
    mnasnet._InvertedResidual: _mnasnet_block,
    misc.SqueezeExcitation: _squeeze_excitation,
}


def zennit_twin(model: nn.Module) -> nn.Module:
    """The model with residual sums and gates as modules (in place; give it a deep copy)."""
    for module in list(model.modules()):
        forward = _TWIN_FORWARDS.get(type(module))
        if forward is None:
            continue
        if forward is _squeeze_excitation:
            module.gate = Gate()
        else:
            module.zennit_sum = Sum()
        module.forward = types.MethodType(forward, module)
    return model


# -- functional pools as modules (for both engines) --------------------------------------------------------------------
def _pooled_head(self, features):
    return self.classifier(torch.flatten(self.head_pool(features), 1))


def _mobilenet_v2_forward(self, x):
    return _pooled_head(self, self.features(x))


def _densenet_forward(self, x):
    return _pooled_head(self, self.head_relu(self.features(x)))


def _mnasnet_forward(self, x):
    return self.classifier(torch.flatten(self.head_pool(self.layers(x)), 1))


def _shufflenet_forward(self, x):
    for name in ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"):
        x = getattr(self, name)(x)
    return self.fc(torch.flatten(self.head_pool(x), 1))


def module_pools(model: nn.Module) -> nn.Module:
    """The model with its functional global average pool (and DenseNet's functional ReLU) as modules (in place)."""
    forward = {mobilenetv2.MobileNetV2: _mobilenet_v2_forward, densenet.DenseNet: _densenet_forward,
               mnasnet.MNASNet: _mnasnet_forward}.get(type(model))
    if type(model).__name__ == "ShuffleNetV2":
        forward = _shufflenet_forward
    if forward is None:
        return model
    model.head_pool = nn.AdaptiveAvgPool2d(1)
    model.head_relu = nn.ReLU()
    model.forward = types.MethodType(forward, model)
    return model


# -- canonizers and per-name rules -------------------------------------------------------------------------------------
def densenet_batchnorms(model: nn.Module) -> tuple[list, list[str]]:
    """DenseNet's (Conv, BatchNorm) pairs zennit can merge, and the names of the BatchNorms it cannot."""
    pairs = [(["features.conv0"], "features.norm0")]
    names = [name for name, m in model.named_modules() if isinstance(m, densenet._DenseLayer)]
    pairs += [([f"{name}.conv1"], f"{name}.norm2") for name in names]
    merged = {bn for _, bn in pairs}
    affine = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and name not in merged]
    return pairs, affine


def canonizers_for(model: nn.Module) -> list:
    if isinstance(model, densenet.DenseNet):
        return [NamedMergeBatchNorm(densenet_batchnorms(model)[0])]
    if type(model).__name__ == "ResNet":
        return [ResNetCanonizer()]
    return [SequentialMergeBatchNorm()]


def with_twin_rules(model: nn.Module, composite, stabilizer: float = 1e-6):
    """zennit ``composite`` plus our rules for the twin's gates and unmergeable BatchNorms, with the canonizers."""
    name_map = [(tuple(n for n, m in model.named_modules() if isinstance(m, Gate)), Pass())]
    if isinstance(model, densenet.DenseNet):
        name_map.append((tuple(densenet_batchnorms(model)[1]), Epsilon(stabilizer)))
    name_map = [(names, rule) for names, rule in name_map if names]
    return MixedComposite([NameMapComposite(name_map), composite], canonizers=canonizers_for(model))
