"""Hostile and odd inputs (docs/hostile-inputs.md): each row of that table is one test here.

Every case gets a recorded failed row with its reason, an ok row with a documented reading, or a clear
configuration error before any work; never a crash of the run or a silent wrong value. The image rows go through
the real explain actor in this process (one shard, the real Zarr store): decoding is the actor's job.
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lrp

from pipeline.actors import ExplainActor
from pipeline.config import ConfigError, config_from_dict
from pipeline.datasets import read_image
from pipeline.run import create_store, plan_run
from pipeline.store import STATUS_FAILED, STATUS_OK, open_store
from helpers.runs import FACTORY, manifest, save_weights, values

RGB = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)


def bomb(path: Path) -> None:
    """A PNG that claims 40000 x 40000 pixels in a few bytes (PIL refuses it before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def exif_rotated(path: Path) -> None:
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image.save(path, exif=exif)


def truncated(path: Path) -> None:
    Image.fromarray(RGB).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


IMAGES = {  # case -> (file name, writer)
    "truncated JPEG": ("truncated.jpg", truncated),
    "zero-byte file": ("zero.png", lambda p: p.write_bytes(b"")),
    "text file named .png": ("text.png", lambda p: p.write_text("hello, not an image")),
    "1x1 image": ("one.png", lambda p: Image.fromarray(RGB[:1, :1]).save(p)),
    "decompression bomb": ("bomb.png", bomb),
    "CMYK JPEG": ("cmyk.jpg", lambda p: Image.fromarray(RGB).convert("CMYK").save(p)),
    "16-bit PNG": ("g16.png", lambda p: Image.fromarray(RGB[..., 0].astype(np.uint16) * 257).save(p)),
    "paletted PNG": ("palette.png", lambda p: Image.fromarray(RGB).convert("P").save(p)),
    "grayscale": ("gray.png", lambda p: Image.fromarray(RGB).convert("L").save(p)),
    "RGBA": ("rgba.png", lambda p: Image.fromarray(np.dstack([RGB, np.full((20, 28), 9, np.uint8)])).save(p)),
    "EXIF-rotated photo": ("exif.jpg", exif_rotated),
    "path with spaces and non-ASCII": ("dir with spaces/ümlaut é.png", lambda p: Image.fromarray(RGB).save(p)),
    "symlink to a missing file": ("dangling.png", lambda p: os.symlink(p.parent / "nowhere.png", p)),
    "mask of another size": ("masked.png", lambda p: Image.fromarray(RGB).save(p)),
    "boxes outside the image": ("boxed.png", lambda p: Image.fromarray(RGB).save(p)),
}
# case -> (status, what the error says, or a check of the row)
EXPECTED = {
    "truncated JPEG": (STATUS_FAILED, "cannot decode image: OSError: image file is truncated"),
    "zero-byte file": (STATUS_FAILED, "cannot decode image: empty file (0 bytes)"),
    "text file named .png": (STATUS_FAILED, "cannot decode image: not an image format Pillow reads"),
    "1x1 image": (STATUS_OK, ""),
    "decompression bomb": (STATUS_FAILED, "DecompressionBombError"),
    "CMYK JPEG": (STATUS_OK, ""),
    "16-bit PNG": (STATUS_OK, ""),
    "paletted PNG": (STATUS_OK, ""),
    "grayscale": (STATUS_OK, ""),
    "RGBA": (STATUS_OK, ""),
    "EXIF-rotated photo": (STATUS_OK, ""),
    "path with spaces and non-ASCII": (STATUS_OK, ""),
    "symlink to a missing file": (STATUS_FAILED, "missing file"),
    "mask of another size": (STATUS_FAILED, "mask size (5, 5) differs from the image size (20, 28)"),
    "boxes outside the image": (STATUS_OK, ""),
}


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """One manifest with every odd image (and one plain one), explained by the real actor in this process."""
    folder = tmp_path_factory.mktemp("hostile")
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(folder / "small-mask.png")
    lines = ["path,label,box,mask_path"]
    for case, (name, write) in IMAGES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        box = '"-50,-50,10,400"' if case == "boxes outside the image" else ""
        mask = "small-mask.png" if case == "mask of another size" else ""
        lines.append(f'"{path}",1,{box},{mask}')
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = config_from_dict(values(folder, str(folder / "manifest.csv"), explanations=["epsilon"],
                                     rows_per_shard=64, batch_size=4))
    plan = plan_run(config)
    store = create_store(plan)
    ExplainActor(plan.job).explain_shard(0, plan.rows, store.group_names)
    rows = open_store(config.store).group("epsilon").rows().to_pylist()
    return {case: row for case, row in zip(IMAGES, rows)}, open_store(config.store).group("epsilon")


@pytest.mark.parametrize("case", list(IMAGES))
def test_odd_image(hostile_store, case):
    rows, group = hostile_store
    status, error = EXPECTED[case]
    row = rows[case]
    assert row["status"] == status, row["error"]
    assert error in row["error"] and (error or row["error"] == "")
    if status == STATUS_OK:
        assert np.isfinite(group.relevance[row["row"]].compute()).all()
        assert row["residual"] == pytest.approx(row["relevance_sum"] - row["output"])
    if case == "boxes outside the image":  # clipped to the map (16 x 16 after padding 28x20 to 28x28)
        box = group.boxes[row["row"], 0]
        assert box[0] == 0 and box[1] == 0 and box[3] == 16 and 0 < box[2] < 16


def test_odd_images_decode_to_the_documented_pixels(hostile_store, tmp_path):
    folder = Path(hostile_store[0]["1x1 image"]["path"]).parent
    sixteen = read_image(str(folder / "g16.png"))  # scaled to 8 bits, not clipped at 255
    np.testing.assert_array_equal(sixteen[0].numpy(), RGB[..., 0])
    upright = read_image(str(folder / "exif.jpg"))  # EXIF orientation 6: shown rotated, 28 high and 20 wide
    assert tuple(upright.shape) == (3, 28, 20)
    rgba = read_image(str(folder / "rgba.png"))  # alpha dropped, colour kept
    np.testing.assert_array_equal(rgba.permute(1, 2, 0).numpy(), RGB)
    gray = read_image(str(folder / "gray.png"))
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()


# ---- configuration errors before any work ---------------------------------------------------------------------
def csv(tmp_path: Path, text: str) -> str:
    (tmp_path / "m.csv").write_text(text)
    return str(tmp_path / "m.csv")


def image(tmp_path: Path, name: str = "a.png") -> str:
    Image.fromarray(RGB).save(tmp_path / name)
    return str(tmp_path / name)


def refused(tmp_path: Path, source: str, match: str, **overrides) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_run(config_from_dict(values(tmp_path, source, **overrides)))
    assert not (tmp_path / "run.zarr").exists()


def test_manifest_without_a_path_column(tmp_path):
    refused(tmp_path, csv(tmp_path, f"file,label\n{image(tmp_path)},1\n"), "needs a 'path' column")


def test_manifest_without_labels_in_label_mode(tmp_path):
    refused(tmp_path, csv(tmp_path, f"path\n{image(tmp_path)}\n"), "have no single label", targets="label")


def test_manifest_with_extra_columns_reads_the_known_ones(tmp_path):
    plan = plan_run(config_from_dict(values(tmp_path, csv(tmp_path, f"path,label,notes\n{image(tmp_path)},2,hi\n"))))
    assert plan.rows["label"].to_pylist() == [2]


def test_label_out_of_range(tmp_path):
    refused(tmp_path, csv(tmp_path, f"path,label\n{image(tmp_path)},7\n"), "label outside the model's 3 classes")


def test_unknown_label_name(tmp_path):
    model = {"factory": FACTORY, "weights": save_weights(tmp_path / "w.pt"), "class_names": ["cat", "dog", "car"]}
    refused(tmp_path, csv(tmp_path, f"path,label\n{image(tmp_path)},zebra\n"), "'zebra'.*not class names", model=model)


def test_duplicate_paths(tmp_path):
    path = image(tmp_path)
    refused(tmp_path, csv(tmp_path, f"path,label\n{path},1\n{path},2\n"), "more than once.*2 times")


@pytest.mark.parametrize("box", ["10,10,2,2", "1,nan,5,5"], ids=["inverted", "NaN"])
def test_inverted_or_nan_box(tmp_path, box):
    refused(tmp_path, csv(tmp_path, f'path,label,box\n{image(tmp_path)},1,"{box}"\n'),
            r"row 1 .*must be finite with x0 <= x1 and y0 <= y1")


def raising_factory(num_classes: int = 3):
    raise RuntimeError("the checkpoint server is down")


def test_a_model_factory_that_raises(tmp_path):
    model = {"factory": "tests.test_hostile_inputs:raising_factory"}
    refused(tmp_path, manifest(tmp_path, 1), r"raising_factory' raised RuntimeError: the checkpoint server is down",
            model=model)


def test_the_console_script_imports_a_factory_module_from_the_working_directory(tmp_path):
    """docs/pipeline.md's custom-model example, ``lrp-audit explain --factory mymodels:small_cnn`` with mymodels.py in
    the working directory: before, ``cannot import 'mymodels'`` (``python -m jobs.explain`` puts the working directory
    on sys.path, the console script did not)."""
    import subprocess
    import sys
    (tmp_path / "localmodels.py").write_text(
        "def small(num_classes=3):\n    raise RuntimeError('imported and called')\n")
    script = Path(sys.executable).parent / "lrp-audit"
    done = subprocess.run([str(script), "explain", "--dataset", manifest(tmp_path, 1), "--factory", "localmodels:small",
                           "--store", str(tmp_path / "run.zarr")], cwd=tmp_path, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "'localmodels:small' raised RuntimeError: imported and called" in done.stderr, done.stderr


def test_a_whole_pickled_model_as_weights_says_to_save_the_state_dict(tmp_path):
    """Before: torch's weights_only message (with terminal colour codes) advising weights_only=False, which a CLI user
    cannot set and should not."""
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), tmp_path / "whole.pt")
    refused(tmp_path, manifest(tmp_path, 1), r"holds a whole pickled model \(torch.save\(model\)\), not a state_dict: "
            r"save torch.save\(model.state_dict\(\), path\)",
            model={"factory": FACTORY, "weights": str(tmp_path / "whole.pt")})


