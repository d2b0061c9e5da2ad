"""Hostile and odd inputs of the report side (docs/hostile-inputs.md): aggregate, report and spray.

Each case gets a clear refusal (exit 2, one line naming what to fix), a recomputation that says so, or a page that
says plainly what it could not do; never a traceback, stale numbers shown as current, or a green "nothing flagged"
for a run that audited nothing. Stores are tiny constructed ones (tests/helpers/stores.py): 8 rows of 4x4 maps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from aggregations import run
from aggregations.report import open_run
from aggregations.report.runs import AggregatesMismatch
from helpers.stores import make_store
from jobs.aggregate import main as aggregate_main
from jobs.report import main as report_main
from jobs.spray import main as spray_main
from pipeline.lease import StoreLease
from pipeline.paths import normalise_url
from pipeline.store import STATUS_FAILED, STATUS_OK, STATUS_PENDING, open_store

OK, FAILED, PENDING = STATUS_OK, STATUS_FAILED, STATUS_PENDING
TARGET = [0, 0, 0, 0, 1, 1, 1, 1]


def maps(n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 4, 4)).astype(np.float32)


def half_done(path: Path) -> str:
    """Shard 0 (rows 0-3) ok, shard 1 (rows 4-7) still pending: an explain run stopped half-way."""
    return make_store(path, maps(), target=TARGET, status=[OK] * 4 + [PENDING] * 4, class_names=["cat", "dog"])


def finish(url: str, status: int = OK, start: int = 4, n: int = 4) -> None:
    """What a resumed ``explain`` (or a ``--retry-failed`` run) does: rewrite the shard of rows ``[start, start+n)``
    (rows 4-7 by default, all of class 1) with its rows done."""
    store = open_store(url, "r+")
    relevance, target = maps(n, seed=1), np.ones(n, np.int64)
    store.group("lrp").write_block(start, relevance=relevance, status=np.full(n, status, np.int8), target=target,
                                   label=target, prediction=target, output=relevance.sum(axis=(1, 2)),
                                   sample_id=np.arange(start, start + n),
                                   path=np.array([f"img{i:03d}.png" for i in range(start, start + n)]))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ---- 1. stale aggregates ---------------------------------------------------------------------------------------

def test_report_recomputes_aggregates_older_than_the_store(tmp_path, capsys):
    url, out = half_done(tmp_path / "s.zarr"), tmp_path / "s.aggregates"
    assert aggregate_main([url, "--grid", "2x2"]) == 0
    before = summary(out)
    assert before["groups"]["lrp"]["ok"] == 4
    finish(url)  # explain resumed: 4 more ok rows
    capsys.readouterr()
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    assert "are older than the store" in printed and "4 -> 0 pending" in printed and "recomputed" in printed
    again = summary(out)
    assert again["groups"]["lrp"]["ok"] == 8
    assert again["regions"] == before["regions"] and len(again["regions"]["names"]) == 4  # the same 2x2 grid
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 0  # current now: used as they are
    assert "older" not in capsys.readouterr().out


def test_stale_aggregates_are_refused_where_they_may_not_be_recomputed(tmp_path):
    url = half_done(tmp_path / "s.zarr")
    run.aggregate(url)
    finish(url, status=FAILED)  # a --retry-failed run: same rows, other statuses
    with pytest.raises(AggregatesMismatch, match=r"older than the store .*4 -> 0 pending.*lrp-audit aggregate"):
        open_run(url, compute=False)


def test_aggregates_with_mask_regions_are_refused_when_stale(tmp_path, capsys):
    url = half_done(tmp_path / "s.zarr")
    masks = tmp_path / "m.npz"
    top = np.zeros((4, 4), bool)
    top[:2] = True
    np.savez(masks, top=top, bottom=~top)
    assert aggregate_main([url, "--masks", str(masks)]) == 0
    finish(url)
    capsys.readouterr()
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 2
    assert "lrp-audit aggregate" in capsys.readouterr().err and not (tmp_path / "r.html").exists()


def test_old_aggregates_without_a_store_state_are_used_with_a_note(tmp_path, capsys):
    """As before: not rewritten (their folder may be read-only), also after the run folder moved."""
    url, out = half_done(tmp_path / "old" / "s.zarr"), tmp_path / "old" / "s.aggregates"
    run.aggregate(url)
    old = summary(out)
    del old["store_state"], old["store_location"]  # as lrp-audit wrote them before
    (out / "summary.json").write_text(json.dumps(old))
    (tmp_path / "old").rename(tmp_path / "new")
    url, out = str(tmp_path / "new" / "s.zarr"), tmp_path / "new" / "s.aggregates"
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 0
    assert "did not record the store's state: whether they are current cannot be told" in capsys.readouterr().out
    assert "store_state" not in summary(out)


def test_spray_results_older_than_the_store_are_left_out_of_the_report(tmp_path, capsys):
    url = make_store(tmp_path / "s.zarr", maps(16), target=[0] * 8 + [1] * 8, rows_per_shard=8)
    spray_options = ["--quiet", "--min-rows", "6", "--neighbors", "3", "--embedding", "none"]
    assert spray_main([url, *spray_options]) == 0
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 0
    assert 'id="spray"' in (tmp_path / "r.html").read_text()
    finish(url, status=FAILED, start=8, n=8)  # class 1's rows failed on a retry
    capsys.readouterr()
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    assert "SpRAy results" in printed and "older than the store" in printed and "not shown" in printed
    assert 'id="spray"' not in (tmp_path / "r.html").read_text()


# ---- 2. another store's aggregates -------------------------------------------------------------------------------

def test_report_refuses_another_stores_aggregates(tmp_path, capsys):
    a = half_done(tmp_path / "a.zarr")
    b = make_store(tmp_path / "b.zarr", maps(seed=3), target=TARGET, class_names=["cat", "dog"])
    run.aggregate(a)
    assert report_main([b, "--aggregates", str(tmp_path / "a.aggregates"), "--out", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err
    assert "were made from" in error and "a.zarr', not" in error and "b.zarr" in error
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("spelling", ["relative", "trailing slash", "file URL"])
def test_the_same_store_spelled_another_way_is_the_same_store(tmp_path, monkeypatch, spelling):
    url = half_done(tmp_path / "s.zarr")
    run.aggregate(url)
    monkeypatch.chdir(tmp_path)
    other = {"relative": "s.zarr", "trailing slash": f"{url}/", "file URL": f"file://{url}"}[spelling]
    assert normalise_url(other) == normalise_url(url)
    assert open_run(other, str(tmp_path / "s.aggregates"), compute=False).aggregates.summary["groups"]["lrp"]["ok"] == 4


# ---- 3. the write lease -----------------------------------------------------------------------------------------

def test_report_and_spray_refuse_a_store_being_written_unless_asked(tmp_path, capsys):
    url = half_done(tmp_path / "s.zarr")
    with StoreLease(url, owner="explain-run"):
        assert report_main([url, "--out", str(tmp_path / "r.html")]) == 2
        assert "being written by explain-run" in capsys.readouterr().err and not (tmp_path / "r.html").exists()
        assert spray_main([url, "--quiet"]) == 2
        assert "being written by explain-run" in capsys.readouterr().err
        assert not (tmp_path / "s.aggregates" / "spray").exists()
        assert report_main([url, "--out", str(tmp_path / "r.html"), "--while-writing"]) == 0
        assert "note: reported while the store was being written" in capsys.readouterr().out
        assert spray_main([url, "--quiet", "--while-writing", "--embedding", "none"]) == 0
        assert "note: analysed while the store was being written by explain-run" in capsys.readouterr().out
        # aggregate --spray --while-writing hands the flag on to the spray it chains
        assert aggregate_main([url, "--while-writing", "--spray"]) == 0
        assert "note: analysed while" in capsys.readouterr().out


# ---- 4. nothing ok ---------------------------------------------------------------------------------------------

def test_a_store_without_an_ok_row_says_nothing_could_be_audited(tmp_path, capsys):
    url = make_store(tmp_path / "s.zarr", maps(), target=TARGET, status=[FAILED] * 4 + [PENDING] * 4)
    assert aggregate_main([url]) == 0
    printed = capsys.readouterr().out
    assert "nothing could be audited: 0 ok rows of 8" in printed and "no class flagged" not in printed
    assert report_main([url, "--out", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    assert "nothing could be audited in 'lrp': 0 ok rows of 8 (4 failed, 4 pending)" in printed
    assert "no class is flagged" not in printed
    page = (tmp_path / "r.html").read_text()
    assert "Nothing could be audited" in page and "No class is flagged" not in page
    assert 'class="headline clear"' not in page and '<p class="good">None.</p>' not in page


# ---- 5. paths that are files or folders --------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["aggregate store is a file", "report store is a file", "spray store is a file",
                                  "store inside a file", "aggregate --out is a file", "spray --out is a file",
                                  "report --out is a folder", "report --out inside a file",
                                  "report --aggregates is a file"])
def test_a_path_of_the_wrong_kind_exits_2_with_one_line(tmp_path, capsys, case):
    url = half_done(tmp_path / "s.zarr")
    file, folder = tmp_path / "file.txt", tmp_path / "folder"
    file.write_text("not a store")
    folder.mkdir()
    job, argv, said = {
        "aggregate store is a file": (aggregate_main, [str(file)], "is a file, not a relevance store"),
        "report store is a file": (report_main, [str(file)], "is a file, not a relevance store"),
        "spray store is a file": (spray_main, [str(file)], "is a file, not a relevance store"),
        "store inside a file": (report_main, [str(file / "s.zarr")], "is a file, not a folder"),
        "aggregate --out is a file": (aggregate_main, [url, "--out", str(file)], "is a file, not a folder"),
        "spray --out is a file": (spray_main, [url, "--out", str(file)], "is a file, not a folder"),
        "report --out is a folder": (report_main, [url, "--out", str(folder)], "is a folder, not a file"),
        "report --out inside a file": (report_main, [url, "--out", str(file / "r.html")], "is a file, not a folder"),
        "report --aggregates is a file": (report_main, [url, "--aggregates", str(file)], "is a file, not a folder"),
    }[case]
    assert job(argv) == 2
    error = capsys.readouterr().err
    assert said in error and error.count("\n") == 1 and "Traceback" not in error


# ---- 6. spray and bias options out of range ------------------------------------------------------------------------

def test_spray_clusters_above_a_class_rows_is_clamped_with_a_note(tmp_path, capsys):
    url = make_store(tmp_path / "s.zarr", maps(16), target=[0] * 8 + [1] * 8, rows_per_shard=8)
    assert spray_main([url, "--quiet", "--clusters", "50", "--min-rows", "6", "--neighbors", "3",
                       "--embedding", "none"]) == 0
    assert "--clusters 50 is more than its 8 ok rows" in capsys.readouterr().out
    classes = pq.read_table(tmp_path / "s.aggregates" / "spray" / "classes.parquet").to_pylist()
    for row in classes:
        assert row["chosen_by"] == "given (clamped from 50)" and 1 <= row["n_clusters"] <= 6
        assert np.isfinite(row["eigengap"]) and np.isfinite(row["split_score"])


@pytest.mark.parametrize("value", ["5", "0", "-0.5", "nan"])
def test_peak_fraction_out_of_range_is_refused_naming_the_option(tmp_path, capsys, value):
    url = make_store(tmp_path / "s.zarr", maps(), target=TARGET)
    assert aggregate_main([url, "--peak-fraction", value]) == 2
    error = capsys.readouterr().err
    assert f"peak_fraction (--peak-fraction) is a fraction of the peak, in (0, 1], not {float(value)}" in error
    assert not (tmp_path / "s.aggregates").exists()


def zeta_ok_alpha_failed(path: Path, n: int = 8) -> str:
    """Two groups, ``zeta`` first (not first by name): every row of zeta ok, every row of alpha failed."""
    target = np.asarray((TARGET * (n // 8 + 1))[:n])
    url = make_store(path, maps(n), target=target, group=["zeta", "alpha"], rows_per_shard=n)
    relevance = maps(n)
    open_store(url, "r+").group("alpha").write_block(
        0, relevance=relevance, status=np.full(n, FAILED, np.int8), target=target, label=target, prediction=target,
        output=relevance.sum(axis=(1, 2)), sample_id=np.arange(n), path=np.array([f"img{i:03d}.png" for i in range(n)]))
    return url


def test_spray_and_the_virelay_export_of_a_group_without_an_ok_row(tmp_path, capsys):
    from jobs.export_virelay import main as export_main

    url = zeta_ok_alpha_failed(tmp_path / "s.zarr", 16)
    assert spray_main([url, "--quiet", "--min-rows", "6", "--neighbors", "3", "--embedding", "none"]) == 0
    assert "[alpha] class 0 (class0): no_rows (0 ok rows of 8" in capsys.readouterr().out
    assert export_main([url, str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert "[alpha] 0 clustered classes" in printed and "[zeta] 2 clustered classes" in printed


def test_the_headline_leads_with_the_stores_first_group_as_the_page_does(tmp_path):
    """summary.json lists groups sorted by name; the terminal headline must still describe the page's group."""
    from aggregations.report import headline_text

    url = zeta_ok_alpha_failed(tmp_path / "s.zarr")
    run.aggregate(url)
    assert list(summary(tmp_path / "s.aggregates")["groups"]) == ["alpha", "zeta"]
    assert "nothing could be audited" not in headline_text(url)
    assert "nothing could be audited in 'alpha'" in headline_text(url, group="alpha")


