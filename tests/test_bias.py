"""Bias flags: a planted tag is found with its evidence, context reliance is flagged, clean classes are not."""
from __future__ import annotations

import numpy as np
import pytest

from aggregations import bias, run
from helpers.stores import make_store

SIZE, PER_CLASS = 32, 20
TAG = (2, 26, 10, 30)  # x0, y0, x1, y1: an 8x4 "copyright tag" bottom left, below every object


def planted(cue_class: int | None = 1, context_class: int | None = 3, seed: int = 0):
    """Four classes of 32x32 relevance maps: a 10x10 object at a random place in the upper part, light noise.

    ``cue_class``: 16 of its 20 maps also put strong relevance on the tag. ``context_class``: its object
    gets little relevance and a band of "water" below it gets most.
    """
    rng = np.random.default_rng(seed)
    n = 4 * PER_CLASS
    maps = rng.normal(0, 0.05, (n, SIZE, SIZE)).astype(np.float32)
    target = np.repeat(np.arange(4), PER_CLASS)
    boxes = np.zeros((n, 4), np.float32)
    tagged = []
    for i in range(n):
        x0, y0 = rng.integers(0, SIZE - 10), rng.integers(0, 15)
        boxes[i] = x0, y0, x0 + 10, y0 + 10
        if target[i] == context_class:
            maps[i, y0:y0 + 10, x0:x0 + 10] += 0.2
            maps[i, y0 + 10:y0 + 18, :] += 0.5
        else:
            maps[i, y0:y0 + 10, x0:x0 + 10] += 1.0
        if target[i] == cue_class and i % PER_CLASS < 16:
            maps[i, TAG[1]:TAG[3], TAG[0]:TAG[2]] += 2.0
            tagged.append(i)
    return maps, target, boxes, np.array(tagged)


@pytest.fixture(scope="module")
def planted_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted")
    maps, target, boxes, tagged = planted()
    url = make_store(path / "s.zarr", maps, target=target, boxes=boxes, rows_per_shard=8)
    return run.aggregate(url, path / "out"), tagged


def test_planted_cue_is_found_with_its_evidence(planted_result):
    result, tagged = planted_result
    classes = {row["class"]: row for row in result.classes.to_pylist()}
    cue = classes[1]
    assert cue["flag"] == "cue", cue["reason"]
    x0, y0, x1, y1 = cue["spot_x0"], cue["spot_y0"], cue["spot_x1"], cue["spot_y1"]
    assert x0 <= TAG[0] and y0 <= TAG[1] and x1 >= TAG[2] and y1 >= TAG[3]  # where: around the tag ...
    tag_area = (TAG[2] - TAG[0]) * (TAG[3] - TAG[1]) / SIZE**2
    assert cue["spot_area"] <= 2 * tag_area  # ... and not much more
    assert 0.25 < cue["spot_share"] < 0.45  # how much: 16/20 * 64 of ~170 mean positive relevance
    assert cue["spot_images"] == len(tagged) == 16  # on how many images
    assert cue["spot_image_fraction"] == pytest.approx(0.8)
    assert set(cue["top_rows"]) <= set(tagged.tolist()) and len(cue["top_rows"]) == 5  # which images
    assert "cue" in cue["reason"] and "16 of 20 images" in cue["reason"]


def test_context_reliance_is_flagged_and_clean_classes_are_not(planted_result):
    result, _ = planted_result
    classes = {row["class"]: row for row in result.classes.to_pylist()}
    assert classes[3]["flag"] == "context", classes[3]["reason"]
    assert classes[3]["context_share"] > 0.7
    for clean in (0, 2):
        assert classes[clean]["flag"] == "" and not classes[clean]["flagged"], classes[clean]["reason"]
        assert classes[clean]["reason"].startswith("not flagged")
    ranks = {c: row["bias_rank"] for c, row in classes.items()}
    assert {ranks[1], ranks[3]} == {1, 2}  # the two biased classes lead the ranking
    scores = {c: row["bias_score"] for c, row in classes.items()}
    assert max(scores[0], scores[2]) < min(scores[1], scores[3])


def test_clean_store_flags_nothing(tmp_path):
    maps, target, boxes, _ = planted(cue_class=None, context_class=None, seed=1)
    url = make_store(tmp_path / "s.zarr", maps, target=target, boxes=boxes, rows_per_shard=8)
    classes = run.aggregate(url, tmp_path / "out").classes.to_pylist()
    assert [row["flag"] for row in classes] == ["", "", "", ""], [row["reason"] for row in classes]
    assert all(row["cue_score"] == 0 for row in classes)


def test_cue_is_found_without_object_boxes(tmp_path):
    maps, target, _, tagged = planted(context_class=None, seed=2)
    url = make_store(tmp_path / "s.zarr", maps, target=target, rows_per_shard=8)
    classes = {row["class"]: row for row in run.aggregate(url, tmp_path / "out").classes.to_pylist()}
    assert classes[1]["flag"] == "cue", classes[1]["reason"]
    assert classes[1]["spot_images"] == len(tagged)
    assert [classes[c]["flag"] for c in (0, 2, 3)] == ["", "", ""]
    assert np.isnan(classes[1]["context_share"])  # no boxes: context usage is not measured


def test_find_spot_returns_the_block_it_was_given():
    share = np.full((32, 32), 0.0002)
    share[20:24, 5:13] = 0.01  # 32 pixels holding 32% of the relevance
    spot = bias.find_spot(share, None)
    assert spot.box == (5, 20, 13, 24) and spot.area == pytest.approx(32 / 1024)
    assert spot.share == pytest.approx(0.32) and spot.qualifies
    assert bias.find_spot(np.zeros((8, 8)), None) is None


def test_a_spot_every_class_has_is_not_a_class_cue():
    share = np.full((32, 32), 0.0002)
    share[0:4, 0:4] = 0.03  # e.g. a watermark on every image of every class
    spot = bias.find_spot(share, reference=share.copy())
    assert spot is None or not spot.qualifies


def test_small_classes_are_not_judged():
    spot = bias.Spot((0, 0, 2, 2), 0.01, 0.5, True)
    verdict = bias.judge(spot, np.array([0.9, 0.9]), 0.9, 0.5, 0.4, n_images=2)
    assert verdict["flag"] == "" and verdict["reason"].startswith("not judged")
    assert verdict["bias_score"] == 0 and verdict["cue_score"] == 0  # so it cannot outrank a judged class