class Payload:
    """A pickle that runs code when loaded without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_weights_file_that_is_a_pickle_with_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": Payload(str(marker))}, tmp_path / "evil.pt")
    refused(tmp_path, manifest(tmp_path, 1), "weights_only=True",
            model={"factory": FACTORY, "weights": str(tmp_path / "evil.pt")})
    assert not marker.exists()


def test_a_state_dict_of_another_architecture(tmp_path):
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "other.pt")
    refused(tmp_path, manifest(tmp_path, 1), "does not fit the model",
            model={"factory": FACTORY, "weights": str(tmp_path / "other.pt")})


def test_a_setting_that_fails_on_the_first_batch_fails_in_planning(tmp_path):
    """epsilon_gamma_box with a 2-channel box on 3-channel images builds, and fails only when it runs."""
    refused(tmp_path, manifest(tmp_path, 2), r"explanation 'box' fails on a 2x3x16x16 zero batch .*before any actor",
            explanations=[{"name": "box", "composite": "epsilon_gamma_box", "low": [-1, -1], "high": [1, 1]}])


# ---- values of the wrong type in a YAML config: refused with the key, never coerced -----------------------------
WRONG_TYPES = {  # case -> (overrides of the test config, what the error says)
    "resize as a quoted string": ({"preprocess": {"resize": "32"}}, r"preprocess: resize must be an integer or a "
                                  r"list of integers or unset, got the string '32' \(in YAML, drop the quotes\)"),
    "a quoted boolean": ({"per_channel": "false"}, "per_channel must be true or false, got the string 'false'"),
    "tf32 as a word": ({"tf32": "no"}, "tf32 must be true or false"),
    "from_weights as a string": ({"preprocess": {"from_weights": "yes"}}, "from_weights must be true or false"),
    "a fractional class": ({"targets": "classes", "classes": [1.5]}, "1.5 is neither a class index"),
    "explanations as a number": ({"explanations": 5}, "explanations must be a list of settings"),
    "dataset as a list": ({"dataset": ["a", "b"]}, "dataset must be a string .source. or a mapping"),
    "preprocess as a list": ({"preprocess": [16]}, "preprocess must be a mapping"),
    "weights as a number": ({"model": {"factory": FACTORY, "weights": 5}}, "model: weights must be a string"),
    "seed as a word": ({"model": {"factory": FACTORY, "seed": "x"}}, "model: seed must be an integer"),
    "rows_per_shard quoted": ({"rows_per_shard": "2"}, "rows_per_shard must be an integer, got the string '2'"),
    "a fractional batch size": ({"batch_size": 2.5}, r"batch_size must be an integer, got 2.5 \(float\)"),
    "mean as a string": ({"preprocess": {"resize": 16, "pad_to_square": True, "mean": "0.5"}},
                         "mean must be a list of numbers"),
    "an infinite std": ({"preprocess": {"resize": 16, "pad_to_square": True, "std": [float("inf")] * 3}},
                        "need equal lengths, finite values and std > 0"),
    "a NaN mean": ({"preprocess": {"resize": 16, "pad_to_square": True, "mean": [float("nan")] * 3}},
                   "need equal lengths, finite values and std > 0"),
    "a crop larger than the resize": ({"preprocess": {"resize": 16, "center_crop": 32}},
                                      r"center_crop \[32\] is larger than the resized image .*pad it with black"),
    "explanation named '.'": ({"explanations": [{"composite": "epsilon", "name": "."}]}, "cannot name a store group"),
    "explanation named '..'": ({"explanations": [{"composite": "epsilon", "name": ".."}]}, "cannot name a store group"),
    "a composite that is a number": ({"explanations": [{"composite": 5}]}, "'composite' must be a composite name"),
    "params as a list": ({"explanations": [{"composite": "epsilon", "params": [1]}]}, "'params' must be a mapping"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_a_value_of_the_wrong_type(tmp_path, case):
    overrides, match = WRONG_TYPES[case]
    with pytest.raises(ConfigError, match=match):
        plan_run(config_from_dict({**values(tmp_path, manifest(tmp_path, 1)), **overrides}))
    assert not (tmp_path / "run.zarr").exists()


def test_values_of_the_right_type_still_pass(tmp_path):
    """The shorthands the docs show: one int for resize, classes as text, the dataset and model as strings."""
    config = config_from_dict(values(tmp_path, manifest(tmp_path, 1), targets="classes", classes="2,dog",
                                     preprocess={"resize": 16, "pad_to_square": True, "mean": [0, 0, 0]}))
    assert config.preprocess.resize == [16] and config.classes == [2, "dog"] and config.preprocess.mean == [0.0] * 3
    assert config_from_dict({**values(tmp_path, "data"), "model": "resnet18"}).model.name == "resnet18"


def test_pathlib_paths_from_python_callers_are_paths(tmp_path):
    """A dict built in Python may hold ``pathlib.Path`` values (the store, the manifest, the weights): they are the
    same config as their strings, not a wrong type; ``evaluate``'s config too."""
    from pipeline.evaluation import config_from_values

    text = values(tmp_path, manifest(tmp_path, 1))
    as_paths = {**text, "store": tmp_path / "run.zarr", "dataset": {"source": Path(text["dataset"]["source"])},
                "model": {**text["model"], "weights": Path(text["model"]["weights"])}}
    assert config_from_dict(as_paths) == config_from_dict(text)
    assert isinstance(config_from_dict(as_paths).store, str)
    evaluation = config_from_values({**as_paths, "evaluation": {"out": tmp_path / "eval"}})
    assert evaluation == config_from_values({**text, "evaluation": {"out": str(tmp_path / "eval")}})


