"""Hostile inputs to the engine's Python API, ``lrp.Explainer(model, composite, **params)(x, target)``.

Each test names what it guards: before its fix the case gave a silently wrong result (the old head explained, a map
not shaped like x, ``tf32="no"`` taken as true) or a traceback from deep inside the engine that named neither the
argument nor the step. The cases the engine already handled are in tests/test_lrp_api.py.
"""
from __future__ import annotations

import re
from collections import OrderedDict

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


# ---- what the trace alone does not show (helper-38's review, stop 38) -------------------------------------------

class _Attend(nn.Module):
    """Self-attention over 5 tokens, its call spelled by ``how``."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.embed, self.fc = how, nn.Linear(4, 8), nn.Linear(40, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.register_buffer("mask", torch.triu(torch.full((5, 5), float("-inf")), 1))
        self.register_buffer("pad", torch.tensor([[False, False, False, True, True]] * 2))

    def forward(self, x):
        h = self.embed(x)
        calls = {"positional": lambda: self.attn(h, h, h), "keywords": lambda: self.attn(query=h, key=h, value=h),
                 "mixed": lambda: self.attn(h, key=h, value=h),
                 "mask by position": lambda: self.attn(h, h, h, None, True, self.mask),
                 "padding mask by position": lambda: self.attn(h, h, h, self.pad)}
        a, _ = calls[self.how]()
        return self.fc(a.flatten(1))


@pytest.mark.parametrize("how", ["mask by position", "padding mask by position"])
def test_an_attention_mask_given_by_position_is_refused(how):
    """Before: only keyword masks were seen; a positional one was explained as unmasked attention (logits 0.1 off)."""
    with pytest.raises(lrp.UnsupportedLayerError,
                       match="attention 'attn': no LRP rule for (attn_mask|key_padding_mask)"):
        lrp.Explainer(_Attend(how).eval(), "epsilon")


@pytest.mark.parametrize("how", ["keywords", "mixed"])
def test_self_attention_called_with_keywords_is_explained_as_self_attention(how):
    """Before: ``attn(query=h, key=h, value=h)`` was refused as cross-attention."""
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    reference = lrp.Explainer(_Attend("positional").eval(), "epsilon")(x, 0).relevance
    torch.testing.assert_close(lrp.Explainer(_Attend(how).eval(), "epsilon")(x, 0).relevance, reference)


class _InPlace(nn.Module):
    """A conv whose output is changed in place by ``how`` and read again under its old name."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how, self.conv, self.relu = how, nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "module, read again":
            z = self.relu(y)  # y is relu(y) now too
            return self.fc((y + z).flatten(1))
        if self.how == "method statement":
            y.relu_()
        elif self.how == "module statement":
            self.relu(y)
        elif self.how == "on a view":
            v = y[:, :2]
            v.relu_()  # changes y's first two channels
        elif self.how == "augmented assignment":
            b = y
            y += 1.0  # traced as y = y + 1.0: b keeps the old value in the trace, not in eager PyTorch
            return self.fc(b.flatten(1))
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("how", ["module, read again", "method statement", "module statement"])
def test_a_tensor_changed_in_place_and_read_again_is_explained_as_changed(how):
    """Before: later reads of ``y`` read its value before ``relu_`` in the trace: another function (logits 0.2-0.4
    off), with conservation intact. Now the explained logits are the model's own, and the map is that of the same
    network written out of place."""
    model = _InPlace(how).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x.clone())
    result = lrp.Explainer(model, "z", include_bias=False)(x, 0)
    torch.testing.assert_close(result.logits, expected)
    assert float((result.relevance.sum((1, 2, 3)) - result.output.detach()).abs().max()) < 1e-10


def test_an_in_place_change_through_a_view_is_refused():
    with pytest.raises(lrp.UnsupportedLayerError, match=r"in-place call 'relu_' .* shares its storage with 'conv'"):
        lrp.Explainer(_InPlace("on a view").eval(), "epsilon")


def test_a_model_the_trace_does_not_compute_is_refused_at_the_first_call():
    """``b = y; y += 1; use b``: fx records ``y + 1`` as a new value, so ``b`` is the old one in the trace and the new
    one in eager PyTorch. One eager forward of the first row finds the difference."""
    explainer = lrp.Explainer(_InPlace("augmented assignment").eval(), "epsilon")
    with pytest.raises(ValueError, match="the traced steps compute other logits than the model itself"):
        explainer(torch.randn(2, 3, 8, 8), 0)


def test_dropout_that_drops_in_eval_mode_is_refused():
    """``F.dropout(x, 0.5)`` drops whatever the model's mode (training defaults to True): before, explained as the
    identity; ``stochastic_depth(training=True)`` was already refused."""
    class Drop(nn.Module):
        def __init__(self, training_argument):
            super().__init__()
            self.training_argument, self.conv, self.fc = training_argument, nn.Conv2d(3, 4, 3), nn.Linear(144, 3)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = F.dropout(y, 0.5) if self.training_argument is None else F.dropout(y, 0.5, self.training)
            return self.fc(y.flatten(1))

    import torch.nn.functional as F
    with pytest.raises(lrp.UnsupportedLayerError, match=r"drops at random even in eval mode .* training=self.training"):
        lrp.Explainer(Drop(None).eval(), "epsilon")
    lrp.Explainer(Drop("given").train(), "epsilon")(torch.randn(2, 3, 8, 8), 0)  # traced in eval mode: the identity


