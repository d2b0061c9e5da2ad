"""Hostile inputs to the engine's Python API, ``lrp.Explainer(model, composite, **params)(x, target)``.

Each test names what it guards: before its fix the case gave a silently wrong result (the old head explained, a map
not shaped like x, ``tf32="no"`` taken as true) or a traceback from deep inside the engine that named neither the
argument nor the step. The cases the engine already handled are in tests/test_lrp_api.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import lrp
from lrp.kinds import Kind


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(64, 10),
    ).eval()


@pytest.fixture
def model():
    model = small_cnn()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# -- the model changes after the explainer was built ---------------------------------------------------------------
@pytest.mark.parametrize("change", ["replace the head", "replace an activation", "append a module"])
def test_a_module_replaced_after_construction_is_refused(model, x, change):
    """Guards: the traced steps kept the old modules, so after ``model[6] = nn.Linear(...)`` the explainer silently
    explained (and returned the logits of) the old head; the model's own forward used the new one."""
    explainer = lrp.Explainer(model, "epsilon")
    explainer(x, 1)
    if change == "replace the head":
        model[6] = nn.Linear(64, 10)
    elif change == "replace an activation":
        model[2] = nn.Tanh()
    else:
        model.append(nn.Softmax(1))
    with pytest.raises(ValueError, match=r"modules changed since this explainer traced it \('[0-9]' .*"
                                         r"build a new lrp\.Explainer"):
        explainer(x, 1)
    if change == "replace the head":  # a new explainer follows the model
        result = lrp.Explainer(model, "epsilon")(x, 1)
        torch.testing.assert_close(result.logits, model(x))


def test_a_folded_batchnorm_eps_set_after_construction_is_picked_up(model, x):
    """Guards: the folded weights were cached by the tensors' versions only, so ``bn.eps = 0`` (the zennit comparison
    recipe) after the explainer was built left them stale: logits and map of the old BatchNorm."""
    explainer = lrp.Explainer(model, "epsilon")
    explainer(x, 1)
    model[1].eps = 0.5
    result = explainer(x, 1)
    with torch.no_grad():
        torch.testing.assert_close(result.logits, model(x))
    assert torch.equal(result.relevance, lrp.Explainer(model, "epsilon")(x, 1).relevance)


# -- x -------------------------------------------------------------------------------------------------------------
def test_an_unbatched_image_is_refused_naming_the_first_conv(x):
    """Guards: a (C, H, W) image went through F.conv2d as one unbatched image and failed at the classifier with
    ``mat1 and mat2 shapes cannot be multiplied (512x1 and 512x10)``."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(ValueError, match=re.escape("layer 'conv1' (Conv2d) got a 3-D input of shape (3, 8, 8)")
                       + ".*x\\[None\\] explains one image"):
        lrp.Explainer(model, "epsilon_plus")(x[0], 1)


def test_a_forward_error_names_the_step_and_the_input_shape(model):
    """Guards: an image of a size the model does not take failed with PyTorch's message alone, raised in
    lrp/layers.py; the error now carries a note naming the step (the type, RuntimeError, is the model's own)."""
    with pytest.raises(RuntimeError, match="mat1 and mat2") as error:
        lrp.Explainer(model, "epsilon")(torch.randn(2, 3, 10, 10), 1)
    assert "(lrp: in step '6' (linear) of the traced model, explaining x of shape (2, 3, 10, 10))" in \
        error.value.__notes__


def test_nan_or_inf_in_x_gives_nan_in_that_row_only(model, x):
    """A contract, not a fix: x is not checked (on a GPU the check would be one more host synchronisation per call,
    see test_the_zoo_checks_only_the_model_input_sign_per_batch); the row's logit and map are NaN, the others are
    explained as without it."""
    for composite, params in [("epsilon_plus", {}), ("epsilon_gamma_box", {"low": -3.0, "high": 3.0})]:
        explainer = lrp.Explainer(model, composite, **params)
        clean = explainer(x, 1)
        for bad in (float("nan"), float("inf")):
            hostile = x.clone()
            hostile[0, 0, 0, 0] = bad
            result = explainer(hostile, 1)
            assert result.output[0].isnan() and result.relevance[0].isnan().any()
            torch.testing.assert_close(result.relevance[1], clean.relevance[1])


class MixesRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x.reshape(1, -1))  # (2, 4) -> one row


def test_a_model_that_mixes_the_rows_of_its_batch_is_refused():
    """Guards: logits of shape (1, 3) for a batch of 2 were explained silently: one output for two rows of x."""
    with pytest.raises(ValueError, match=re.escape("returns logits of shape (1, 3) for a batch of 2")):
        lrp.Explainer(MixesRows(), "epsilon")(torch.randn(2, 4), 0)