def test_null_means_the_default(tmp_path):
    """``key: null`` (or an empty value) in YAML is the key's default, as it was before values were type-checked."""
    model = {"factory": FACTORY, "kwargs": None, "class_names": [0, 1, 2], "seed": None}
    config = config_from_dict({**values(tmp_path, "data", model=model, storage_options=None, per_channel=None,
                                        preprocess={"resize": 16, "pad_to_square": None, "center_crop": [16, 16]}),
                               "dataset": {"source": "data", "storage_options": None, "split": None}})
    assert config.model.kwargs == {} and config.model.seed == 0 and config.storage_options == {}
    assert config.per_channel is False and config.preprocess.pad_to_square is False
    weights = config_from_dict(values(tmp_path, "data", model={"name": "resnet18", "weights": "DEFAULT"},
                                      preprocess={"from_weights": True, "mean": None, "resize": None}))
    assert weights.preprocess.resize == [256] and weights.preprocess.mean == [0.485, 0.456, 0.406]
    with pytest.raises(ConfigError, match="dataset: source must be a string, got None"):  # no default: refused
        config_from_dict({**values(tmp_path, "data"), "dataset": {"source": None}})


@pytest.mark.parametrize("store, match", [("plain/run.zarr", r"plain/run.zarr' cannot be used: '.*plain' is a file"),
                                          ("plain", r"plain' is a file, not a relevance store")],
                         ids=["under a file", "a file"])
