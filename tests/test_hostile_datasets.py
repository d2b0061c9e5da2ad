"""Hostile and odd datasets (docs/hostile-inputs.md): manifests, folders, annotations, class names files, model
kwargs and image modes that used to end in a traceback or a silent wrong value.

Each case ends as a configuration error before any work (``refused``: no store is created), or an ok reading
documented in docs/hostile-inputs.md and docs/pipeline.md.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import config_from_dict
from pipeline.datasets import DatasetError, load_index, read_image, read_mask
from pipeline.models import ModelError, ModelSpec, build_model, model_class_names
from pipeline.run import plan_run
from helpers.runs import FACTORY, manifest, save_weights, values
from test_hostile_inputs import csv, image, refused


def parquet(tmp_path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    return str(tmp_path / "m.parquet")


# ---- 1. float labels --------------------------------------------------------------------------------------------
def test_integral_float_labels_are_class_indices(tmp_path):
    """pandas writes an int column with a missing value as float: 0.0, 1.0, 2.0 are class indices, not names."""
    paths = [image(tmp_path, f"{i}.png") for i in range(3)]
    source = parquet(tmp_path, path=paths, label=pa.array([2.0, 0.0, 1.0], pa.float64()))
    index = load_index(source)
    assert index.class_names is None and index.samples["label"].to_pylist() == [2, 0, 1]
    plan = plan_run(config_from_dict(values(tmp_path, source)))
    assert plan.class_names == ["0", "1", "2"] and plan.rows["label"].to_pylist() == [2, 0, 1]


def test_integral_float_text_labels_in_a_csv_are_class_indices(tmp_path):
    source = csv(tmp_path, f"path,label\n{image(tmp_path, 'a.png')},2.0\n{image(tmp_path, 'b.png')},1.0\n")
    assert load_index(source).class_names is None
    assert plan_run(config_from_dict(values(tmp_path, source))).rows["label"].to_pylist() == [2, 1]


def test_text_that_only_parses_as_a_float_is_a_class_name(tmp_path):
    source = csv(tmp_path, f"path,label\n{image(tmp_path, 'a.png')},1e3\n{image(tmp_path, 'b.png')},nan\n")
    assert load_index(source).class_names == ["1e3", "nan"]


def test_a_csv_labels_column_of_single_numbers_is_read_as_text(tmp_path):
    """pyarrow would infer int64 for a ``labels`` column whose every cell is one number: it is read as text."""
    source = csv(tmp_path, f"path,labels\n{image(tmp_path, 'a.png')},2\n{image(tmp_path, 'b.png')},0\n")
    assert load_index(source).samples["labels"].to_pylist() == [[2], [0]]


def test_a_non_integral_float_label_is_refused_naming_the_row(tmp_path):
    paths = [image(tmp_path, f"{i}.png") for i in range(2)]
    refused(tmp_path, parquet(tmp_path, path=paths, label=[1.0, 1.5]),
            r"row 2 \(.*1.png\): label 1.5 is not a class index \(a whole number\) nor a class name")


def test_nan_labels_are_missing_labels(tmp_path):
    paths = [image(tmp_path, f"{i}.png") for i in range(2)]
    source = parquet(tmp_path, path=paths, label=[1.0, math.nan])
    assert load_index(source).samples["label"].to_pylist() == [1, -1]
    refused(tmp_path, source, "1 image.* have no single label", targets="label")
    plan = plan_run(config_from_dict(values(tmp_path, source, targets="prediction")))
    assert plan.rows["label"].to_pylist() == [1, -1]


# ---- 2. manifests and annotations that cannot be read -------------------------------------------------------------
def _ragged(tmp_path):
    return csv(tmp_path, f'path,label\n{image(tmp_path)},1\n{image(tmp_path, "b.png")},2,"2,2,5,5"\n')


def _corrupt_parquet(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return str(tmp_path / "m.parquet")


BAD_MANIFESTS = {  # case -> (writer, what the message says)
    "missing CSV": (lambda t: str(t / "nowhere.csv"), r"manifest '.*nowhere.csv' does not exist"),
    "ragged CSV": (_ragged, r"m.csv' line 3 \(row 2\) has 3 fields where the header has 2 .*quote a cell"),
    "0-byte CSV": (lambda t: csv(t, ""), r"m.csv' is empty"),
    "header-only CSV": (lambda t: csv(t, "path,label\n"), r"m.csv' has a header but no rows"),
    "header-only CSV without a newline": (lambda t: csv(t, "path,label"), r"m.csv' has a header but no rows"),
    "corrupt Parquet": (_corrupt_parquet, r"cannot read Parquet manifest '.*m.parquet': .*magic bytes"),
    "bad labels JSON cell": (lambda t: csv(t, f'path,labels\n{image(t)},"[1, 2"\n'),
                             r"m.csv' row 1 \(.*a.png\): labels '\[1, 2' is not a JSON list"),
    "bad box cell": (lambda t: csv(t, f'path,label,box\n{image(t)},1,"1,2,three"\n'),
                     r"m.csv' row 1 \(.*a.png\): box '1,2,three' is not 4 numbers"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_manifest_that_cannot_be_read_is_refused(tmp_path, case):
    write, match = BAD_MANIFESTS[case]
    refused(tmp_path, write(tmp_path), match)


def test_a_voc_object_without_a_bndbox_is_refused(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    image(tmp_path / "JPEGImages", "000001.jpg")
    (tmp_path / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><object><name>dog</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"000001.xml': object 'dog' has no <bndbox>"):
        load_index(str(tmp_path))
    model = {"factory": FACTORY, "kwargs": {"num_classes": 20}}
    refused(tmp_path, str(tmp_path), "object 'dog' has no <bndbox>", model=model)


# ---- 3. ImageFolder names and extensions --------------------------------------------------------------------------
def test_a_non_utf8_file_name_in_an_image_folder_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    image(tmp_path / "cat", "ok.png")
    with open(os.path.join(os.fsencode(str(tmp_path / "cat")), b"caf\xe9.png"), "wb") as file:
        file.write((tmp_path / "cat" / "ok.png").read_bytes())
    with pytest.raises(DatasetError, match=r"1 file or folder name\(s\) that are not valid UTF-8") as caught:
        load_index(str(tmp_path))
    assert "caf\\xe9.png" in str(caught.value) and "rename them to UTF-8" in str(caught.value)
    refused(tmp_path, str(tmp_path), "not valid UTF-8")


def test_a_non_utf8_name_of_a_file_that_is_no_image_is_only_skipped(tmp_path):
    (tmp_path / "cat").mkdir()
    image(tmp_path / "cat", "ok.png")
    with open(os.path.join(os.fsencode(str(tmp_path / "cat")), b"notes caf\xe9.txt"), "wb") as file:
        file.write(b"not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) .*notes caf\\\\xe9.txt"):
        index = load_index(str(tmp_path))
    assert len(index) == 1 and index.skipped == (str(tmp_path / "cat" / "notes caf\\xe9.txt"),)


def test_gif_files_are_read_and_other_files_are_counted_with_a_warning(tmp_path):
    (tmp_path / "a").mkdir()
    frames = [Image.fromarray(np.full((4, 5, 3), value, np.uint8)) for value in (10, 200)]
    frames[0].save(tmp_path / "a" / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not images .*notes.txt"):
        index = load_index(str(tmp_path))
    assert index.samples["path"].to_pylist() == [str(tmp_path / "a" / "anim.gif")]
    assert index.skipped == (str(tmp_path / "a" / "notes.txt"),)
    first = read_image(str(tmp_path / "a" / "anim.gif"))  # the first frame
    assert tuple(first.shape) == (3, 4, 5) and (first == 10).all()
    image(tmp_path / "a", "b.png")
    (tmp_path / "a" / "notes.txt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        assert load_index(str(tmp_path)).skipped == ()


# ---- 4. class names files -----------------------------------------------------------------------------------------
def _class_names(tmp_path: Path, case: str) -> str:
    path = tmp_path / "names.txt"
    if case == "invalid JSON":
        path.write_text('["cat", "dog",')
    elif case == "a directory":
        path.mkdir()
    else:
        path.write_bytes("café\nthé\nbière\n".encode("latin-1"))
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("invalid JSON", r"names.txt' starts with '\[' but is not a JSON list"),
    ("a directory", r"names.txt' is a directory"),
    ("Latin-1 text", r"names.txt' is not UTF-8 text .*save it as UTF-8"),
], ids=["invalid JSON", "a directory", "Latin-1 text"])
def test_a_bad_class_names_file_is_refused(tmp_path, case, match):
    path = _class_names(tmp_path, case)
    with pytest.raises(ModelError, match=match):
        model_class_names(ModelSpec(factory=FACTORY, class_names=path))
    model = {"factory": FACTORY, "weights": save_weights(tmp_path / "w.pt"), "class_names": path}
    refused(tmp_path, manifest(tmp_path, 1), match, model=model)


def test_a_utf8_class_names_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "names.json").write_bytes('["café", "thé", "bière"]'.encode("utf-8-sig"))
    assert model_class_names(ModelSpec(factory=FACTORY, class_names=str(tmp_path / "names.json"))) == \
        ["café", "thé", "bière"]


# ---- 5. model kwargs ------------------------------------------------------------------------------------------------
def test_an_unknown_kwarg_of_a_torchvision_model_is_refused_naming_it(tmp_path):
    with pytest.raises(ModelError, match=r"'resnet18' rejected model.kwargs .*takes no keyword 'colour'.*"
                                         r"ResNet takes .*num_classes"):
        build_model(ModelSpec(name="resnet18", kwargs={"num_classes": 3, "colour": "red"}), download=False)
    refused(tmp_path, manifest(tmp_path, 1), "takes no keyword 'colour'",
            model={"name": "resnet18", "kwargs": {"num_classes": 3, "colour": "red"}})


# ---- 6. image modes and masks ---------------------------------------------------------------------------------------
def _tiff(tmp_path: Path, name: str, array: np.ndarray, mode: str) -> str:
    Image.fromarray(array, mode=mode).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    return str(tmp_path / name)


RAMP = np.arange(12, dtype=np.float64).reshape(3, 4) / 11  # 0..1


def test_float_tiffs_are_scaled_from_0_1_or_0_255_not_clipped(tmp_path):
    expected = np.rint(RAMP * 255).astype(np.uint8)
    unit = read_image(_tiff(tmp_path, "unit.tif", RAMP.astype(np.float32), "F"))
    np.testing.assert_array_equal(unit[0].numpy(), expected)  # 0..1 x 255 (was: all 0 or 1)
    eight = read_image(_tiff(tmp_path, "eight.tif", (RAMP * 255).astype(np.float32), "F"))
    np.testing.assert_array_equal(eight[0].numpy(), expected)  # 0..255 as it is
    with pytest.raises(ValueError, match=r"cannot decode image: .*float image with values in \[0, 1000\], "
                                         r"neither within 0..1 nor 0..255"):
        read_image(_tiff(tmp_path, "wide.tif", (RAMP * 1000).astype(np.float32), "F"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_image(_tiff(tmp_path, "nan.tif", np.full((2, 2), np.nan, np.float32), "F"))


def test_32_bit_integer_tiffs_are_scaled_not_clipped(tmp_path):
    sixteen = np.rint(RAMP * 65535).astype(np.int32)
    read = read_image(_tiff(tmp_path, "i16.tif", sixteen, "I"))
    np.testing.assert_array_equal(read[0].numpy(), np.rint(sixteen * 255 / 65535).astype(np.uint8))
    full = np.rint(RAMP * (2 ** 31 - 1)).astype(np.int32)
    read = read_image(_tiff(tmp_path, "i31.tif", full, "I"))
    np.testing.assert_array_equal(read[0].numpy(), np.rint(RAMP * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="negative values"):
        read_image(_tiff(tmp_path, "neg.tif", np.array([[-5, 3]], np.int32), "I"))


MASKS = {  # case -> (mode, pixels): each mask has 0 outside, and its other values inside
    "0/255": ("L", [[0, 255], [255, 0]]),
    "0/1 label array": ("L", [[0, 1], [1, 0]]),
    "class indices with a 255 void border": ("L", [[0, 3], [15, 255]]),
    "soft edge": ("L", [[0, 1], [127, 200]]),
    "16-bit 0/1 labels": ("I;16", [[0, 1], [1, 0]]),
    "colour (red, dark blue)": ("RGB", [[[0, 0, 0], [255, 0, 0]], [[0, 0, 1], [0, 0, 0]]]),
    "RGBA with an opaque background": ("RGBA", [[[0, 0, 0, 255], [9, 0, 0, 255]], [[0, 0, 0, 255], [0, 0, 0, 0]]]),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_every_non_zero_mask_pixel_is_inside(tmp_path, case):
    mode, pixels = MASKS[case]
    array = np.array(pixels, np.uint16 if mode == "I;16" else np.uint8)
    Image.fromarray(array).save(tmp_path / "mask.png")  # uint16: a 16-bit PNG
    assert Image.open(tmp_path / "mask.png").mode.startswith(mode[:1])
    inside = array[..., :3].any(axis=-1) if array.ndim == 3 else array != 0
    mask = read_mask(str(tmp_path / "mask.png"))
    assert mask.dtype == torch.bool and mask.tolist() == inside.tolist()


def test_a_paletted_mask_has_every_index_but_0_inside(tmp_path):
    paletted = Image.new("P", (2, 2))
    paletted.putdata([0, 1, 2, 0])
    paletted.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])  # VOC: index 0 background, dark class colours
    paletted.save(tmp_path / "voc.png")
    assert read_mask(str(tmp_path / "voc.png")).tolist() == [[False, True], [True, False]]


# ---- the CLI: exit status 2 with the message, no store ---------------------------------------------------------------
@pytest.mark.parametrize("case", ["ragged CSV", "bad class names", "unknown model kwarg"])
def test_the_cli_exits_2_with_the_message(tmp_path, capsys, case):
    from jobs.explain import main

    args = ["--factory", FACTORY, "--weights", save_weights(tmp_path / "w.pt"), "--dataset", manifest(tmp_path, 1)]
    if case == "ragged CSV":
        args[-1] = _ragged(tmp_path)
        said = "has 3 fields where the header has 2"
    elif case == "bad class names":
        args += ["--class-names", _class_names(tmp_path, "Latin-1 text")]
        said = "is not UTF-8 text"
    else:
        args = ["--model", "resnet18", "--model-kwargs", '{"colour": 1}', "--dataset", manifest(tmp_path, 1)]
        said = "takes no keyword 'colour'"
    code = main(args + ["--store", str(tmp_path / "s.zarr"), "--resize", "16", "16"])
    error = capsys.readouterr().err
    assert code == 2 and "configuration error" in error and said in error and "Traceback" not in error
    assert not (tmp_path / "s.zarr").exists()
