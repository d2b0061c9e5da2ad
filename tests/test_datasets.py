"""Dataset indexes (ImageFolder, manifest Parquet/CSV, Pascal VOC) and image decoding."""
from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.datasets import VOC_CLASSES, DatasetError, load_index, read_image, read_mask


def save(path, height=6, width=8, mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=None).convert(mode).save(path)
    return path


@pytest.mark.filterwarnings("ignore:.*skipped 1 file.*notes.txt:UserWarning")  # tests/test_hostile_datasets.py
def test_image_folder_classes_labels_and_fingerprint(tmp_path):
    for name, count in (("dog", 2), ("cat", 3)):
        for i in range(count):
            save(tmp_path / name / f"{i}.png", seed=i)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    index = load_index(str(tmp_path))
    assert index.kind == "imagefolder" and index.class_names == ["cat", "dog"] and len(index) == 5
    assert index.samples["label"].to_pylist() == [0, 0, 0, 1, 1]
    assert index.samples["sample_id"].to_pylist() == list(range(5))
    assert index.samples["path"][0].as_py() == str(tmp_path / "cat" / "0.png")
    assert not index.multi_label and index.max_boxes == 0 and not index.has_masks

    same = load_index(str(tmp_path))
    assert same.fingerprint() == index.fingerprint()
    save(tmp_path / "dog" / "9.png")
    assert load_index(str(tmp_path)).fingerprint() != index.fingerprint()

    # the model's class names decide the indices when every folder is one of them
    mapped = load_index(str(tmp_path), class_names=["car", "dog", "cat"])
    assert mapped.class_names == ["car", "dog", "cat"]
    assert mapped.samples["label"].to_pylist()[:3] == [2, 2, 2]


def test_parquet_manifest_with_names_labels_boxes_and_masks(tmp_path):
    save(tmp_path / "img" / "a.png")
    save(tmp_path / "img" / "b.png")
    save(tmp_path / "mask.png", mode="L")
    table = pa.table({
        "path": ["img/a.png", str(tmp_path / "img" / "b.png")],
        "label": ["zebra", "ant"],
        "labels": [["zebra", "ant"], ["ant"]],
        "box": [[[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 4.0, 5.0]], [[2.0, 2.0, 6.0, 5.0]]],
        "mask_path": ["mask.png", None],
    })
    pq.write_table(table, tmp_path / "manifest.parquet")
    index = load_index(str(tmp_path / "manifest.parquet"))
    assert index.kind == "manifest" and index.class_names == ["ant", "zebra"] and index.multi_label
    samples = index.samples.to_pylist()
    assert samples[0]["path"] == str(tmp_path / "img" / "a.png")  # relative to the manifest
    assert samples[0]["label"] == 1 and samples[0]["labels"] == [0, 1] and samples[1]["labels"] == [0]
    assert samples[0]["boxes"] == [[0, 0, 2, 3], [1, 1, 4, 5]] and samples[0]["box_classes"] == [-1, -1]
    assert samples[0]["mask_path"] == str(tmp_path / "mask.png") and samples[1]["mask_path"] == ""
    assert index.max_boxes == 2 and index.has_masks

    with pytest.raises(DatasetError, match=r"labels \['zebra'\] that are not class names"):
        load_index(str(tmp_path / "manifest.parquet"), class_names=["ant", "bee"])


def test_csv_manifest_text_cells(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text(
        'path,label,box\n'
        'a.png,2,"1,2,3,4"\n'
        'b.png,0,"[[0,0,1,1],[2,2,3,3]]"\n'
    )
    index = load_index(str(tmp_path / "m.csv"))
    samples = index.samples.to_pylist()
    assert index.class_names is None and [s["label"] for s in samples] == [2, 0]
    assert samples[0]["boxes"] == [[1, 2, 3, 4]] and len(samples[1]["boxes"]) == 2
    (tmp_path / "bad.csv").write_text('path,label,box\na.png,1,"1,2,3"\n')
    with pytest.raises(DatasetError, match="must have 4 numbers"):
        load_index(str(tmp_path / "bad.csv"))
    (tmp_path / "nopath.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DatasetError, match="needs a 'path' column"):
        load_index(str(tmp_path / "nopath.csv"))


VOC_XML = """<annotation><filename>{name}.jpg</filename><size><width>8</width><height>6</height></size>
{objects}</annotation>"""
VOC_OBJECT = ("<object><name>{cls}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
              "</bndbox></object>")


def make_voc(root):
    objects = {"000001": [("dog", 1, 1, 4, 3), ("person", 2, 2, 8, 6)], "000002": [("cat", 1, 1, 8, 6)]}
    for name, objs in objects.items():
        save(root / "JPEGImages" / f"{name}.jpg")
        xml = VOC_XML.format(name=name, objects="".join(
            VOC_OBJECT.format(cls=c, x0=a, y0=b, x1=x, y1=y) for c, a, b, x, y in objs))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(xml)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")


def test_voc_multi_label_boxes_and_split(tmp_path):
    make_voc(tmp_path)
    index = load_index(str(tmp_path))
    assert index.kind == "voc" and index.class_names == VOC_CLASSES and index.multi_label
    first, second = index.samples.to_pylist()
    dog, person, cat = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person"), VOC_CLASSES.index("cat")
    assert first["labels"] == sorted([dog, person]) and first["label"] == -1 and second["label"] == cat
    assert first["boxes"] == [[0, 0, 4, 3], [1, 1, 8, 6]] and first["box_classes"] == [dog, person]
    assert first["path"].endswith(os.path.join("JPEGImages", "000001.jpg"))
    assert [s["path"][-10:] for s in load_index(str(tmp_path), split="val").samples.to_pylist()] == ["000002.jpg"]
    with pytest.raises(DatasetError, match="split file"):
        load_index(str(tmp_path), split="test")


def test_read_image_formats_and_failures(tmp_path):
    image = read_image(str(save(tmp_path / "a.png", 5, 7)))
    assert image.shape == (3, 5, 7) and image.dtype == torch.uint8
    assert read_image(str(save(tmp_path / "g.png", mode="L"))).shape == (3, 6, 8)
    assert read_image(str(save(tmp_path / "a.bmp"))).shape == (3, 6, 8)
    assert read_mask(str(save(tmp_path / "m.png", mode="L"))).dtype == torch.bool
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="cannot decode image"):
        read_image(str(tmp_path / "bad.jpg"))
    with pytest.raises(FileNotFoundError):
        read_image(str(tmp_path / "missing.png"))


def test_fsspec_image_folder_and_errors(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/lrp-audit-{os.getpid()}/data"
    for name in ("x", "y"):
        fs.pipe(f"{root}/{name}/0.png", save(tmp_path / f"{name}.png").read_bytes())
    index = load_index(f"memory://{root}")
    assert index.class_names == ["x", "y"]
    assert read_image(index.samples["path"][1].as_py()).shape == (3, 6, 8)
    with pytest.raises(DatasetError, match="does not exist"):
        load_index(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_index(str(tmp_path / "empty"))
