"""The public API: call shape, clear errors, no effect on the model, cache invalidation, dtypes, the heatmap."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

import lrp


def small_cnn(inplace: bool = False, dropout: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.5) if dropout else nn.Identity(), nn.Linear(32, 5),
    )


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture
def model():
    return _randomize_batchnorm(small_cnn()).eval()


@pytest.fixture
def x():
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


ALL_COMPOSITES = {name: ({"low": -3.0, "high": 3.0} if name == "epsilon_gamma_box" else {}) for name in lrp.COMPOSITES}


def test_composite_names():
    expected = {"z", "epsilon", "alpha_beta", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box",
                "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat", "gradient", "gradient_x_input", "deconvnet"}
    assert expected <= set(lrp.COMPOSITES)
    assert set(lrp.BASELINES) == {"gradient", "gradient_x_input", "deconvnet"}


# -- call shape -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("composite", sorted(ALL_COMPOSITES))
def test_every_composite_has_the_same_call_shape(model, x, composite):
    result = lrp.Explainer(model, composite, **ALL_COMPOSITES[composite])(x, 1)
    assert isinstance(result, lrp.Explanation)
    assert result.relevance.shape == x.shape and result.relevance.dtype == torch.float32
    assert result.output.shape == (3,) and result.target.tolist() == [1, 1, 1]
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0


def test_int_and_tensor_targets(model, x):
    explainer = lrp.Explainer(model, "epsilon_plus")
    per_row = explainer(x, torch.tensor([4, 0, 2]))
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(per_row.output, logits[torch.arange(3), torch.tensor([4, 0, 2])])
    torch.testing.assert_close(per_row.logits, logits)
    # each row is explained for its own target: row i equals the single-target explanation of row i
    for row, target in enumerate([4, 0, 2]):
        alone = explainer(x[row:row + 1], target)
        torch.testing.assert_close(per_row.relevance[row:row + 1], alone.relevance, rtol=1e-5, atol=1e-7)
    same = explainer(x, 2)
    assert torch.equal(same.relevance, explainer(x, torch.tensor(2)).relevance)
    # host targets (a pipeline's labels) are checked on the host and copied to the model's device
    for host in ([4, 0, 2], np.array([4, 0, 2]), np.array([4, 0, 2], np.int32)):
        assert torch.equal(explainer(x, host).relevance, per_row.relevance)
    assert torch.equal(same.relevance, explainer(x, torch.tensor([2, 2, 2])).relevance)


# -- clear errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, error, message", [
    (5, ValueError, r"outside the model's 5 classes \(0\.\.4\)"),
    (-1, ValueError, "outside the model's 5 classes"),
    (torch.tensor([0, 1, 7]), ValueError, "outside"),
    (torch.tensor([0, 1]), ValueError, "2 entries for a batch of 3"),
    (np.array([0, 1, 5]), ValueError, r"\[0, 1, 5\] outside the model's 5 classes"),
    ([0, -2, 1], ValueError, "outside"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer class indices"),
    (1.5, TypeError, "integer class indices"),
    (True, TypeError, "integer class indices"),
])
def test_bad_targets(model, x, target, error, message):
    with pytest.raises(error, match=message):
        lrp.Explainer(model, "epsilon")(x, target)


def test_bad_inputs(model, x):
    explainer = lrp.Explainer(model, "epsilon")
    with pytest.raises(TypeError, match=r"float64.*float32.*model\.double\(\)"):
        explainer(x.double(), 0)
    with pytest.raises(TypeError, match="floating point"):
        explainer((x * 10).long(), 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        explainer(x.numpy(), 0)
    with pytest.raises(TypeError, match="same dtype and device"):
        explainer(x.to("meta"), 0)


def test_bad_composites_and_parameters(model):
    with pytest.raises(ValueError, match=r"unknown composite 'lrp_magic'.*epsilon_gamma_box"):
        lrp.Explainer(model, "lrp_magic")
    with pytest.raises(TypeError, match=r"'epsilon' does not use parameter\(s\) gamma.*accepts: epsilon"):
        lrp.Explainer(model, "epsilon", gamma=0.25)
    with pytest.raises(TypeError, match="does not use parameter"):
        lrp.Explainer(model, "gradient", epsilon=0.1)
    with pytest.raises(ValueError, match="needs low= and high="):
        lrp.Explainer(model, "epsilon_gamma_box")
    with pytest.raises(ValueError, match="needs low= and high="):
        lrp.Explainer(model, "epsilon_gamma_box", low=-1.0)
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        lrp.Explainer(model, "alpha_beta", alpha=3.0, beta=1.0)


# -- unsupported layers: a clear error naming the module, never a silently wrong map --------------------------------
class DenseNetStyle(nn.Module):
    """BN -> ReLU -> Conv (pre-activation): the BatchNorm follows no Conv it could be folded into."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.norm_first = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.conv(torch.relu(self.norm_first(x)))], 1)
        return self.head(x[:, 4:].flatten(1))


