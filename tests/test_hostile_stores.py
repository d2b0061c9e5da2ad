"""Damaged and odd relevance stores given to the read side: aggregate, report, spray and export-virelay.

A store can be damaged after it was written: a zarr.json deleted, truncated or edited, a chunk or shard object
deleted, truncated or overwritten, arrays of different lengths. zarr reads a missing chunk as the array's fill value
(NaN relevance, -1 target, pending status), so without checks such a store would be audited as it reads. Each case
ends in exit status 2 with one line naming the store and what is wrong, nothing written; or, where the store is
still what its format allows, in an audit of what it holds (the contracts at the end). Stores are tiny constructed
ones (tests/helpers/stores.py): 16 rows of 4x4 maps in two shards of 8, rows 0-7 class 0, rows 8-15 class 1.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers.stores import make_store
from jobs.aggregate import main as aggregate_main
from jobs.export_virelay import main as export_main
from jobs.report import main as report_main
from jobs.spray import main as spray_main
from pipeline.store import STATUS_OK, open_store

GROUP = "explanations/lrp"
SPRAY = ["--quiet", "--min-rows", "6", "--neighbors", "3", "--embedding", "none"]


def maps(n: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 4, 4)).astype(np.float32)


def store(path: Path, **kwargs) -> Path:
    make_store(path, maps(), target=[0] * 8 + [1] * 8, rows_per_shard=8, class_names=["cat", "dog"], **kwargs)
    return path


def edit(path: Path, change) -> None:
    """Rewrite the JSON document at ``path`` with ``change(document)`` applied."""
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def refused(capsys, job, argv, said: str, outputs: Path | None = None) -> str:
    """``job(argv)`` exits 2 with one line that says ``said``, no traceback, and writes no finished outputs."""
    assert job(argv) == 2
    error = capsys.readouterr().err
    assert said in error, error
    assert error.count("\n") == 1 and "Traceback" not in error, error
    if outputs is not None:
        assert not (outputs / "summary.json").exists()
    return error


def rewrite(url: Path, name: str, rows: slice, values) -> None:
    """Overwrite rows of one array in place, bypassing ``write_block`` (what an edit of the store by hand does)."""
    array = zarr.open_group(str(url), mode="r+")[f"{GROUP}/{name}"]
    data = array[...]
    data[rows] = values
    array[...] = data


# ---- not a store ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["random files", "zarr v2", "zarr v3 array"])
def test_a_folder_that_is_not_a_store_says_what_it_is(tmp_path, capsys, case):
    path = tmp_path / "s.zarr"
    if case == "random files":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
        said = "is a folder without a zarr.json (notes.txt): not an lrp-audit relevance store"
    elif case == "zarr v2":
        zarr.open_group(str(path), mode="w", zarr_format=2).create_array("x", shape=(4,), dtype="f4")
        said = "is a Zarr v2 store, not an lrp-audit relevance store"
    else:
        zarr.create_array(str(path), shape=(4,), dtype="f4")
        said = "is a Zarr array, not an lrp-audit relevance store"
    for job in (aggregate_main, report_main, spray_main):
        refused(capsys, job, [str(path)], said)
    assert not (tmp_path / "s.aggregates").exists()


# ---- the root zarr.json ---------------------------------------------------------------------------------------

ROOT_DAMAGE = {
    "truncated": (lambda p: p.write_text(p.read_text()[:100]), "its zarr.json cannot be read (JSONDecodeError"),
    "format 0": (lambda p: edit(p, lambda d: d["attributes"].update(lrp_audit_format=0)),
                 "has format 0, not a format version"),
    "format 'one'": (lambda p: edit(p, lambda d: d["attributes"].update(lrp_audit_format="one")),
                     "has format 'one', not a format version"),
    "layout missing": (lambda p: edit(p, lambda d: d["attributes"].pop("layout")),
                       "root attribute 'layout' is missing"),
    "no groups": (lambda p: edit(p, lambda d: d["attributes"]["layout"].update(groups=[])),
                  "layout 'groups' is [], not a list of group names"),
    "class names a string": (lambda p: edit(p, lambda d: d["attributes"].update(class_names="catdog")),
                             "'class_names' is 'catdog', not a list of names"),
    "n_rows edited": (lambda p: edit(p, lambda d: d["attributes"]["layout"].update(n_rows=8)),
                      "'explanations/lrp/relevance' has shape (16, 4, 4), the store's layout says (8, 4, 4)"),
    "a group of the layout missing": (lambda p: edit(p, lambda d: d["attributes"]["layout"]["groups"].append("b")),
                                      "the group 'explanations/b' of its layout is missing"),
}


@pytest.mark.parametrize("case", list(ROOT_DAMAGE))
def test_a_damaged_root_zarr_json_exits_2_naming_the_store(tmp_path, capsys, case):
    url = store(tmp_path / "s.zarr")
    damage, said = ROOT_DAMAGE[case]
    damage(url / "zarr.json")
    error = refused(capsys, aggregate_main, [str(url)], said, tmp_path / "s.aggregates")
    assert str(url) in error
    refused(capsys, spray_main, [str(url)] + SPRAY, said, tmp_path / "s.aggregates" / "spray")


# ---- an array's zarr.json ---------------------------------------------------------------------------------------

def _set(**values):
    return lambda p: edit(p, lambda d: d.update(values))


ARRAY_DAMAGE = {
    "relevance zarr.json deleted": ("relevance", Path.unlink, "the array 'explanations/lrp/relevance' is missing"),
    "relevance shorter": ("relevance", _set(shape=[8, 4, 4]),
                          "has shape (8, 4, 4), the store's layout says (16, 4, 4)"),
    "relevance float64": ("relevance", _set(data_type="float64"), "has data type float64, the store's format says "
                                                                  "float32"),
    "target float64": ("target", _set(data_type="float64", fill_value=-1.0), "has data type float64"),
    "status fill value ok": ("status", _set(fill_value=1), "has fill value 1, the store's format says 0"),
    "relevance fill value 0": ("relevance", _set(fill_value=0.0), "has fill value 0.0, the store's format says nan"),
    "status truncated": ("status", lambda p: p.write_text(p.read_text()[:50]),
                         "explanations/lrp/status/zarr.json cannot be read"),
}


@pytest.mark.parametrize("case", list(ARRAY_DAMAGE))
def test_an_array_that_is_not_what_the_layout_makes_is_refused(tmp_path, capsys, case):
    """Before: an AttributeError or IndexError traceback (relevance missing or shorter), or a silent audit of other
    numbers (float32 bytes read as float64; a missing status chunk read as ok; a missing map read as zeros)."""
    url = store(tmp_path / "s.zarr")
    name, damage, said = ARRAY_DAMAGE[case]
    damage(url / GROUP / name / "zarr.json")
    refused(capsys, aggregate_main, [str(url)], said, tmp_path / "s.aggregates")
    refused(capsys, report_main, [str(url), "--out", str(tmp_path / "r.html")], said)
    assert not (tmp_path / "r.html").exists()


def test_groups_of_different_lengths_are_refused(tmp_path, capsys):
    url = tmp_path / "s.zarr"
    make_store(url, maps(), target=[0] * 8 + [1] * 8, rows_per_shard=8, group=["a", "b"])
    edit(url / "explanations/b/output/zarr.json", lambda d: d.update(shape=[8]))
    refused(capsys, aggregate_main, [str(url)], "'explanations/b/output' has shape (8,), the store's layout says (16,)")


# ---- chunk and shard objects ------------------------------------------------------------------------------------

def test_a_missing_relevance_shard_is_refused_not_audited(tmp_path, capsys):
    """Before: its 8 ok rows were read as NaN maps and aggregated ("16 of 16 rows aggregated"), clustered by spray
    as zero maps, and exported to ViRelAy as NaN."""
    url = store(tmp_path / "s.zarr")
    assert spray_main([str(url)] + SPRAY) == 0  # SpRAy results of the store before the damage
    assert export_main([str(url), str(tmp_path / "v")]) == 0  # and its export, which a refused one must not touch
    before = {path.name: path.read_bytes() for path in (tmp_path / "v").iterdir()}
    capsys.readouterr()
    (url / GROUP / "relevance/c/1/0/0").unlink()
    said = ("8 row(s) with status ok but no finite relevance map (NaN: its shard object or inner chunk is missing, or "
            "holds NaN): rows 8, 9, 10, 11, 12, ... (shard 1: its object 'explanations/lrp/relevance/c/1/0/0' is "
            "missing)")
    refused(capsys, aggregate_main, [str(url)], said, tmp_path / "s.aggregates")
    refused(capsys, report_main, [str(url), "--out", str(tmp_path / "r.html")], said)
    # the export's SpRAy results still match the store's status and sums: the maps themselves are checked
    refused(capsys, export_main, [str(url), str(tmp_path / "v")], said)
    assert {path.name: path.read_bytes() for path in (tmp_path / "v").iterdir()} == before  # no partial file left
    refused(capsys, export_main, [str(url), str(tmp_path / "w")], said)
    assert not list((tmp_path / "w").iterdir())
    shutil.rmtree(tmp_path / "s.aggregates")
    refused(capsys, spray_main, [str(url)] + SPRAY, said, tmp_path / "s.aggregates" / "spray")


def test_an_export_of_groups_whose_file_names_clash_is_refused(tmp_path, capsys):
    """Group names become file names with every character outside [A-Za-z0-9_.-] made '_': before, the second of
    'a=b' and 'a_b' silently overwrote the first's attribution, analysis and project files."""
    url = tmp_path / "s.zarr"
    make_store(url, maps(), target=[0] * 8 + [1] * 8, rows_per_shard=8, class_names=["cat", "dog"],
               group=["a=b", "a_b"])
    assert spray_main([str(url)] + SPRAY) == 0
    capsys.readouterr()
    refused(capsys, export_main, [str(url), str(tmp_path / "v")], "groups ['a=b', 'a_b'] share the file name 'a_b'")
    assert not (tmp_path / "v").exists()
    assert export_main([str(url), str(tmp_path / "v"), "--group", "a=b"]) == 0


