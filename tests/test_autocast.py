"""A reduced-precision forward pass (``autocast``): relevance stays float32, close to the float32 maps but not equal
to them (so the autocast really ran), off by default, refused when unknown, and part of a store's identity."""
from __future__ import annotations

import pytest
import torch
import torchvision

import lrp
from pipeline.config import ConfigError, config_from_dict


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("dtype, bound", [("bfloat16", 0.2), ("float16", 0.05)])
def test_autocast_relevance_is_float32_and_near_full_precision(model_and_input, dtype, bound):
    model, x = model_and_input
    target = torch.tensor([1, 2])
    full = lrp.Explainer(model, "epsilon_plus")(x, target)
    reduced = lrp.Explainer(model, "epsilon_plus", autocast=dtype)(x, target)
    assert reduced.relevance.dtype == reduced.output.dtype == torch.float32
    error = (reduced.relevance - full.relevance).flatten(1).norm(dim=1) / full.relevance.flatten(1).norm(dim=1)
    assert (error < bound).all(), error  # bf16 keeps 8 mantissa bits, fp16 11: measured 1-5% and 0.2-1.4% here
    assert (error > 1e-5).all(), error  # the forward did run in reduced precision
    assert torch.equal(lrp.Explainer(model, "epsilon_plus")(x, target).relevance, full.relevance)  # default: off


def test_unknown_autocast_is_refused(model_and_input):
    with pytest.raises(ValueError, match="autocast 'int8' unknown"):
        lrp.Explainer(model_and_input[0], "epsilon", autocast="int8")


def test_autocast_is_in_the_store_identity_only_when_set(tmp_path):
    base = {"dataset": str(tmp_path), "model": {"name": "resnet18"}, "store": str(tmp_path / "s.zarr")}
    assert "autocast" not in config_from_dict(base).identity()  # stores written before the option keep their identity
    assert config_from_dict({**base, "autocast": "bfloat16"}).identity()["autocast"] == "bfloat16"
    with pytest.raises(ConfigError, match="autocast 'bf16' unknown"):
        config_from_dict({**base, "autocast": "bf16"})
