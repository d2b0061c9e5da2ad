"""``lrp-audit explain --model NAME`` end to end on zoo models (random init, a small generated dataset, Ray).

efficientnet_b0 runs with its random-init weights saved to a file, so the stored relevance can be compared with the
bare engine in this process; convnext_tiny and vit_b_16 (zero-initialised heads filled in through a weights file as
well) run the same path and must store finite relevance for every image.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from test_pipeline import manifest
from zoo_models import build

import lrp
from pipeline.datasets import read_image
from pipeline.preprocess import Preprocess, PreprocessSpec
from pipeline.store import STATUS_OK, open_store

pytestmark = pytest.mark.slow

KWARGS = {"efficientnet_b0": {"num_classes": 3}, "convnext_tiny": {"num_classes": 3},
          "vit_b_16": {"num_classes": 3, "image_size": 32}}


def _weights(tmp_path, name) -> str:
    """The random-init model of ``build`` (zero-initialised parameters filled in) as a 3-class state_dict file."""
    state = build(name)[0].state_dict()
    prefix = "heads" if name.startswith("vit") else "classifier"
    for key, value in state.items():
        if key.startswith(prefix) and value.shape[:1] == (10,):
            state[key] = value[:3].clone()
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny", "vit_b_16"])
def test_explain_cli_runs_zoo_models_end_to_end(ray_cluster, tmp_path, name):
    from jobs.explain import main

    store_path = tmp_path / "run.zarr"
    code = main(["--dataset", manifest(tmp_path, 4), "--model", name, "--model-kwargs", json.dumps(KWARGS[name]),
                 "--weights", _weights(tmp_path, name), "--resize", "32", "32", "--composite", "epsilon_plus",
                 "--store", str(store_path), "--batch-size", "2", "--rows-per-shard", "2", "--num-actors", "1",
                 "--no-progress"])
    assert code == 0
    group = open_store(str(store_path)).groups()[0]
    rows = group.rows().to_pylist()
    relevance = group.relevance.compute()
    assert [r["status"] for r in rows] == [STATUS_OK] * 4
    assert np.isfinite(relevance).all() and np.abs(relevance).sum() > 0
    if name == "efficientnet_b0":  # the stored map is the engine's
        model = torchvision_model(name, tmp_path)
        row = rows[1]
        x, _, _ = Preprocess(PreprocessSpec(resize=[32, 32]))(read_image(row["path"]))
        expected = lrp.Explainer(model, "epsilon_plus")(x[None], row["target"]).relevance.sum(1)[0].numpy()
        np.testing.assert_allclose(relevance[row["row"]], expected, rtol=1e-4, atol=1e-6)


def torchvision_model(name, tmp_path):
    model = torchvision.models.get_model(name, weights=None, **KWARGS[name]).eval()
    model.load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True))
    return model