# ---- export-virelay ------------------------------------------------------------------------------------------------
def sprayed(path: Path) -> str:
    url = make_store(path, maps(16), target=[0] * 8 + [1] * 8, rows_per_shard=8)
    assert spray_main([url, "--quiet", "--min-rows", "6", "--neighbors", "3", "--embedding", "none"]) == 0
    return url


def test_export_refuses_spray_results_older_than_the_store_or_of_another_store(tmp_path, capsys):
    from jobs.export_virelay import main as export_main

    url = sprayed(tmp_path / "a.zarr")
    other = make_store(tmp_path / "b.zarr", maps(16)[::-1], target=[0] * 8 + [1] * 8, rows_per_shard=8)
    capsys.readouterr()
    assert export_main([other, str(tmp_path / "vb"), "--spray", str(tmp_path / "a.aggregates")]) == 2
    error = capsys.readouterr().err
    assert "were made from" in error and not (tmp_path / "vb").exists()
    assert f"--out {tmp_path / 'a.aggregates'}" not in error  # that rerun would overwrite a.zarr's results
    finish(url, status=FAILED, start=0, n=8)  # class 0's rows failed on a retry, after the SpRAy run
    assert export_main([url, str(tmp_path / "va")]) == 2
    error = capsys.readouterr().err
    assert "16 -> 8 ok, 0 -> 8 failed" in error and "run 'lrp-audit spray" in error