class SharedConvOutput(nn.Module):
    """The Conv's output is read by its BatchNorm and by a second consumer: folding would change the other one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.bn(y) + y).flatten(1))


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x.flatten(2).transpose(1, 2))
        return self.head(out[:, -1])


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.head((y * torch.sigmoid(y)).flatten(1))


class TwoTensorArithmetic(nn.Module):
    """``op(y)`` after a Linear + ReLU: products, differences and reciprocals of tensors are not linear maps."""

    def __init__(self, op):
        super().__init__()
        self.op, self.hidden, self.head = op, nn.Linear(192, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.op(torch.relu(self.hidden(x.flatten(1)))))


class LinearOverTokens(nn.Module):
    """Linear over the last axis of (B, T, F) then BatchNorm1d: the BN normalizes T, not the Linear's features."""

    def __init__(self, tokens: int = 24, features: int = 8):
        super().__init__()
        self.tokens, self.features = tokens, features
        self.proj, self.bn = nn.Linear(features, features), nn.BatchNorm1d(tokens)
        self.head = nn.Linear(tokens * features, 3)

    def forward(self, x):
        tokens = x.flatten(1)[:, :self.tokens * self.features].reshape(-1, self.tokens, self.features)
        return self.head(torch.relu(self.bn(self.proj(tokens))).flatten(1))


def _conv_then(layer):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer, nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


@pytest.mark.parametrize("model, names", [
    (nn.Sequential(nn.Flatten(), nn.Linear(192, 10), nn.Softmax(dim=1)), [r"'2'", "Softmax"]),
    (LSTMClassifier(), [r"'rnn'", "LSTM"]),
    (TwoTensorArithmetic(lambda y: y * y), ["mul", "sums of tensors"]),
    (TwoTensorArithmetic(lambda y: y - y), ["sub"]),
    (TwoTensorArithmetic(lambda y: 1.0 / (y + 1.0)), ["truediv"]),
    (TwoTensorArithmetic(lambda y: y.data), ["attribute 'data'"]),
    (TwoTensorArithmetic(lambda y: y.mT.mT), ["attribute 'mT'"]),
    (_conv_then(nn.MaxPool2d(1, return_indices=True)), [r"'1'", "return_indices"]),
    (LinearOverTokens(), [r"proj", "normalizes 24 features, the layer has 8"]),
    (LinearOverTokens(tokens=8, features=8), [r"proj", "3-D input followed by BatchNorm"]),
], ids=["softmax", "lstm", "square", "difference", "reciprocal", "data", "mT", "maxpool_indices",
        "linear_3d_batchnorm", "linear_3d_batchnorm_square"])
def test_unsupported_layer_is_refused_by_name(model, names, x):
    # Sigmoid, GELU, LeakyReLU, LayerNorm, standalone BatchNorm and sigmoid gates have rules since issue 13:
    # tests/test_lrp_zoo.py explains the torchvision models that use them

    with pytest.raises(lrp.UnsupportedLayerError) as error:
        lrp.Explainer(model.eval(), "epsilon_plus")(torch.randn(2, 3, 8, 8), 0)  # some are only seen running
    for name in names:
        assert re.search(name, str(error.value)), (name, str(error.value))


def test_scaling_and_summing_one_tensor_give_the_map_of_the_folded_network():
    torch.manual_seed(0)
    model = TwoTensorArithmetic(lambda y: (y / 2 + y) * 3 + y).double().eval()  # = 5.5 y
    folded = copy.deepcopy(model)
    folded.op = lambda y: y
    with torch.no_grad():
        folded.head.weight.mul_(5.5)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ours, reference = (lrp.Explainer(m, "z", include_bias=False)(x, 1) for m in (model, folded))
    torch.testing.assert_close(ours.output, model(x)[:, 1])
    torch.testing.assert_close(ours.relevance, reference.relevance)


