"""The demo's tiny CNN: loadable by the pipeline, explainable by the engine, and it learns the planted shortcut."""
from __future__ import annotations

import pytest
import torch

import lrp
from jobs.demo import synthetic, tinycnn
from pipeline.models import ModelSpec, build_model


def test_the_pipeline_builds_it_from_the_factory_and_a_state_dict(tmp_path):
    model = tinycnn.tiny_cnn(num_classes=3)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    built = build_model(ModelSpec(factory="jobs.demo.tinycnn:tiny_cnn", weights=str(tmp_path / "weights.pt"),
                                  kwargs={"num_classes": 3}))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(built(x), model.eval()(x))
    assert built(x).shape == (2, 3)


@pytest.mark.parametrize("composite, rtol", [("alpha_beta", 1e-6), ("epsilon_plus", 1e-3), ("epsilon", None)])
def test_the_engine_explains_every_layer_of_it(composite, rtol):
    """Only layers with LRP rules: an explanation runs and is (up to biases and epsilon) conservative."""
    torch.manual_seed(0)
    model = tinycnn.tiny_cnn(num_classes=4).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so folding is exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 48, 48, dtype=torch.float64)
    result = lrp.Explainer(model.double(), composite, include_bias=False)(x, torch.tensor([0, 1, 2]))
    assert result.relevance.shape == x.shape and torch.isfinite(result.relevance).all()
    if rtol is not None:  # epsilon stabilisers absorb some relevance by design (epsilon_plus: only a little)
        torch.testing.assert_close(result.relevance.flatten(1).sum(1), result.output, rtol=rtol, atol=rtol)


def test_training_learns_the_shortcut(tmp_path):
    """Trained on data where most 'ring' images carry the stamp, the model leans on the stamp:
    without it fewer images are called ring, with it on other classes many more are."""
    spec = synthetic.SyntheticSpec(classes=("disc", "ring", "square"), train_per_class=100, audit_per_class=30, seed=1)
    data = synthetic.generate(tmp_path, spec)
    names = data.class_names
    images, labels = tinycnn.load_manifest(data.manifest("train"), names)
    model = tinycnn.train(images, labels, len(names), epochs=6, seed=0, log=None)
    report = {split: tinycnn.accuracy_report(tinycnn.predict(model, x), y, names)
              for split in ("audit", "clean", "swapped")
              for x, y in [tinycnn.load_manifest(data.manifest(split), names)]}
    assert report["audit"]["accuracy"] > 0.5  # it learned something (chance: 1/3)
    assert report["audit"]["per_class"]["ring"] > report["clean"]["per_class"]["ring"] + 0.15
    assert report["swapped"]["predicted_as"]["ring"] > report["clean"]["predicted_as"]["ring"] + 0.3
    assert report["swapped"]["accuracy"] < report["clean"]["accuracy"] - 0.2


def test_load_manifest_rejects_labels_the_model_does_not_know(tmp_path):
    spec = synthetic.SyntheticSpec(train_per_class=1, audit_per_class=1)
    data = synthetic.generate(tmp_path, spec, splits=("audit",))
    with pytest.raises(ValueError, match="not among the class names"):
        tinycnn.load_manifest(data.manifest("audit"), ["disc", "ring"])


def test_train_leaves_the_thread_setting_as_it_was():
    before = torch.get_num_threads()
    tinycnn.train(torch.randn(8, 3, 48, 48), torch.arange(8) % 2, 2, epochs=1, batch_size=4, threads=1, log=None)
    assert torch.get_num_threads() == before