def test_a_store_path_of_the_wrong_kind(tmp_path, store, match):
    """A regular file where the store or its parent goes: a configuration error before any work, not
    NotADirectoryError from the lease or the store."""
    (tmp_path / "plain").write_text("not a folder")
    refused(tmp_path, manifest(tmp_path, 1), match, store=str(tmp_path / store))
    assert (tmp_path / "plain").read_text() == "not a folder"


def test_a_store_that_cannot_be_written(tmp_path):
    """An OSError the up-front check cannot foresee (here: the lease's folder is a file) names the store."""
    from pipeline.run import run

    (tmp_path / "run.zarr").mkdir()
    (tmp_path / "run.zarr" / "lrp_audit_lease").write_text("in the way")
    config = config_from_dict(values(tmp_path, manifest(tmp_path, 1)))
    with pytest.raises(ConfigError, match=r"cannot write the store .*run.zarr': Not a directory"):
        run(config)


# ---- targets ------------------------------------------------------------------------------------------------------
def test_a_multi_label_list_with_a_label_outside_the_classes(tmp_path):
    """A -1 (or 7) in one image's labels: refused naming the image, not a failed shard that takes the good rows."""
    source = csv(tmp_path, f'path,labels\n{image(tmp_path, "a.png")},"[1, 2]"\n{image(tmp_path, "b.png")},"[0, -1]"\n')
    refused(tmp_path, source, r"image '.*b.png' has labels \[-1, 0\], not all among the model's 3 classes 0..2",
            targets="labels")