def test_unfoldable_batchnorm_is_named_by_its_module_path():
    # a standalone BatchNorm is an affine step since issue 13; without running statistics it has no rule
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.BatchNorm2d(4, track_running_stats=False))
    model.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    with pytest.raises(lrp.UnsupportedLayerError, match=r"'features\.3'"):
        lrp.Explainer(model.eval(), "epsilon")


def test_data_dependent_control_flow_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x) if x.sum() > 0 else -self.head(x)

    with pytest.raises(lrp.UnsupportedLayerError, match="Branchy.*torch.fx"):
        lrp.Explainer(Branchy(), "epsilon")


def test_a_bare_linear_layer_is_a_model():
    torch.manual_seed(0)
    probe = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    result = lrp.Explainer(probe, "z", include_bias=False)(x, 1)
    contributions = probe.weight[1].detach() * x
    z = contributions.sum(1, keepdim=True)
    # biases out of the denominator: f(x) = z + b is shared in proportion to each input's share of z
    torch.testing.assert_close(result.relevance, contributions * (z + probe.bias[1].detach()) / z)
    torch.testing.assert_close(result.relevance.sum(1), result.output)


# -- the model is left alone ----------------------------------------------------------------------------------------
def test_model_parameters_flags_hooks_and_outputs_are_unchanged(x):
    model = _randomize_batchnorm(small_cnn(inplace=True))
    model.train()  # train mode: Dropout active, BatchNorm would update its statistics in a forward pass
    model[0].weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    training = {name: m.training for name, m in model.named_modules()}
    calls = []
    # backward hooks cannot change the explained function and are allowed (forward hooks are refused, see below)
    handle = model[9].register_full_backward_hook(lambda *_: calls.append("backward"))
    hook_dicts = [dict(model[9]._backward_hooks)]
    x_before = x.clone()

    explainer = lrp.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0)
    first = explainer(x, torch.tensor([0, 1, 2]))
    second = explainer(x, torch.tensor([0, 1, 2]))

    assert calls == []  # the model's hook never ran
    assert torch.equal(first.relevance, second.relevance) and torch.equal(first.output, second.output)
    assert torch.equal(x, x_before)  # in-place ReLUs in the model did not touch the input
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # incl. BN running stats and counter
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == training
    assert [dict(model[9]._backward_hooks)] == hook_dicts
    assert not first.relevance.requires_grad

    # explained with inference semantics (Dropout off, BatchNorm running statistics), whatever the model's mode
    reference = lrp.Explainer(copy.deepcopy(model).eval(), "epsilon_gamma_box", low=-3.0, high=3.0)(
        x, torch.tensor([0, 1, 2]))
    assert torch.equal(first.relevance, reference.relevance)
    handle.remove()


@pytest.mark.parametrize("where", ["root", "nested", "leaf"])
@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_forward_hooks_and_pre_hooks_are_refused_naming_the_module(x, where, hook):
    """The explainer computes modules without their hooks: a hook that changes an output (this one doubles it) would
    make it explain another function than the model's, silently. Such models are refused, naming the module."""
    model = _randomize_batchnorm(small_cnn()).eval()
    nested = nn.Sequential(nn.Sequential(*model[:4]), nn.Sequential(*model[4:]))
    module, name = {"root": (nested, "Sequential (the model itself)"), "nested": (nested[0], "'0'"),
                    "leaf": (nested[1][0], "'1.0'")}[where]
    earlier = lrp.Explainer(nested, "epsilon_plus")  # built before the hook: refused when called with it
    if hook == "forward":
        handle = module.register_forward_hook(lambda m, args, out: out * 2)
    else:
        handle = module.register_forward_pre_hook(lambda m, args: tuple(a * 2 for a in args))
    with torch.no_grad():
        assert not torch.allclose(nested(x), earlier.network.forward(x)[-1])  # the hook changes the function
    message = re.escape(name) + ".*" + ("pre-hook" if hook == "pre" else "forward hook")
    with pytest.raises(lrp.UnsupportedLayerError, match=message):
        lrp.Explainer(nested, "epsilon_plus")
    with pytest.raises(lrp.UnsupportedLayerError, match=message):
        earlier(x, 0)
    handle.remove()
    result = lrp.Explainer(nested, "epsilon_plus")(x, 0)
    torch.testing.assert_close(result.output, nested(x)[:, 0])


@pytest.mark.parametrize("register", [nn.modules.module.register_module_forward_hook,
                                      nn.modules.module.register_module_forward_pre_hook])
