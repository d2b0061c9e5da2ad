"""The float64 cases of the zennit comparison: torchvision models with random weights, their zennit twins, a batch.

Shared by ``test_lrp_zennit`` (on the CPU) and ``test_cuda`` (the same cases moved to the GPU).
"""
from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lrp

from .zennit_reference import HIGH, LOW, randomize, zennit_composite, zennit_relevance


# -- the models -------------------------------------------------------------------------------------------------------
def narrow_classifier(model: nn.Module, width: int = 64) -> nn.Module:
    """AlexNet/VGG with the two 4096-wide hidden Linear layers narrowed to ``width`` (same layers, same order).

    Their 100M-parameter first Linear layer makes every float64 comparison take seconds and gigabytes while testing
    nothing more than a narrow one; ``test_full_width_vgg16_matches_zennit`` keeps a full-width VGG16.
    """
    layers = list(model.classifier)
    linears = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
    for i in linears:
        old = layers[i]
        layers[i] = nn.Linear(old.in_features if i == linears[0] else width,
                              old.out_features if i == linears[-1] else width)
    model.classifier = nn.Sequential(*layers)
    return model


def _googlenet(transform_input: bool):
    return torchvision.models.googlenet(num_classes=10, aux_logits=False, transform_input=transform_input,
                                        init_weights=True)


MODELS = {
    # name: (constructor, input size, zennit canonizers)
    "alexnet": (lambda: narrow_classifier(torchvision.models.alexnet(num_classes=10)), 64, ()),
    "vgg16_bn": (lambda: narrow_classifier(torchvision.models.vgg16_bn(num_classes=10)), 32, (VGGCanonizer(),)),
    "vgg16": (lambda: torchvision.models.vgg16(num_classes=10), 32, ()),  # full width
    "googlenet": (lambda: _googlenet(False), 32, (SequentialMergeBatchNorm(),)),
    "googlenet_transform_input": (lambda: _googlenet(True), 32, (SequentialMergeBatchNorm(),)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32, (ResNetCanonizer(),)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32, (ResNetCanonizer(),)),
}


class Case:
    """A float64 model, its zennit twin (a deep copy zennit may canonize), an input batch of 2 and targets."""

    def __init__(self, name: str):
        build, size, canonizers = MODELS[name]
        torch.manual_seed(0)
        self.name = name
        self.model = randomize(build().double().eval())
        # zennit's canonizers modify the model while active: they get a copy (without canonizers zennit only hooks)
        self.twin = copy.deepcopy(self.model) if canonizers or "transform" in name else self.model
        self.canonizers = canonizers
        self.x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        self.x = self.x.clamp(LOW, HIGH)
        self.target = torch.tensor([3, 7])
        self.twin_x = self.x
        self.twin_box = {"low": LOW, "high": HIGH}
        if name == "googlenet_transform_input":
            # Our documented semantics (lrp/canonizers.py): the input transform is a per-channel SCALE and SHIFT,
            # through which relevance passes unchanged. So explaining the model with transform_input=True on x must
            # equal zennit explaining the same network without the transform on the transformed input T(x), with
            # z^B's box [LOW, HIGH] of x carried to T(x) too (per channel).
            self.twin.transform_input = False
            self.twin_x = self.model._transform_input(self.x)
            ends = [self.model._transform_input(torch.full((1, 3, 1, 1), b, dtype=torch.float64)) for b in (LOW, HIGH)]
            self.twin_box = {"low": torch.minimum(*ends), "high": torch.maximum(*ends)}

    def ours(self, composite: str, **params) -> lrp.Explanation:
        return lrp.Explainer(self.model, composite, **params)(self.x, self.target)

    def zennit(self, composite: str, include_bias=True, **params) -> torch.Tensor:
        if composite == "epsilon_gamma_box" and self.name == "googlenet_transform_input":
            params = {**params, **self.twin_box}
        zc = zennit_composite(composite, self.canonizers, include_bias=include_bias, **params)
        return zennit_relevance(self.twin, self.twin_x, self.target, zc, seed_ones=composite == "deconvnet")
