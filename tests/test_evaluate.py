"""AOPC numbers against hand computations, the report section, and `lrp-audit evaluate` end to end on Ray."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from aggregations.aopc import aggregate_evaluation, aopc_per_row, load, mean_interval, summarize, t_quantile
from aggregations.report.evaluation import report_section
from pipeline.config import ConfigError
from pipeline.evaluation import (
    CURVE_SCHEMA, EvaluateActor, EvaluationJob, config_from_values, evaluate, plan_evaluation,
)

# the patch detector of test_perturbation: class 0 sees bright patches only; the Ray actors import it by name
FACTORY = "tests.helpers.models:patch_detector"


def curves_table(rows: list[tuple[int, str, str, list[float]]]) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(row=r, sample_id=r, path=f"{r}.png", target=0, label=0, prediction=0, method=m, status=s, error="",
              curve=c) for r, m, s, c in rows], schema=CURVE_SCHEMA)


# ---- AOPC by hand -----------------------------------------------------------------------------------------------
def test_aopc_equals_the_hand_computation():
    # the linear model of test_perturbation: f(x^(k)) = 18, 2, -2, -4, 0 -> (0 + 16 + 20 + 22 + 18) / 5 = 15.2
    assert aopc_per_row([[18, 2, -2, -4, 0], [3, 3, 3, 3, 3]]).tolist() == pytest.approx([15.2, 0.0])
    table = curves_table([
        (0, "lrp", "ok", [18, 2, -2, -4, 0]), (1, "lrp", "ok", [4, 0, 0, 0, 0]), (2, "lrp", "failed", []),
        (0, "random", "ok", [18, 18, 10, 2, 0]), (1, "random", "ok", [4, 4, 4, 0, 0]), (2, "random", "failed", []),
    ])
    result = summarize(table, ci="t")
    lrp_row, random_row = result.table.to_pylist()  # best first
    assert lrp_row["method"] == "lrp" and random_row["method"] == "random"
    # lrp: 15.2 and (0 + 4 * 4) / 5 = 3.2; random: (0 + 0 + 8 + 16 + 18) / 5 = 8.4 and (0 + 0 + 0 + 4 + 4) / 5 = 1.6
    assert lrp_row["aopc"] == pytest.approx(9.2) and random_row["aopc"] == pytest.approx(5.0)
    assert (lrp_row["n"], lrp_row["excluded"]) == (2, 1)
    half = 12.706204736 * np.std([15.2, 3.2], ddof=1) / math.sqrt(2)  # t(0.975, df=1)
    assert (lrp_row["ci_low"], lrp_row["ci_high"]) == pytest.approx((9.2 - half, 9.2 + half))
    # paired with random on the same rows: 15.2 - 8.4 = 6.8, 3.2 - 1.6 = 1.6
    assert lrp_row["vs_random"] == pytest.approx(4.2)
    half = 12.706204736 * np.std([6.8, 1.6], ddof=1) / math.sqrt(2)
    assert (lrp_row["vs_random_low"], lrp_row["vs_random_high"]) == pytest.approx((4.2 - half, 4.2 + half))
    # the mean curve of lrp and its running AOPC (mean declines (0 + 0) / 2, (16 + 4) / 2, 12, 13, 11)
    steps = result.curves.filter(pa.compute.equal(result.curves["method"], "lrp")).to_pydict()
    assert steps["mean_f"] == pytest.approx([11, 1, -1, -2, 0])
    assert steps["aopc_at_step"] == pytest.approx([0, 5, 22 / 3, 35 / 4, 46 / 5])  # the last one is the table's 9.2


def test_intervals():
    assert t_quantile(0.975, 4) == pytest.approx(2.776445105, abs=1e-8)
    assert t_quantile(0.975, 30) == pytest.approx(2.042272456, abs=1e-8)
    assert t_quantile(0.025, 10) == pytest.approx(-2.228138852, abs=1e-8)
    values = np.random.default_rng(0).normal(1.0, 2.0, 400)
    mean, low, high = mean_interval(values, "bootstrap", seed=3)
    assert mean == pytest.approx(values.mean())
    assert mean_interval(values, "bootstrap", seed=3) == (mean, low, high)  # seeded: reproducible
    _, t_low, t_high = mean_interval(values, "t")
    assert low == pytest.approx(t_low, abs=0.05) and high == pytest.approx(t_high, abs=0.05)  # they agree for n = 400
    assert math.isnan(mean_interval([1.0], "t")[1])
    with pytest.raises(ValueError, match="bootstrap, t"):
        mean_interval(values, "normal")


def test_report_section_from_written_curves(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for r in range(6):
        rows.append((r, "epsilon_plus", "ok", list(np.linspace(5, 0, 11) + rng.normal(0, 0.1, 11))))
        rows.append((r, "random", "ok", list(np.linspace(5, 4, 11) + rng.normal(0, 0.1, 11))))
    (tmp_path / "curves").mkdir()
    pq.write_table(curves_table(rows), tmp_path / "curves" / "shard-000000.parquet")
    assert load(str(tmp_path)) is None
    section = report_section(str(tmp_path))
    assert load(str(tmp_path)) is None  # computed for the report, not written into the evaluation
    assert section["figure_png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert section["figure_uri"].startswith("data:image/png;base64,")
    assert section["columns"][0] == "method" and [r[0] for r in section["rows"]] == ["epsilon_plus", "random"]
    assert "Better than a random order" in section["summary"] and "epsilon_plus" in section["summary"]
    assert section["records"][0]["ci"] == "bootstrap"
    aggregate_evaluation(str(tmp_path), ci="t")  # what `lrp-audit evaluate` writes; the report shows that one
    assert report_section(str(tmp_path))["records"][0]["ci"] == "t"
    assert report_section(str(tmp_path / "nothing-here")) is None and report_section(None) is None


# ---- end to end -------------------------------------------------------------------------------------------------
def patch_dataset(root: Path, per_class: int = 4, size: int = 32, patch: int = 8) -> str:
    """An ImageFolder of dark noisy images, each with one bright patch (left or right half: the class)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            y0 = int(rng.integers(0, size - patch))
            x0 = int(rng.integers(0, size // 2 - patch)) + c * size // 2
            pixels[y0:y0 + patch, x0:x0 + patch] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


def values(tmp_path: Path, **evaluation) -> dict:
    return {
        "dataset": patch_dataset(tmp_path / "data") if not (tmp_path / "data").exists() else str(tmp_path / "data"),
        "model": {"factory": FACTORY},
        "preprocess": {"resize": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        "explanations": ["epsilon_plus", "gradient"],
        "batch_size": 3, "rows_per_shard": 4, "num_actors": 1, "progress": False,
        "evaluation": {"out": str(tmp_path / "run.evaluation"), "region_size": 4, "steps": 12, **evaluation},
    }


def test_actor_in_process_writes_a_shard(tmp_path):
    config = config_from_values(values(tmp_path))
    plan = plan_evaluation(config)
    assert plan.rows.num_rows == 8 and plan.n_shards == 2
    assert config.perturbation.low == (-1.0, -1.0, -1.0) and config.perturbation.high == (1.0, 1.0, 1.0)
    report = EvaluateActor(EvaluationJob(config, plan.run.target_mode)).evaluate_shard(1, plan.shard_rows(1))
    assert report["rows"] == 4 and report["ok"] == 12 and report["failed"] == 0
    table = pq.read_table(tmp_path / "run.evaluation" / "curves" / "shard-000001.parquet").to_pydict()
    assert table["row"] == [4] * 3 + [5] * 3 + [6] * 3 + [7] * 3
    assert table["method"][:3] == ["epsilon_plus", "gradient", "random"]
    assert all(len(c) == 13 for c in table["curve"]) and table["prediction"] == table["target"] == [0] * 12
    assert os.listdir(tmp_path / "run.evaluation" / "curves") == ["shard-000001.parquet"]  # no temporary left


@pytest.mark.slow
def test_evaluate_on_ray_is_resumable_and_lrp_beats_random(ray_cluster, tmp_path, capsys):
    config = config_from_values(values(tmp_path))
    summary = evaluate(config)
    assert summary.exit_code == 0, summary.format()
    assert summary.counts == {"ok": 24, "failed": 0, "nonfinite": 0, "missing": 0} and summary.computed_rows == 8
    out = tmp_path / "run.evaluation"
    first = pq.read_table(out / "curves" / "shard-000000.parquet")
    result = aggregate_evaluation(str(out), ci="t")
    assert result.table["method"].to_pylist()[-1] == "random"
    for method in ("epsilon_plus", "gradient"):
        record = result.table.filter(pa.compute.equal(result.table["method"], method)).to_pylist()[0]
        assert record["aopc"] > 3 * result.aopc("random") and record["vs_random_low"] > 0, result.format()
    assert json.loads((out / "evaluation.json").read_text())["rows"] == 8

    # resume: only the missing shard is computed, and it comes out the same
    os.remove(out / "curves" / "shard-000000.parquet")
    again = evaluate(config)
    assert again.computed_rows == 4 and again.counts["ok"] == 24
    assert pq.read_table(out / "curves" / "shard-000000.parquet").equals(first)
    assert "nothing to do" in evaluate(config).messages[0]
    with pytest.raises(ConfigError, match="perturbation.region_size: 4 in the store, 8 now"):
        evaluate(config_from_values(values(tmp_path, region_size=8, steps=4)))

    # the CLI: same run, a sample of the rows, blur, into another directory
    from jobs.evaluate import main

    other = tmp_path / "cli.evaluation"
    code = main(["--dataset", str(tmp_path / "data"), "--factory", FACTORY, "--resize", "32", "32",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--method", "epsilon_plus",
                 "--region-size", "4", "--steps", "8", "--perturbation", "blur", "--sample", "5",
                 "--num-actors", "1", "--no-progress", "--out", str(other)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "epsilon_plus" in printed and "random" in printed and "AOPC" in printed
    assert load(str(other)).table["n"].to_pylist() == [5, 5]


def test_cli_config_errors_exit_2(tmp_path, capsys):
    from jobs.evaluate import main

    data = patch_dataset(tmp_path / "data")
    common = ["--dataset", data, "--factory", FACTORY, "--resize", "32", "32", "--out", str(tmp_path / "e")]
    assert main(common + ["--region-size", "8", "--steps", "17"]) == 2
    assert "only 16 regions of 8x8: lower steps or region_size" in capsys.readouterr().err
    assert main(common + ["--method", "random"]) == 2
    assert "always evaluated" in capsys.readouterr().err
    assert main(common + ["--method", "epsilon:gamma=2"]) == 2
    assert "does not use parameter(s) gamma" in capsys.readouterr().err
    for flag, value, message in (("--level", "1.5", "between 0 and 1"), ("--resamples", "0", "at least 1")):
        with pytest.raises(SystemExit) as exit_:
            main(common + [flag, value])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # the explain YAML with an `evaluation:` mapping; out defaults to beside the store
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"dataset": data, "model": {"factory": FACTORY}, "store": str(tmp_path / "x.zarr"),
                                      "preprocess": {"resize": [32, 32]}, "evaluation": {"region_sise": 4}}))
    assert main(["--config", str(config)]) == 2
    assert "unknown key(s) ['region_sise'] in evaluation; known keys: ['blur_sigma'," in capsys.readouterr().err
    config.write_text(config.read_text().replace("region_sise", "region_size"))
    assert main(["--config", str(config), "--steps", "65"]) == 2
    assert "only 64 regions of 4x4" in capsys.readouterr().err
    assert (tmp_path / "x.evaluation").exists() is False  # nothing is written before the plan is valid


@pytest.mark.parametrize("key, value, said", [("steps", "5", "steps must be an integer or unset, got the string '5'"),
                                              ("region_size", 4.5, "region_size must be an integer, got 4.5"),
                                              ("low", "0", "low must be a number or a list of numbers or unset"),
                                              ("sample_size", "all", "sample_size must be an integer or unset")])
def test_evaluation_values_of_the_wrong_type_are_refused(tmp_path, key, value, said):
    with pytest.raises(ConfigError, match=f"evaluation: {re.escape(said)}"):
        config_from_values(values(tmp_path, **{key: value}))


@pytest.mark.parametrize("evaluation, said", [
    ({"seed": -1}, "evaluation: seed must be >= 0, got -1"),
    ({"perturbation": "constant", "value": float("nan")}, "value (the constant perturbation) must be finite"),
    ({"perturbation": "blur", "blur_sigma": float("nan")}, "blur_sigma must be positive and finite"),
    ({"low": float("nan"), "high": 1.0}, "must be finite"),
    ({"low": 1.0, "high": -1.0}, "low 1.0 must not exceed high -1.0"),
], ids=["negative seed", "NaN value", "NaN blur", "NaN low", "crossed bounds"])
def test_evaluation_values_out_of_range_are_refused(tmp_path, evaluation, said):
    """Each passed planning before: every shard then failed (seed -1, recorded so that reruns failed too), or every
    curve was nonfinite."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        config_from_values(values(tmp_path, **evaluation))


def test_evaluation_bounds_of_another_channel_count_are_refused_in_planning(tmp_path):
    config = config_from_values(values(tmp_path, low=[0.0, 0.0], high=[1.0, 1.0]))
    with pytest.raises(ConfigError, match=r"low \(0.0, 0.0\) needs 1 value or 3 \(one per RGB channel\), got 2"):
        plan_evaluation(config)


@pytest.mark.parametrize("out, said", [("plain", "'.*plain' is a file, not a folder"),
                                       ("plain/ev", ".*plain/ev' cannot be used: '.*plain' is a file")],
                         ids=["a file", "under a file"])
def test_an_evaluation_out_of_the_wrong_kind_is_refused(tmp_path, out, said):
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(ConfigError, match=f"evaluation.out: {said}"):
        config_from_values({**values(tmp_path), "evaluation": {"out": str(tmp_path / out)}})


def test_the_text_table_names_the_interval_level_it_holds():
    """Before: the header said "95% CI" whatever ``--level`` was (the HTML report had it right)."""
    from aggregations.aopc import TABLE_SCHEMA, AopcResult
    row = {"method": "epsilon_plus", "setting": "", "n": 36, "excluded": 0, "aopc": 12.3, "ci_low": 11.8,
           "ci_high": 12.8, "vs_random": 5.0, "vs_random_low": 4.0, "vs_random_high": 6.0, "ci": "t"}
    for level, header in ((0.5, "50% CI"), (0.975, "97.5% CI"), (0.95, "95% CI")):
        table = pa.Table.from_pylist([{**row, "level": level}], schema=TABLE_SCHEMA)
        text = AopcResult(table, pa.table({})).format()
        assert text.splitlines()[0].count(header) == 2 and "95% CI" not in text.replace(header, ""), text
