"""SpRAy finds a cue that the class-average spot search cannot: a stamp in a random corner of half a class.

Generated scenes (pipeline/synthetic.py) and the demo's tiny CNN trained here; about half of the "ring"
images carry the "(C)" stamp, each in one of the four corners at random, so no pixel of the class
average holds it. Explained with the LRP engine, written to a store, clustered.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import lrp
from aggregations.run import aggregate
from aggregations.spray import RunOptions, SpraySettings, spray
from jobs.demo import synthetic, tinycnn
from tests.helpers.stores import make_store

CLASSES = ("cross", "disc", "ring", "square", "triangle")
TAG = CLASSES.index("ring")
SIZE = 48


def scenes(rng: np.random.Generator, per_class: int, tag_rate: float, tag_count: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """(N, 3, H, W) normalised images, labels, stamped flags, object boxes; stamps only on the tag class."""
    images, labels, stamped, boxes = [], [], [], []
    for label, shape in enumerate(CLASSES):
        for _ in range(tag_count if label == TAG and tag_count else per_class):
            corner = synthetic.stamp_box(SIZE, synthetic.CORNERS[rng.integers(4)])
            image, box = synthetic.render_scene(rng, shape, SIZE, corner)
            tag = label == TAG and rng.random() < tag_rate
            images.append(synthetic.apply_stamp(image, corner) if tag else image)
            labels.append(label), stamped.append(tag), boxes.append(box)
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(tinycnn.MEAN).view(1, 3, 1, 1)) / torch.tensor(tinycnn.STD).view(1, 3, 1, 1)
    return x.contiguous(), np.array(labels), np.array(stamped), boxes


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    rng = np.random.default_rng(0)
    train_x, train_y, _, _ = scenes(rng, 150, tag_rate=0.5)
    model = tinycnn.train(train_x, torch.from_numpy(train_y), len(CLASSES), epochs=8, seed=0, device="cpu", log=None)
    x, y, stamped, boxes = scenes(rng, 60, tag_rate=0.5, tag_count=200)  # 25 stamped rings per corner
    explainer = lrp.Explainer(model, composite="epsilon_plus")
    with torch.no_grad():
        prediction = model(x).argmax(1).numpy()
    maps, outputs = [], []
    for start in range(0, len(x), 100):
        result = explainer(x[start:start + 100], torch.from_numpy(y[start:start + 100]))
        maps.append(result.relevance.sum(1).detach().numpy()), outputs.append(result.output.detach().numpy())
    store = make_store(tmp_path_factory.mktemp("cnn") / "cue.zarr", np.concatenate(maps), target=y,
                       prediction=prediction, output=np.concatenate(outputs), boxes=np.array(boxes, np.float32),
                       class_names=list(CLASSES), rows_per_shard=50)
    out = str(tmp_path_factory.mktemp("cnn-out"))
    return {"store": store, "out": out, "stamped": stamped, "y": y, "prediction": prediction,
            "spray": spray(store, out, settings=SpraySettings(embedding="none", size=16), options=RunOptions(progress=False))}


def test_model_learned_the_stamp(audited):
    """The premise: stamped rings are recognised; without that, there is no strategy to find."""
    ring = audited["y"] == TAG
    assert (audited["prediction"][ring & audited["stamped"]] == TAG).mean() > 0.9


def test_spray_separates_the_stamped_images_and_ranks_the_class_first(audited):
    result = audited["spray"]
    ring = result.assignments.filter(result.assignments["target"].to_numpy() == TAG).to_pydict()
    flagged = {r["cluster"] for r in result.clusters.to_pylist() if r["target"] == TAG and "spot" in r["flag"]}
    assert flagged, result.clusters.filter(result.clusters["target"].to_numpy() == TAG).to_pylist()
    in_flagged = np.isin(ring["cluster"], list(flagged))
    stamped = audited["stamped"][ring["row"]]
    ari = adjusted_rand_score(stamped, in_flagged)
    assert ari >= 0.6, (ari, result.clusters.filter(result.clusters["target"].to_numpy() == TAG).to_pylist())
    ranks = {r["target"]: r["split_rank"] for r in result.classes.to_pylist()}
    assert ranks[TAG] == 1, ranks


def test_class_average_spot_search_misses_it(audited, tmp_path):
    """The aggregate bias check looks at the class average, where four corners dilute the stamp."""
    classes = aggregate(audited["store"], str(tmp_path)).classes.to_pylist()
    (ring,) = [r for r in classes if r["class"] == TAG]
    assert "cue" not in ring["flag"] or ring["cue_score"] < 0.15, ring