def test_global_forward_hooks_are_refused(x, register):
    earlier = lrp.Explainer(small_cnn().eval(), "epsilon_plus")  # built before the hook: refused when called with it
    handle = register(lambda m, *args: None)
    try:
        with pytest.raises(lrp.UnsupportedLayerError, match="global forward hook"):
            lrp.Explainer(small_cnn().eval(), "epsilon_plus")
        with pytest.raises(lrp.UnsupportedLayerError, match="global forward hook"):
            earlier(x, 0)
    finally:
        handle.remove()
    earlier(x, 0)


def test_full_float32_settings_are_restored_whatever_api_set_them():
    from lrp.explainer import ieee_float32

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = True
        with ieee_float32():
            assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError, match="inside"):
            with ieee_float32():
                raise RuntimeError("inside")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_a_hand_built_composite_needs_no_rule_for_every_kind():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).double().eval()  # sums and average pooling
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    composite = lrp.Composite("mine", conv=lrp.rules.ZPlus(), linear=lrp.rules.Epsilon(1e-6))
    ours = lrp.Explainer(model, composite)(x, 1).relevance
    named = lrp.Explainer(model, "epsilon_plus")(x, 1).relevance
    torch.testing.assert_close(ours, named)


def test_works_under_no_grad_and_inference_mode(model, x):
    explainer = lrp.Explainer(model, "epsilon_alpha2_beta1")
    plain = explainer(x, 1).relevance
    with torch.no_grad():
        assert torch.equal(explainer(x, 1).relevance, plain)
    with torch.inference_mode():
        assert torch.equal(explainer(x, 1).relevance, plain)


def test_input_requiring_grad_is_accepted_and_not_modified(model, x):
    x = x.clone().requires_grad_(True)
    result = lrp.Explainer(model, "epsilon_plus")(x, 0)
    assert x.grad is None and not result.relevance.requires_grad


def test_inplace_relu_model_matches_its_out_of_place_twin(x):
    inplace = _randomize_batchnorm(small_cnn(inplace=True)).eval()
    out_of_place = small_cnn(inplace=False).eval()
    out_of_place.load_state_dict(inplace.state_dict())
    for composite in ("epsilon_plus", "epsilon_alpha2_beta1", "deconvnet"):
        a = lrp.Explainer(inplace, composite)(x, 3).relevance
        b = lrp.Explainer(out_of_place, composite)(x, 3).relevance
        assert torch.equal(a, b)


# -- cached parameter variants follow the model -----------------------------------------------------------------------
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat", "alpha_beta"])
def test_in_place_weight_updates_change_the_explanation(model, x, composite):
    params = ALL_COMPOSITES[composite]
    explainer = lrp.Explainer(model, composite, **params)
    before = explainer(x, 2).relevance
    with torch.no_grad():
        model[4].weight.mul_(-1.5)  # in place: the version counter changes
        model[1].running_mean.add_(0.3)  # a BatchNorm statistic folded into model[0]
    after = explainer(x, 2).relevance
    fresh = lrp.Explainer(model, composite, **params)(x, 2).relevance
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh)


def test_load_state_dict_changes_the_explanation(model, x):
    explainer = lrp.Explainer(model, "epsilon_plus")
    before = explainer(x, 2).relevance
    state = {k: v * 1.5 - 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copies in place into the same tensors
    after = explainer(x, 2).relevance
    assert not torch.allclose(before, after)
    assert torch.equal(after, lrp.Explainer(model, "epsilon_plus")(x, 2).relevance)


def test_replacing_parameter_data_changes_the_explanation(model, x):
    explainer = lrp.Explainer(model, "epsilon")
    before = explainer(x, 2).relevance
    model[4].weight.data = model[4].weight.data * -1.5
    after = explainer(x, 2).relevance
    assert torch.equal(after, lrp.Explainer(model, "epsilon")(x, 2).relevance)
    assert not torch.allclose(before, after)


def test_model_converted_to_float64_after_construction(model, x):
    explainer = lrp.Explainer(model, "epsilon_plus")
    model.double()
    result = explainer(x.double(), 1)
    assert result.relevance.dtype == torch.float64
    assert torch.equal(result.relevance, lrp.Explainer(model, "epsilon_plus")(x.double(), 1).relevance)


# -- dtypes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1", "gradient"])
def test_float32_default_agrees_with_float64(model, x, composite):
    params = ALL_COMPOSITES[composite]
    single = lrp.Explainer(model, composite, **params)(x, 2)
    double_model = copy.deepcopy(model).double()
    double = lrp.Explainer(double_model, composite, **params)(x.double(), 2)
    assert single.relevance.dtype == torch.float32 and double.relevance.dtype == torch.float64
    error = (single.relevance.double() - double.relevance).norm() / double.relevance.norm()
    assert error < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model, x):
    cpu = lrp.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0)(x, 1).relevance
    gpu_model = copy.deepcopy(model).cuda()
    gpu = lrp.Explainer(gpu_model, "epsilon_gamma_box", low=-3.0, high=3.0)(x.cuda(), torch.tensor(1).cuda())
    torch.testing.assert_close(gpu.relevance.cpu(), cpu, rtol=1e-3, atol=1e-5)


