"""The generated demo dataset: deterministic, the stamp where and only where it is planted, readable by the pipeline."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.demo import synthetic
from pipeline.datasets import load_index

SMALL = synthetic.SyntheticSpec(train_per_class=6, audit_per_class=4, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), SMALL, splits=synthetic.SPLITS)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _stamp_present(image: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = box
    patch = image[y0:y1, x0:x1].astype(int)
    expected = np.where(synthetic.stamp_pixels()[..., None], 242, 13)
    return bool(np.abs(patch - expected).max() <= 1)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, dataset):
    again = synthetic.generate(tmp_path / "again", SMALL, splits=("audit",))
    other = synthetic.generate(tmp_path / "other", synthetic.SyntheticSpec(
        train_per_class=6, audit_per_class=4, seed=4), splits=("audit",))
    first = dataset.read_manifest("audit")["path"].to_pylist()
    second = again.read_manifest("audit")["path"].to_pylist()
    third = other.read_manifest("audit")["path"].to_pylist()
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]
    assert not np.array_equal(_pixels(first[0]), _pixels(third[0]))


def test_the_stamp_is_exactly_where_it_is_planted(dataset):
    tag = SMALL.tag_class
    for split in synthetic.SPLITS:
        rows = dataset.read_manifest(split).to_pylist()
        assert len(rows) == len(SMALL.classes) * SMALL.per_class(split)
        for row in rows:
            image = _pixels(row["path"])
            assert image.shape == (SMALL.image_size, SMALL.image_size, 3)
            assert _stamp_present(image, dataset.tag_box) == row["tagged"], (split, row["path"])
            if split in ("train", "audit"):
                assert not row["tagged"] or row["label"] == tag
            elif split == "swapped":
                assert row["tagged"] == (row["label"] != tag)
            else:  # clean, train_clean
                assert not row["tagged"]
    counts = dataset.counts["train"]
    assert counts["tagged"] == counts["tag_class_tagged"] > counts["tag_class_images"] // 2  # most, not all


def test_clean_and_swapped_show_the_audit_scenes(dataset):
    """Only the stamp differs between the paired splits: the accuracy gap is the stamp's doing."""
    x0, y0, x1, y1 = dataset.tag_box
    audit, clean, swapped = (dataset.read_manifest(s).to_pylist() for s in ("audit", "clean", "swapped"))
    for a, c, s in zip(audit, clean, swapped):
        assert a["box"] == c["box"] == s["box"] and a["label"] == c["label"] == s["label"]
        images = [_pixels(r["path"]).copy() for r in (a, c, s)]
        for image in images:
            image[y0:y1, x0:x1] = 0
        assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


def test_object_boxes_frame_the_object_and_keep_off_the_stamp(dataset):
    x0, y0, x1, y1 = dataset.tag_box
    for row in dataset.read_manifest("train").to_pylist():
        bx0, by0, bx1, by1 = row["box"]
        assert 0 <= bx0 < bx1 <= SMALL.image_size and 0 <= by0 < by1 <= SMALL.image_size
        assert bx1 - bx0 >= 8 and by1 - by0 >= 8  # a real object, not a speck
        assert bx1 <= x0 or x1 <= bx0 or by1 <= y0 or y1 <= by0, row  # disjoint from the stamp


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_the_pipeline_reads_the_manifest_with_labels_and_boxes(dataset, suffix):
    manifest = str(dataset.manifest("audit")).replace(".parquet", suffix)
    index = load_index(manifest, "manifest", class_names=dataset.class_names)
    table = pq.read_table(dataset.manifest("audit")).to_pylist()
    samples = index.samples.to_pylist()
    assert len(samples) == len(table)
    for sample, row in zip(samples, table):
        assert sample["label"] == dataset.class_names.index(row["label"]) == row["label_index"]
        assert sample["boxes"] == [pytest.approx(row["box"])]
    # without the model's class list the manifest's own (sorted) names give the same indices
    assert load_index(manifest, "manifest").class_names == dataset.class_names


def test_load_reopens_a_generated_dataset(dataset):
    again = synthetic.load(dataset.root)
    assert again.spec == SMALL and again.tag_box == dataset.tag_box and again.class_names == dataset.class_names


@pytest.mark.parametrize("change, message", [
    (dict(tag_class="horse"), "tag_class"),
    (dict(classes=("ring", "blob")), "unknown shape"),
    (dict(image_size=16), "too small"),
    (dict(corner="middle"), "corner"),
    (dict(tag_rate=1.5), "tag_rate"),
])
def test_bad_specs_say_what_to_fix(change, message):
    with pytest.raises(ValueError, match=message):
        synthetic.SyntheticSpec(**change)
