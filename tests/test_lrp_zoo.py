"""The whole torchvision classification zoo (``torchvision.models.list_models(module=torchvision.models)``).

* Every model explains (random init, 10 classes, the smallest cheap input): the engine's forward reproduces the
  model's logits and the relevance is finite and not all zero. A refused model would raise ``UnsupportedLayerError``
  naming the operation without a rule (``REFUSED``, documented in docs/engine.md; empty since lrp/windows.py).
  Models over 60M parameters are ``slow`` (their random init alone takes seconds on a CPU).
* Conservation in float64 with ``include_bias=False`` and the naive z rule, on the positive twin of one model per
  family (``tests/zoo_models.py``: positive weights and inputs, so no denominator nears zero and the check tests the
  rules rather than the cancellation of random weights): relative residual < 1e-8 for every model made of conserving
  layers. LayerNorm conserves analytically but divides by centred values near zero (ConvNeXt: measured 4e-6).
  ViT does not conserve: the class token is a constant (relevance reaching it is absorbed, like a bias's), AttnLRP's
  softmax rule absorbs by design, and after the first LayerNorm values of both signs make the z rule's denominators
  cancel (measured per depth in docs/engine.md); attention's exact conservation under CP-LRP, on networks without a
  class token, is tested in tests/test_lrp_zoo_properties.py.
"""
from __future__ import annotations

import pytest
import torch
from zoo_models import REFUSED, ZOO, build, positive_twin

import lrp

SLOW = {
    "convnext_base", "convnext_large", "efficientnet_b7", "efficientnet_v2_l", "regnet_x_32gf", "regnet_y_128gf",
    "regnet_y_16gf", "regnet_y_32gf", "resnext101_32x8d", "resnext101_64x4d", "swin_b", "swin_v2_b", "vit_b_32",
    "vit_h_14", "vit_l_16",
    "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
    *(name for name in ZOO if name.startswith("vgg")),
}
CONSERVING = [
    "alexnet", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "mnasnet0_5",
    "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "squeezenet1_1",
]


def _param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


def test_the_zoo_is_the_list_the_docs_name():
    assert len(ZOO) == 80 and set(REFUSED) <= set(ZOO) and set(CONSERVING) <= set(ZOO)
    assert not REFUSED  # none refused since lrp/windows.py (swin_*, maxvit_t): docs/engine.md


@pytest.mark.parametrize("name", [_param(name) for name in ZOO])
def test_zoo_model_explains_or_is_refused_naming_the_operation(name):
    model, size = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    if name in REFUSED:
        with pytest.raises(lrp.UnsupportedLayerError, match=REFUSED[name]):
            lrp.Explainer(model, "epsilon_plus")
        return
    result = lrp.Explainer(model, "epsilon_plus")(x, None)
    with torch.no_grad():
        logits = model(x)
    scale = logits.abs().max().clamp(min=1e-6)
    assert ((result.logits - logits).abs().max() / scale) < 1e-4  # the engine computes the model's function
    assert result.relevance.shape == x.shape
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0


def _conservation(name, composite):
    model, size = build(name)
    model = positive_twin(model.double())
    size = size if name in ("alexnet", "googlenet", "inception_v3", "squeezenet1_1") else 32  # float64 is slow
    x = torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.1
    result = lrp.Explainer(model, composite)(x, 3)
    return (result.residual / result.output).abs().max().item()


@pytest.mark.parametrize("name", CONSERVING)
def test_zoo_conserves_in_float64_without_biases(name):
    assert _conservation(name, lrp.make_composite("z", include_bias=False)) < 1e-8


def test_layernorm_model_conserves_up_to_its_centred_denominators():
    # ConvNeXt: LayerNorm conserves analytically; its denominators are centred values, some near zero (measured 4e-6)
    assert _conservation("convnext_tiny", lrp.make_composite("z", include_bias=False)) < 1e-4


@pytest.mark.parametrize("name", [_param(name) for name in ZOO])
def test_zoo_explains_on_the_meta_device_reading_nothing_back(name):
    """A GPU host waits for the device at every value it reads back (a sign check, ``.item()``, a value-dependent
    shape), which drains the queue of kernels; on the meta device every such read raises. With host targets and the
    model input's sign given, epsilon_plus explains every model without one: the model input's check, once per
    call, is the only one the graph cannot answer."""
    model, size = build(name, meta=True)
    explainer = lrp.Explainer(model, "epsilon_plus")
    unknown = [s for s in explainer.network.steps
               if s.layer is not None and not s.inputs_nonnegative and not s.inputs_signed]
    assert len(unknown) <= 1, [s.name for s in unknown]  # only the first layer, on the model's input
    for step in unknown:
        step.inputs_signed = True
    x = torch.empty(2, 3, size, size, device="meta")
    result = explainer(x, [1, 3])
    assert result.relevance.shape == x.shape and result.relevance.device.type == "meta"
