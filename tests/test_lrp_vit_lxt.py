"""lxt agreement on torchvision's vit_b_16 (AttnLRP and CP-LRP), and captum's gradient baselines on the new families.

lxt computes LRP as Gradient x Input through a forward pass with modified gradients
(``tests/helpers/lxt_reference.py``).
That equals LRP-0 with every bias in the denominators (each rule ``R_in = in * J^T (R_out / out)``), so ours is run as
the ``z`` composite with exact division (``stabilizer=0``), with one rule changed: the position embedding, a constant
added to the tokens (a ``shift`` step), gets the z rule with the constant as a bias (``Norm``), where our composites
pass relevance through it unchanged (the embedding is not the input: its share is left out by our default, as a bias's,
but Gradient x Input keeps it in the denominator). Float64, random init, 32x32 images (4 patches and the class token).

lxt is not a dev dependency: lxt 2.1 pulls in accelerate, bitsandbytes, open_clip_torch and timm (``pip install
--dry-run lxt==2.1``), and its ``lxt.efficient`` package does not import with transformers 5; the test skips without it.
The same rules rebuilt without lxt (``tests/helpers/lxt_recipe.py``) are checked always, and against lxt where it is.
captum (a dev dependency) checks the gradient baselines here: captum's LRP has no rules for SiLU, Hardswish,
LayerNorm or attention and hooks modules, so residual sums would get a gradient (its LRP is compared on the models it
explains in ``tests/test_lrp_captum.py``). Measured: lxt agreement 4.8e-8
(AttnLRP) and 4.6e-8 (CP-LRP), the difference being lxt's 1e-10 in its identity rule on GELU.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
import torchvision
from test_lrp_zennit import relative_error

import lrp
from helpers.zennit_reference import autograd_gradient
from zoo_models import build
from lrp.kinds import Kind
from lrp.rules import Attention, Norm


TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=32).double().eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)  # the zero-initialised head would explain a constant 0
        model.class_token.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([3, 7])


def _ours(model, x, target, cp: bool) -> torch.Tensor:
    z = lrp.make_composite("z", stabilizer=0.0)
    by_kind = {**z.by_kind, Kind.SHIFT: Norm(0.0), Kind.ATTENTION: Attention(0.0, cp=cp)}
    composite = dataclasses.replace(z, by_kind=by_kind)
    return lrp.Explainer(model, composite)(x, target).relevance


@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cp_lrp"])
def test_vit_b_16_matches_lxt(vit, cp):
    pytest.importorskip("lxt")
    from helpers.lxt_reference import lxt_relevance

    model, x, target = vit
    reference = lxt_relevance(model, x, target, cp=cp)
    assert relative_error(_ours(model, x, target, cp), reference) < TOLERANCE


@pytest.mark.parametrize("cp", [False, True], ids=["attnlrp", "cp_lrp"])
def test_vit_b_16_matches_lxts_recipe_without_lxt(vit, cp):
    # the same rules rebuilt in tests/helpers/lxt_recipe.py: runs where lxt is not installed
    from helpers.lxt_recipe import recipe_relevance

    model, x, target = vit
    reference = recipe_relevance(model, x, target, cp=cp)
    assert relative_error(_ours(model, x, target, cp), reference) < TOLERANCE
    if importlib.util.find_spec("lxt") is not None:
        from helpers.lxt_reference import lxt_relevance
        assert relative_error(reference, lxt_relevance(model, x, target, cp=cp)) < 1e-12


def test_attnlrp_and_cp_lrp_differ_on_vit(vit):
    # the two attention rules give different maps, so each agreement above tests its own rule
    model, x, target = vit
    assert relative_error(_ours(model, x, target, False), _ours(model, x, target, True)) > 1e-2


@pytest.mark.parametrize("name", ["vit_b_16", "efficientnet_b0", "convnext_tiny"])
def test_gradient_baselines_match_captum(name):
    attr = pytest.importorskip("captum.attr")
    model, size = build(name)
    model = model.double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    saliency = attr.Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=False)
    times_input = attr.InputXGradient(model).attribute(x.clone().requires_grad_(True), target=target)
    ours = lrp.Explainer(model, "gradient")(x, target).relevance
    assert relative_error(ours, saliency.detach()) < 1e-10
    assert relative_error(lrp.Explainer(model, "gradient_x_input")(x, target).relevance, times_input.detach()) < 1e-10
    assert relative_error(saliency.detach(), autograd_gradient(model, x, target)) < 1e-12