# -- target --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, error, message", [
    ("3", TypeError, r"target must be None, an int, a sequence of ints or an integer tensor .* got str '3'"),
    (["cat", "dog"], TypeError, r"target must be None, an int, .* got list \['cat', 'dog'\]"),
    (object(), TypeError, r"target must be None, an int, .* got object"),
    ((i for i in range(2)), TypeError, r"target must be None, an int, .* got generator"),
    (np.array([1, 2], dtype=object), TypeError, r"target must be None, an int, .* got ndarray"),
    (torch.nn.functional.one_hot(torch.tensor([1, 2]), 10), ValueError,
     r"target has shape \(2, 10\): give one class index per row, shape \(batch,\) .*\.argmax\(1\)"),
    ([], ValueError, "target has 0 entries for a batch of 2"),
], ids=["str", "class names", "object", "generator", "object array", "one-hot", "empty list"])
def test_a_target_that_is_no_class_index_is_refused_naming_target(model, x, target, error, message):
    """Guards: ``new(): invalid data type 'str'``, ``Could not infer dtype of object`` (a RuntimeError), ``target has
    20 entries for a batch of 2`` for a one-hot matrix, ``target must hold integer class indices`` for ``[]``."""
    with pytest.raises(error, match=message):
        lrp.Explainer(model, "epsilon")(x, target)


def test_class_indices_numpy_or_torch_would_not_read_are_read(model, x):
    """Guards: a reversed numpy array (``labels[::-1]``: negative strides) failed in torch.as_tensor, and ``[]`` for
    an empty batch was taken as a float target."""
    explainer = lrp.Explainer(model, "epsilon")
    labels = np.array([1, 2])[::-1]
    assert torch.equal(explainer(x, labels).relevance, explainer(x, [2, 1]).relevance)
    assert explainer(x[:0], []).relevance.shape == (0, 3, 8, 8)


# -- the explainer's own arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("given", [lambda x: x, None, nn.Linear], ids=["function", "None", "class"])
def test_a_model_that_is_not_a_module_instance_is_refused(given):
    """Guards: ``AttributeError: 'function' object has no attribute 'named_modules'`` from lrp/graph.py."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lrp.Explainer(given, "epsilon")


@pytest.mark.parametrize("flag", ["tf32", "recompute"])
def test_tf32_and_recompute_must_be_booleans(model, flag):
    """Guards: ``tf32="no"`` was truthy, so TF32 (10 mantissa bits on CUDA) was silently allowed."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        lrp.Explainer(model, "epsilon", **{flag: "no"})


@pytest.mark.parametrize("params, message", [
    ({"epsilon": None}, "Epsilon: epsilon must be a number, got None"),
    ({"epsilon": "abc"}, "Epsilon: epsilon must be a number, got 'abc'"),
    ({"epsilon": [0.1]}, r"Epsilon: epsilon must be a number, got \[0.1\]"),
    ({"epsilon": True}, "Epsilon: epsilon must be a number, got True"),
    ({"stabilizer": "x"}, "stabilizer must be a number, got 'x'"),
], ids=["None", "not a number's text", "a list", "a boolean", "stabilizer"])
def test_a_rule_parameter_that_is_no_number_is_refused_naming_it(model, params, message):
    """Guards: ``float() argument must be a string or a real number, not 'NoneType'`` (no parameter named), and
    ``epsilon=True`` silently as 1.0."""
    with pytest.raises(TypeError, match=message):
        lrp.Explainer(model, "epsilon_plus", **params)


def test_a_numbers_text_is_a_number(model, x):
    """A contract, kept: YAML reads ``epsilon: 1e-6`` as the string '1e-6', which the pipeline passes on."""
    text = lrp.Explainer(model, "epsilon", epsilon="1e-6")(x, 1).relevance
    assert torch.equal(text, lrp.Explainer(model, "epsilon", epsilon=1e-6)(x, 1).relevance)
    assert lrp.rules.AlphaBeta("2", "1") == lrp.rules.AlphaBeta(2.0, 1.0)
    with pytest.raises(TypeError, match="alpha must be a number, got 'two'"):
        lrp.rules.AlphaBeta("two", 1.0)