# -- heatmap ----------------------------------------------------------------------------------------------------------
def test_heatmap_colours():
    relevance = torch.zeros(4, 5)
    relevance[0, 0], relevance[1, 1], relevance[2, 2] = 1.0, -1.0, 0.5
    image = lrp.heatmap(relevance, scale=1.0)
    assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert image[0, 0].tolist() == [255, 0, 0]  # full positive: red
    assert image[1, 1].tolist() == [0, 0, 255]  # full negative: blue
    assert image[3, 4].tolist() == [255, 255, 255]  # zero: white
    r, g, b = image[2, 2].tolist()
    assert r == 255 and g == b and 0 < g < 255  # half positive: light red


def test_a_non_finite_pixel_is_grey_and_leaves_the_scale_of_the_others():
    """Before: one NaN made the percentile NaN and the whole image white, as if the map had no relevance."""
    relevance = torch.zeros(8, 8)
    relevance[2, 3], relevance[5, 5] = 1.0, -1.0
    clean = lrp.heatmap(relevance)
    relevance[0, 0], relevance[7, 7] = float("nan"), float("inf")
    image = lrp.heatmap(relevance)
    assert image[0, 0].tolist() == image[7, 7].tolist() == [128, 128, 128]
    image[0, 0], image[7, 7] = clean[0, 0], clean[7, 7]
    assert np.array_equal(image, clean)


def test_heatmap_is_symmetric_sums_channels_and_handles_all_zero():
    relevance = torch.randn(3, 6, 7)
    image = lrp.heatmap(relevance)
    assert image.shape == (6, 7, 3)
    assert np.array_equal(lrp.heatmap(relevance.sum(0)), image)
    flipped = lrp.heatmap(-relevance)
    assert np.array_equal(flipped, image[..., ::-1])  # negating the map swaps red and blue
    assert (lrp.heatmap(torch.zeros(5, 5)) == 255).all()
    assert lrp.heatmap(np.ones((2, 2))).shape == (2, 2, 3)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(C, H, W\)"):
        lrp.heatmap(torch.zeros(2, 3, 4, 5))


# -- the graph knows which layer inputs are non-negative -------------------------------------------------------------
def test_layers_after_relu_pool_and_flatten_have_nonnegative_inputs_and_the_first_layer_does_not():
    network = lrp.Explainer(small_cnn(), "epsilon_plus").network
    linear = [s.name for s in network.steps if s.layer is not None]
    known = [s.name for s in network.steps if s.layer is not None and s.inputs_nonnegative]
    assert linear == ["0", "4", "9"]
    assert known == ["4", "9"]  # after ReLU -> MaxPool, and ReLU -> AvgPool -> Flatten -> Dropout


def test_a_shift_after_relu_is_not_taken_as_nonnegative():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) - 1.0)

    network = lrp.Explainer(Shifted(), "epsilon_plus").network
    assert not any(s.inputs_nonnegative for s in network.steps if s.layer is not None)


class _Stacked(nn.Module):
    """Linear -> an activation -> Linear: what the graph can tell of the second layer's input sign."""

    def __init__(self, middle):
        super().__init__()
        self.a, self.b, self.middle = nn.Linear(4, 6), nn.Linear(6, 3), middle

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


@pytest.mark.parametrize("middle, signed", [(nn.Identity(), True), (nn.SiLU(), True), (nn.Tanh(), True),
                                            (nn.Sigmoid(), False), (nn.ReLU6(), False)])