def test_export_refuses_classes_the_store_has_not_and_out_paths_of_the_wrong_kind(tmp_path, capsys):
    from jobs.export_virelay import main as export_main

    url = sprayed(tmp_path / "a.zarr")
    (tmp_path / "plain").write_text("a file")
    capsys.readouterr()
    assert export_main([url, str(tmp_path / "v"), "--classes", "7"]) == 2
    assert "--classes [7]: no row of the store has such a target (targets: 0, 1)" in capsys.readouterr().err
    for out in ("plain", "plain/v"):
        assert export_main([url, str(tmp_path / out)]) == 2
        assert "is a file" in capsys.readouterr().err


# ---- outputs that would land among other files ---------------------------------------------------------------------
@pytest.mark.parametrize("job", ["aggregate", "spray", "export-virelay"])
def test_an_output_folder_of_other_files_or_inside_the_store_is_refused(tmp_path, capsys, job):
    from jobs.export_virelay import main as export_main

    if job == "export-virelay":
        url = sprayed(tmp_path / "a.zarr")
    else:
        url = make_store(tmp_path / "a.zarr", maps(16), target=[0] * 8 + [1] * 8, rows_per_shard=8)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"not ours")
    run_job = {"aggregate": lambda out: aggregate_main([url, "--out", out]),
               "spray": lambda out: spray_main([url, "--out", out, "--quiet"]),
               "export-virelay": lambda out: export_main([url, out])}[job]
    capsys.readouterr()
    assert run_job(str(photos)) == 2
    assert "holds other files (cat.jpg)" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"]
    assert run_job(str(tmp_path / "a.zarr" / "out")) == 2
    assert "inside the store" in capsys.readouterr().err and not (tmp_path / "a.zarr" / "out").exists()
    if job == "aggregate":  # a folder that aggregate wrote before is written again
        assert run_job(str(tmp_path / "mine")) == 0 and run_job(str(tmp_path / "mine")) == 0


def test_the_report_does_not_overwrite_a_file_that_is_not_a_report(tmp_path, capsys):
    url = make_store(tmp_path / "a.zarr", maps(16), target=[0] * 8 + [1] * 8, rows_per_shard=8)
    script = tmp_path / "analysis.py"
    script.write_text("print('my work')\n")
    assert report_main([url, "--out", str(script)]) == 2
    assert "is not an lrp-audit report" in capsys.readouterr().err
    assert script.read_text() == "print('my work')\n"
    out = tmp_path / "r.html"
    assert report_main([url, "--out", str(out)]) == 0 and report_main([url, "--out", str(out)]) == 0  # its own
