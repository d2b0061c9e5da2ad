"""The demo end to end (reduced size): generate, train, explain on Ray, aggregate with Dask, report.

The finding is checked from the store itself, not from what the demo prints: the top flagged class is
the one that carries the planted stamp, and its relevance mass lies on the stamp.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregations.run import load
from jobs.demo import synthetic
from pipeline.store import STATUS_OK, open_store


def _stamp_share(store_url: str, group: str, target: int, box) -> float:
    """Mean over the class's explained images of the share of positive relevance inside the stamp box."""
    explanation = open_store(store_url).group(group)
    rows = explanation.rows()
    mine = np.flatnonzero((rows["status"].to_numpy() == STATUS_OK) & (rows["target"].to_numpy() == target)
                          & (rows["label"].to_numpy() == target))
    positive = np.maximum(explanation.relevance[mine].compute(), 0)
    x0, y0, x1, y1 = (int(v) for v in box)
    return float((positive[:, y0:y1, x0:x1].sum(axis=(1, 2)) / positive.sum(axis=(1, 2))).mean())


@pytest.mark.slow
def test_the_demo_finds_the_planted_tag(ray_cluster, tmp_path, capsys):
    from jobs.demo import main

    assert main(["--out", str(tmp_path), "--quick"]) == 0
    printed = capsys.readouterr().out
    report = tmp_path / "report.html"
    assert str(report) in printed and "Headline: class 'ring' is the top flagged class" in printed

    data = synthetic.load(tmp_path / "data")
    tag, box = data.spec.tag_class, data.tag_box
    names = data.class_names
    store, clean_store = str(tmp_path / "tagged.zarr"), str(tmp_path / "clean.zarr")
    group = open_store(store).group_names[0]
    assert open_store(store).group_names == ["epsilon_plus", "epsilon_0.01", "epsilon_100", "alpha1_beta0",
                                             "alpha2_beta1"]

    # the audit: the top flagged class is the tag class, flagged for a cue inside the stamp
    classes = sorted((r for r in load(str(tmp_path / "tagged.aggregates")).classes.to_pylist() if r["group"] == group),
                     key=lambda r: r["bias_rank"])
    top = classes[0]
    assert top["class_name"] == tag and top["flagged"] and "cue" in top["flag"]
    assert box[0] - 1 <= top["spot_x0"] < top["spot_x1"] <= box[2] + 1
    assert box[1] - 1 <= top["spot_y0"] < top["spot_y1"] <= box[3] + 1
    assert not any(r["flagged"] and "cue" in r["flag"] for r in classes[1:])

    # its relevance mass is at the tag: far more than the stamp's area, and far more than other classes put there
    area = (box[2] - box[0]) * (box[3] - box[1]) / data.spec.image_size ** 2
    share = _stamp_share(store, group, names.index(tag), box)
    assert share > 0.25 and share > 5 * area
    for other in names:
        if other != tag:
            assert _stamp_share(store, group, names.index(other), box) < 0.05
    # the model trained without the stamp looks at the rings instead (the comparison in the report)
    assert _stamp_share(clean_store, group, names.index(tag), box) < 0.05

    # the shortcut shows in the accuracies, and the report leads with the finding
    summary = json.loads((tmp_path / "demo.json").read_text())
    tagged = summary["accuracy"]["tagged"]
    assert tagged["swapped"]["predicted_as"][tag] > tagged["clean"]["predicted_as"][tag] + 0.3
    page = report.read_text(encoding="utf-8")
    assert page.index("Flagged: class <span class=\"cls\">ring</span>") < page.index('id="summary"')
    assert 'id="sweep"' in page and 'id="comparison"' in page
    assert Path(summary["report"]) == report
    # the shortcut table: the stamp-removed and stamp-moved accuracies are in the report
    assert "The planted cue and the model&#39;s dependence on it" in page or \
        "The planted cue and the model's dependence on it" in page
    for column in ("stamp removed", "stamp on the other classes"):
        assert column in page


def test_the_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    from jobs.demo import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "thesis.tex").write_text("keep me")
    assert main(["--out", str(tmp_path), "--quick"]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert (tmp_path / "data" / "thesis.tex").read_text() == "keep me"


@pytest.mark.parametrize("flags, said", [(["--epochs", "0"], "--epochs must be at least 1, got 0"),
                                         (["--train-per-class", "-5"], "--train-per-class must be at least 1, got -5"),
                                         (["--audit-per-class", "0"], "--audit-per-class must be at least 1, got 0")])
def test_the_demo_refuses_counts_below_one_before_any_work(tmp_path, capsys, flags, said):
    """0 was silently the default (``args.x or default``), a negative count a traceback after the data was made."""
    from jobs.demo import main

    assert main(["--out", str(tmp_path / "d"), "--quick", *flags]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_the_demo_refuses_an_out_under_a_file(tmp_path, capsys):
    from jobs.demo import main

    (tmp_path / "plain").write_text("a file")
    assert main(["--out", str(tmp_path / "plain" / "d"), "--quick"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