@pytest.mark.parametrize("name", ["status", "target", "relevance_sum"])
def test_a_truncated_chunk_of_a_row_array_exits_2_naming_the_object(tmp_path, capsys, name):
    """Before: a ``RuntimeError: Zstd decompression error`` traceback."""
    url = store(tmp_path / "s.zarr")
    chunk = url / GROUP / name / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:5])
    said = f"the object 'explanations/lrp/{name}/c/1' cannot be read (RuntimeError: Zstd decompression error"
    refused(capsys, aggregate_main, [str(url)], said, tmp_path / "s.aggregates")
    refused(capsys, spray_main, [str(url)] + SPRAY, said)


def test_an_overwritten_inner_chunk_under_an_intact_shard_index_exits_2(tmp_path, capsys):
    """The shard index (and its checksum) intact, an inner chunk's zstd frame overwritten: before, a RuntimeError
    traceback from the shard reader."""
    url = store(tmp_path / "s.zarr")
    shard = url / GROUP / "relevance/c/1/0/0"
    data = bytearray(shard.read_bytes())
    data[0:8] = b"\xff" * 8  # the first inner chunk's zstd magic number
    shard.write_bytes(bytes(data))
    refused(capsys, aggregate_main, [str(url)], "shard 'explanations/lrp/relevance/c/1/0/0' cannot be read",
            tmp_path / "s.aggregates")