def test_a_concatenation_with_a_negative_constant_is_not_taken_as_non_negative():
    """``cat([relu(h), negative parameter])``: before, the next Conv's input counted as non-negative (only the relevance
    carrying part was looked at), so z+ dropped its x^- terms: 80x the map's norm off. Now it agrees with zennit."""
    from helpers.zennit_reference import zennit_composite, zennit_relevance

    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
            self.fc, self.extra = nn.Linear(256, 3), nn.Parameter(-torch.rand(1, 2, 8, 8) - 0.5)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            return self.fc(torch.relu(self.c2(torch.cat([h, self.extra.expand(h.shape[0], -1, -1, -1)], 1))).flatten(1))

    model = Joined().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = lrp.Explainer(model, "epsilon_plus")(x, 0)
    assert not next(s for s in lrp.Explainer(model).network.steps if s.name == "c2").inputs_nonnegative
    reference = zennit_relevance(model, x, ours.target, zennit_composite("epsilon_plus"))
    assert float((ours.relevance - reference).norm() / reference.norm()) < 1e-10


def test_a_batchnorm_is_folded_when_its_conv_output_shape_is_read_too():
    """``n = y.shape[0]`` beside ``bn(y)``: before, the shape read counted as a second consumer, the BatchNorm was not
    folded, and the map changed (87% relative L2) from the same model without the read."""
    class ShapeRead(nn.Module):
        def __init__(self, read):
            super().__init__()
            self.read, self.c, self.bn, self.fc = read, nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(144, 3)

        def forward(self, x):
            y = self.c(x)
            n = y.shape[0] if self.read else x.shape[0]
            return self.fc(torch.relu(self.bn(y)).reshape(n, -1))

    torch.manual_seed(0)
    read, plain = ShapeRead(True).double().eval(), ShapeRead(False).double().eval()
    with torch.no_grad():
        read.bn.running_mean.uniform_(-1, 1), read.bn.running_var.uniform_(0.5, 2), read.bn.bias.uniform_(-1, 1)
    plain.load_state_dict(read.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    explainer = lrp.Explainer(read, "epsilon_plus")
    assert next(s for s in explainer.network.steps if s.name == "bn").kind == Kind.IDENTITY
    torch.testing.assert_close(explainer(x, 0).relevance, lrp.Explainer(plain, "epsilon_plus")(x, 0).relevance)


def test_a_zbox_given_by_name_carries_its_box_through_the_input_transform():
    """Before: only the composite's first-layer rule was prepared; the same ZBox given by name to that layer used the
    pixel box as the layer's box (28% relative L2 off behind GoogLeNet-like ``x * a + b``)."""
    class Transformed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.register_buffer("a", torch.tensor([0.5, 2.0, 1.5]).reshape(1, 3, 1, 1))
            self.register_buffer("b", torch.tensor([0.1, -0.3, 0.2]).reshape(1, 3, 1, 1))
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(144, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x * self.a + self.b)).flatten(1))

    model = Transformed().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first = lrp.Explainer(model, "epsilon_gamma_box", low=-1.0, high=1.0)(x, 0).relevance
    named = lrp.Explainer(model, "epsilon", by_name={"conv": lrp.rules.ZBox(-1.0, 1.0)})(x, 0).relevance
    torch.testing.assert_close(named, first)


@pytest.mark.parametrize("op", ["scale", "shift"])
def test_a_constant_that_broadcasts_its_operand_larger_is_explained(op):
    """``h * w`` with h (B, 1, H, W) and w (1, 4, 1, 1): before, refused at the first call with a message blaming the
    engine's own default rule. Each of h's copies passes its relevance back, summed: conserving."""
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.fc = nn.Conv2d(3, 1, 3, padding=1), nn.Linear(256, 3)
            self.w = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            return self.fc((h * self.w if op == "scale" else h + self.w).flatten(1))

    model = Broadcast().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = lrp.Explainer(model, "z", include_bias=False)(x, 0)
    if op == "scale":  # a shift adds relevance of its own (a bias), not passed back
        torch.testing.assert_close(result.relevance.sum((1, 2, 3)), result.output, rtol=1e-10, atol=1e-12)
    xx = x.clone().requires_grad_(True)
    model(xx)[:, 0].sum().backward()
    torch.testing.assert_close(lrp.Explainer(model, "gradient")(x, 0).relevance, xx.grad)


def test_an_uninitialised_lazy_module_is_refused_with_what_to_do():
    """Before: ``has a forward pre-hook ... remove the hook`` (the lazy module's own initialisation hook)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(lrp.UnsupportedLayerError, match=r"module '2' \(LazyLinear\) has not been initialised yet: "
                                                         r"run the model once"):
        lrp.Explainer(model, "epsilon")
    model(torch.randn(1, 3, 8, 8))
    lrp.Explainer(model, "epsilon")(torch.randn(2, 3, 8, 8), 0)


def test_an_asymmetric_same_padding_is_refused_naming_the_layer():
    with pytest.raises(lrp.UnsupportedLayerError, match=r"^conv: padding='same' with an even kernel"):
        lrp.Explainer(nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 4, padding="same"), flat=nn.Flatten(),
                                                fc=nn.Linear(256, 3))), "epsilon")