def test_a_label_repeated_in_an_images_labels_is_explained_once(tmp_path):
    """An image's labels are a set (pipeline/datasets.py reads them sorted, each once)."""
    source = csv(tmp_path, f'path,labels\n{image(tmp_path, "a.png")},"[2, 1, 2]"\n')
    plan = plan_run(config_from_dict(values(tmp_path, source, targets="labels")))
    assert plan.rows["target"].to_pylist() == [1, 2]


def test_a_class_listed_twice_in_classes(tmp_path):
    model = {"factory": FACTORY, "weights": save_weights(tmp_path / "w.pt"), "class_names": ["cat", "dog", "car"]}
    refused(tmp_path, manifest(tmp_path, 1), r"classes: class 1 \('dog'\) is listed twice", targets="classes",
            classes=["dog", 1], model=model)


# ---- explanation parameters out of range -------------------------------------------------------------------------
@pytest.mark.parametrize("setting, said", [
    ({"composite": "epsilon", "epsilon": -1}, "Epsilon: epsilon must be finite and >= 0, got -1.0"),
    ({"composite": "epsilon", "epsilon": float("nan")}, "Epsilon: epsilon must be finite and >= 0, got nan"),
    ({"composite": "epsilon", "include_bias": "false"}, "include_bias must be true or false, got 'false'"),
    ({"composite": "alpha_beta", "alpha": 2, "beta": 1, "stabilizer": -1}, "stabilizer must be finite and >= 0"),
    ({"composite": "epsilon_gamma_box", "gamma": -1, "low": -1, "high": 1}, "Gamma: gamma must be finite and >= 0"),
    ({"composite": "epsilon_gamma_box", "low": 1, "high": -1}, "ZBox: the box needs finite low <= high"),
], ids=["negative epsilon", "NaN epsilon", "quoted include_bias", "negative stabilizer", "negative gamma",
        "crossed box"])
def test_an_explanation_parameter_out_of_range(tmp_path, setting, said):
    """Each would have run: a negative or NaN epsilon as the exact z rule, ``"false"`` as true."""
    refused(tmp_path, manifest(tmp_path, 1), re.escape(said), explanations=[setting])
    with pytest.raises((ValueError, TypeError), match=re.escape(said)):  # the engine's own API refuses them too
        lrp.Explainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)),
                      **{k: v for k, v in setting.items()})


@pytest.mark.parametrize("spelled", ["epsilon:epsilon=1e-2", {"composite": "epsilon", "epsilon": "1e-2"}])
def test_an_exponent_number_names_the_same_group_as_its_decimal(tmp_path, spelled):
    config = config_from_dict(values(tmp_path, manifest(tmp_path, 2), explanations=[spelled]))
    assert config.explanations[0].name == "epsilon_epsilon=0.01"
    assert config.explanations[0].params == {"epsilon": 0.01}


def test_exponent_numbers_in_typed_fields_are_numbers(tmp_path):
    preprocess = {"resize": 16, "pad_to_square": True, "mean": ["5e-1", 0.5, 0.5], "std": [0.5, 0.5, "5e-1"]}
    config = config_from_dict(values(tmp_path, manifest(tmp_path, 2), preprocess=preprocess))
    assert config.preprocess.mean[0] == 0.5 and config.preprocess.std[2] == 0.5


def test_a_resume_with_another_spelling_of_the_same_paths(tmp_path, monkeypatch):
    source = manifest(tmp_path, 3)
    create_store(plan_run(config_from_dict(values(tmp_path, source))))
    monkeypatch.chdir(tmp_path)
    respelled = values(tmp_path, "./" + os.path.relpath(source, tmp_path))
    respelled["model"]["weights"] = "w.pt"  # values() saved the same weights again: the same digest
    store = create_store(plan_run(config_from_dict(respelled)))
    assert store.config["dataset"]["source"] == source  # the store keeps the spelling it was made with
    moved = values(tmp_path, source, targets="prediction")
    with pytest.raises(ConfigError, match="To resume it, run with the values it was made with"):
        create_store(plan_run(config_from_dict(moved)))