def test_an_affine_output_not_rectified_since_is_known_signed_and_needs_no_check(middle, signed):
    steps = [s for s in lrp.Explainer(_Stacked(middle), "epsilon_plus").network.steps if s.layer is not None]
    assert [s.inputs_signed for s in steps] == [False, signed]  # the model's input stays unknown: checked
    assert not any(s.inputs_signed and s.inputs_nonnegative for s in steps)


def test_a_signed_input_that_happens_to_be_nonnegative_gives_the_checked_relevance():
    """The graph's "signed" skips the check; on a batch with no negative entry the signed form must still give the
    relevance of the non-negative form (its x^- terms are zeros)."""
    torch.manual_seed(0)
    model = _Stacked(nn.Identity()).double()
    with torch.no_grad():
        model.a.weight.abs_(), model.a.bias.abs_()  # a non-negative input gives a non-negative hidden layer
    x, target = torch.rand(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    explainer = lrp.Explainer(model, "epsilon_plus", recompute=False)
    second = next(s for s in explainer.network.steps if s.name == "b")
    assert second.inputs_signed
    signed = explainer(x, target)
    second.inputs_signed = False  # checked instead: amin >= 0, the non-negative form
    checked = explainer(x, target)
    torch.testing.assert_close(signed.relevance, checked.relevance, rtol=1e-12, atol=1e-14)


def test_the_zoo_checks_only_the_model_input_sign_per_batch():
    """Each per-batch sign check is a host synchronisation on a GPU; these families had 17-48 per call."""
    torchvision = pytest.importorskip("torchvision")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func.overloadpacket.__name__ == "_local_scalar_dense"
            return func(*args, **(kwargs or {}))

    for name in ("mobilenet_v3_small", "shufflenet_v2_x0_5"):
        torch.manual_seed(0)
        explainer = lrp.Explainer(getattr(torchvision.models, name)().eval(), "epsilon_plus")
        checked = [s.name for s in explainer.network.steps
                   if s.layer is not None and not s.inputs_nonnegative and not s.inputs_signed]
        assert len(checked) == 1, (name, checked)  # the first layer, on the model's input
        explainer(torch.randn(1, 3, 64, 64), torch.tensor([3]))  # the first call also compares with the model's
        Syncs.count = 0
        with Syncs():
            explainer(torch.randn(1, 3, 64, 64), torch.tensor([3]))
        assert Syncs.count <= 2, name  # that check and the target check


def test_tf32_switch_is_accepted_and_changes_nothing_on_cpu(model, x):
    full = lrp.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0)(x, 1).relevance
    rough = lrp.Explainer(model, "epsilon_gamma_box", low=-3.0, high=3.0, tf32=True)(x, 1).relevance
    assert torch.equal(full, rough)
    with pytest.raises(TypeError):
        lrp.Explainer(model, "epsilon", True)  # keyword only


def test_a_name_override_gives_one_step_its_rule_as_zennit_name_maps_do(model, x):
    """epsilon_plus with the flat rule named on the first Conv is epsilon_plus_flat (checked against zennit)."""
    named = lrp.Explainer(model, "epsilon_plus", by_name={"0": lrp.rules.Flat()})(x, 1).relevance
    torch.testing.assert_close(named, lrp.Explainer(model, "epsilon_plus_flat")(x, 1).relevance)
    same = lrp.Explainer(model, lrp.make_composite("epsilon_plus").with_names({"0": lrp.rules.Flat()}))(x, 1)
    assert torch.equal(same.relevance, named)
    assert not torch.equal(named, lrp.Explainer(model, "epsilon_plus")(x, 1).relevance)


def test_a_name_override_for_a_step_the_network_lacks_is_refused(model):
    with pytest.raises(ValueError, match="names steps the network does not have: features.0"):
        lrp.Explainer(model, "epsilon_plus", by_name={"features.0": lrp.rules.Flat()})
    with pytest.raises(TypeError, match="not a rule for: 0"):
        lrp.make_composite("epsilon_plus", by_name={"0": "flat"})


def test_rules_are_frozen_settings():
    rule = lrp.rules.AlphaBeta(beta=-1)  # the paper's convention, stored in the common one
    assert (rule.alpha, rule.beta) == (2.0, 1.0) and repr(rule).startswith("AlphaBeta(alpha=2.0, beta=1.0")
    assert type(lrp.rules.Gamma(1).gamma) is float
    with pytest.raises(AttributeError):
        rule.alpha = 3.0
    with pytest.raises(TypeError):
        lrp.rules.Flat(1e-6, include_bias=False)  # no bias enters the flat rule