METADATA_LOST = {  # the chunk of rows 8-15 deleted: read as the fill value
    "target": "8 row(s) with status ok but no target (a negative one): rows 8, 9, 10, 11, 12, ... (shard 1: its "
              "object 'explanations/lrp/target/c/1' is missing)",
    "output": "8 row(s) with status ok but no finite output f(x) where the other ok rows have one",
    "sample_id": "8 row(s) with status ok but no sample id where the other ok rows have one",
    "prediction": "8 row(s) with status ok but no prediction where the other ok rows have one",
}


@pytest.mark.parametrize("name", list(METADATA_LOST))
def test_a_deleted_chunk_of_a_row_array_is_refused_not_read_as_fill_values(tmp_path, capsys, name):
    """Before: aggregated silently, class 1 gone (target -1), scores NaN (output) or rows without an image id."""
    url = store(tmp_path / "s.zarr")
    (url / GROUP / name / "c" / "1").unlink()
    refused(capsys, aggregate_main, [str(url)], METADATA_LOST[name], tmp_path / "s.aggregates")
    refused(capsys, spray_main, [str(url)] + SPRAY, METADATA_LOST[name])


@pytest.mark.parametrize("code", [7, -1])
def test_a_status_that_is_no_status_code_is_refused(tmp_path, capsys, code):
    """Before: "12 of 16 rows aggregated (4 excluded: 0 failed, 0 nonfinite, 0 pending)"."""
    url = store(tmp_path / "s.zarr")
    rewrite(url, "status", slice(8, 12), code)
    refused(capsys, aggregate_main, [str(url)], f"4 row(s) with a status that is no status code ([{code}]; 0 pending, "
                                                "1 ok, 2 failed, 3 nonfinite): rows 8, 9, 10, 11")