@pytest.mark.parametrize("params, error, message", [
    ({"low": "-3", "high": 3.0}, TypeError, "ZBox: low and high must be numbers or tensors .* got low '-3'"),
    ({"low": torch.zeros(5), "high": 3.0}, ValueError,
     r"ZBox: a bound \(low or high\) of shape \(5,\) does not fit the first layer's input of shape \(2, 3, 8, 8\): "
     "give a float, a per-channel tensor of 3 values, or a tensor broadcastable"),
    ({"low": torch.full((3, 4, 4), -3.0), "high": 3.0}, ValueError, r"of shape \(3, 4, 4\) does not fit"),
], ids=["text", "wrong length", "per-pixel bound of another image size"])
def test_a_zbox_bound_that_does_not_fit_is_refused_naming_it(model, x, params, error, message):
    """Guards: ``new(): invalid data type 'str'`` and ``The expanded size of the tensor (8) must match the existing
    size (5)`` from lrp/rules.py (the second on the first batch, or once the image size changed)."""
    with pytest.raises(error, match=message):
        lrp.Explainer(model, "epsilon_gamma_box", **params)(x, 1)


# -- composites: a rule on a step it cannot compute ----------------------------------------------------------------
@pytest.mark.parametrize("by_name, message", [
    ({"2": lrp.rules.Flat()}, r"gives step '2' \(activation\) the rule Flat\(.*\), which applies to linear steps"),
    ({"3": lrp.rules.Epsilon()}, r"gives step '3' \(maxpool\) the rule Epsilon\("),
    ({"4": lrp.rules.ZPlus()}, r"gives step '4' \(structural\) the rule ZPlus\("),
    ({"1": lrp.rules.Flat()}, r"gives step '1' \(identity: a BatchNorm folded into the layer before it, give that "
                              r"layer the rule\)"),
    ({"2": lrp.rules.Affine()}, r"gives step '2' \(activation\) the rule Affine\(.*\), which applies to affine"),
    ({"2": lrp.rules.LayerNorm()}, r"which applies to layernorm steps only"),
    ({"2": lrp.rules.Attention()}, r"which applies to attention steps only"),
], ids=["Flat on a ReLU", "Epsilon on a max pool", "z+ on a flatten", "Flat on a folded BatchNorm",
        "Affine on a ReLU", "LayerNorm on a ReLU", "Attention on a ReLU"])
def test_a_rule_given_to_a_step_it_cannot_compute_is_refused_at_construction(model, by_name, message):
    """Guards: ``AttributeError: 'NoneType' object has no attribute 'variant'`` (or ``KeyError: 'normalized_shape'``,
    ``'ReLU' object has no attribute 'running_var'``) deep in lrp/rules.py at the first call, no step named."""
    with pytest.raises(ValueError, match=message):
        lrp.Explainer(model, "epsilon", by_name=by_name)


def test_a_hand_built_composite_with_a_wrong_rule_is_refused_at_construction(model):
    """Guards: a Conv rule for a kind (``by_kind``) and a rule that is no Rule (``conv="epsilon"``) failed at the
    first call (``'NoneType' object has no attribute 'params'``, ``'str' object is not callable``)."""
    eps = lrp.rules.Epsilon()
    with pytest.raises(ValueError, match=r"composite 'mine' gives step '2' \(activation\) the rule Epsilon"):
        lrp.Explainer(model, lrp.Composite("mine", eps, eps, by_kind={Kind.ACTIVATION: eps}))
    with pytest.raises(TypeError, match=r"composite 'mine' gives step '0' \(linear\) 'epsilon', which is not an "
                                        r"lrp\.rules\.Rule"):
        lrp.Explainer(model, lrp.Composite("mine", "epsilon", eps))


@pytest.mark.parametrize("rule, name, shapes", [
    (lrp.rules.Pass(), "0", r"\(2, 4, 8, 8\) for an input of shape \(2, 3, 8, 8\)"),
    (lrp.rules.DeconvReLU(), "3", r"\(2, 4, 4, 4\) for an input of shape \(2, 4, 8, 8\)"),
], ids=["Pass on a Conv", "DeconvReLU on a max pool"])
def test_a_rule_returning_relevance_not_shaped_like_its_input_is_refused(model, x, rule, name, shapes):
    """Guards: Pass on the first Conv returned the Conv's output relevance as the map, of shape (2, 4, 8, 8) for x of
    shape (2, 3, 8, 8), silently; DeconvReLU on a max pool failed later in another step with a broadcast error."""
    with pytest.raises(ValueError, match=f"rule {re.escape(repr(rule))} at step '{name}' .* returned relevance of "
                                         f"shape {shapes}"):
        lrp.Explainer(model, "epsilon", by_name={name: rule})(x, 1)


@pytest.mark.parametrize("by_name", [[("0", lrp.rules.Flat())], {0: lrp.rules.Flat()}], ids=["a list", "int keys"])
def test_by_name_must_be_a_dict_of_step_names(model, by_name):
    """Guards: ``'list' object has no attribute 'items'`` and ``sequence item 0: expected str instance``."""
    with pytest.raises(TypeError, match=r"by_name must be a dict of step names \(module paths, strings\)"):
        lrp.Explainer(model, "epsilon", by_name=by_name)