def test_a_map_that_does_not_add_up_to_its_relevance_sum_is_refused(tmp_path, capsys):
    """relevance_sum and residual edited together (they still agree with the output): only the map's own sum can
    tell. Before: audited, "0 rows whose regions do not add up"."""
    url = store(tmp_path / "s.zarr")
    group = open_store(str(url)).group("lrp")
    total, output = group.read("relevance_sum"), group.read("output")
    total[8:12] += 100.0
    rewrite(url, "relevance_sum", slice(None), total)
    rewrite(url, "residual", slice(None), total - output)
    said = "4 row(s) with status ok but a relevance map that does not add up to its stored relevance_sum: rows 8, 9"
    refused(capsys, aggregate_main, [str(url)], said, tmp_path / "s.aggregates")
    refused(capsys, spray_main, [str(url)] + SPRAY, said)


def test_an_ok_row_whose_map_has_nan_is_refused(tmp_path, capsys):
    """A NaN pixel in an ok row (written by hand: ``write_block`` stores such a row as nonfinite). Before: audited,
    its regions NaN, and spray pooled the NaN as 0."""
    url = store(tmp_path / "s.zarr")
    relevance = maps()
    relevance[9, 0, 0] = np.nan
    zarr.open_group(str(url), mode="r+")[f"{GROUP}/relevance"][...] = relevance
    said = "1 row(s) with status ok but no finite relevance map"
    refused(capsys, aggregate_main, [str(url)], said, tmp_path / "s.aggregates")
    refused(capsys, spray_main, [str(url)] + SPRAY, said)


# ---- what the format allows: audited as it is ------------------------------------------------------------------

def test_a_deleted_status_chunk_reads_as_pending_and_is_counted(tmp_path, capsys):
    """What a writer killed after it cleared a shard's status leaves (docs/store-format.md): the rows are pending,
    excluded and counted, and a resumed explain run recomputes the shard."""
    url = store(tmp_path / "s.zarr")
    (url / GROUP / "status/c/1").unlink()
    assert aggregate_main([str(url)]) == 0
    printed = capsys.readouterr().out
    assert "8 of 16 rows aggregated" in printed and "(8 excluded: 0 failed, 0 nonfinite, 8 pending)" in printed
    assert open_store(str(url)).group("lrp").pending_shards() == [1]


def test_ok_rows_with_all_zero_maps_written_consistently_are_audited(tmp_path, capsys):
    """A zero map is a possible explanation (it adds up to relevance_sum 0): audited, not taken for damage; zarr never
    reads a missing map as zeros (its fill value is NaN, checked when the store is opened)."""
    relevance = maps()
    relevance[8:12] = 0.0
    url = tmp_path / "s.zarr"
    make_store(url, relevance, target=[0] * 8 + [1] * 8, rows_per_shard=8, output=np.ones(16))
    assert aggregate_main([str(url)]) == 0
    assert "16 of 16 rows aggregated" in capsys.readouterr().out


def test_a_read_only_store_is_read_and_the_outputs_go_where_asked(tmp_path, capsys):
    """Every read side command opens the store read-only (a root user is not stopped by the modes: then this checks
    only that nothing needs to be written into the store)."""
    url = store(tmp_path / "ro" / "s.zarr")
    for path in [url, *url.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        assert aggregate_main([str(url), "--out", str(tmp_path / "agg")]) == 0
        assert spray_main([str(url), "--out", str(tmp_path / "agg")] + SPRAY) == 0
        assert report_main([str(url), "--aggregates", str(tmp_path / "agg"), "--out", str(tmp_path / "r.html")]) == 0
        assert (tmp_path / "r.html").exists()
        assert open_store(str(url)).group("lrp").status.tolist() == [STATUS_OK] * 16
    finally:
        for path in [url, *url.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
