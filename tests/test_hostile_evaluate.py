"""Hostile inputs of ``lrp-audit evaluate`` and ``lrp-audit demo``, through their command lines.

Each is refused before any work: exit 2, one line on stderr, no traceback, nothing written. The work itself is
replaced by a ``pytest.fail`` (``_prepare_output`` writes evaluation.json and starts the shards; ``generate_data``
is the demo's first step), so a case that slips through planning fails here without starting Ray.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FACTORY = "tests.helpers.models:patch_detector"  # the two-class patch detector of tests/test_evaluate.py


def _dataset(root: Path) -> str:
    """An ImageFolder of two classes, two 32x32 RGB images each."""
    if not root.exists():
        rng = np.random.default_rng(0)
        for name in ("left", "right"):
            (root / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def _refused(capsys, code: int, said: str) -> str:
    """The one stderr line of a refusal (exit 2), which must contain ``said``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert said in lines[0], lines[0]
    return lines[0]


def _evaluate(tmp_path: Path, monkeypatch, *flags: str, out: Path | None = None) -> int:
    import pipeline.evaluation
    from jobs.evaluate import main

    monkeypatch.setattr(pipeline.evaluation, "_prepare_output",
                        lambda plan: pytest.fail("planning passed: the evaluation would start"))
    out = out or tmp_path / "e"
    return main(["--dataset", _dataset(tmp_path / "data"), "--factory", FACTORY, "--resize", "32", "32",
                 "--method", "gradient", "--region-size", "8", "--steps", "4", "--out", str(out), *flags])


@pytest.mark.parametrize("flags", [["--per-channel"], ["--retry-failed"], ["--decode-workers", "1"]],
                         ids=lambda flags: flags[0])
def test_evaluate_refuses_the_explain_only_options(tmp_path, monkeypatch, capsys, flags):
    """Hidden in evaluate's help and unused by its actors. Before, --decode-workers was accepted, ignored, and still
    checked against --cpus-per-actor: a configuration error about an option evaluate's help never shows."""
    code = _evaluate(tmp_path, monkeypatch, *flags)
    _refused(capsys, code, f"configuration error: {flags[0]} is an explain option; lrp-audit evaluate does not use it")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--seed", "-1", "--sample", "2"]],
                         ids=["seed -1", "seed -1 with --sample 2"])
def test_evaluate_refuses_a_negative_seed(tmp_path, monkeypatch, capsys, flags):
    """Before: planned, then every shard failed ("expected non-negative integer") with seed -1 recorded in
    evaluation.json, so reruns failed the same way; with --sample, a ValueError traceback from the sampling."""
    code = _evaluate(tmp_path, monkeypatch, *flags)
    _refused(capsys, code, "configuration error: evaluation: seed must be >= 0, got -1")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags, said", [
    (["--perturbation", "constant", "--value", "nan"], "value (the constant perturbation) must be finite, got nan"),
    (["--perturbation", "constant", "--value", "inf"], "value (the constant perturbation) must be finite, got inf"),
    (["--perturbation", "blur", "--blur-sigma", "nan"], "blur_sigma must be positive and finite, got nan"),
    (["--perturbation", "blur", "--blur-sigma", "inf"], "blur_sigma must be positive and finite, got inf"),
    (["--low", "nan", "--high", "1"], "low (nan,) and high (1.0,) must be finite"),
    (["--low", "0", "--high", "inf"], "low (0.0,) and high (inf,) must be finite"),
], ids=["value nan", "value inf", "blur-sigma nan", "blur-sigma inf", "low nan", "high inf"])
def test_evaluate_refuses_non_finite_values(tmp_path, monkeypatch, capsys, flags, said):
    """Before: accepted (``blur_sigma <= 0`` lets NaN through); every curve nonfinite, or noise of NaN."""
    _refused(capsys, _evaluate(tmp_path, monkeypatch, *flags), f"evaluation: {said}")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flags, said", [
    (["--low", "0", "0", "--high", "1", "1"], "low (0.0, 0.0) needs 1 value or 3 (one per RGB channel), got 2"),
    (["--low", "0", "0", "0", "--high", "1", "1"],
     "low (0.0, 0.0, 0.0) and high (1.0, 1.0): give one value or one per channel each"),
    (["--low", "1", "--high", "-1"], "low (1.0,) must not exceed high (-1.0,)"),
    (["--low", "0", "0", "0", "--high", "1", "-1", "1"], "low (0.0, 0.0, 0.0) must not exceed high (1.0, -1.0, 1.0)"),
], ids=["2 bounds on RGB", "3 lows and 2 highs", "crossed", "crossed in one channel"])
def test_evaluate_refuses_bounds_of_another_channel_count_or_crossed(tmp_path, monkeypatch, capsys, flags, said):
    """Before: planned, then every actor failed on a size mismatch (3 vs 2), or the noise was drawn upside down."""
    _refused(capsys, _evaluate(tmp_path, monkeypatch, *flags), f"evaluation: {said}")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("out, said", [("plain", "plain' is a file, not a folder"),
                                       ("plain/ev", "plain/ev' cannot be used: '"),
                                       ("plain/a/b", "plain/a/b' cannot be used: '")],
                         ids=["a file", "under a file", "two levels under a file"])
def test_evaluate_refuses_an_out_of_the_wrong_kind(tmp_path, monkeypatch, capsys, out, said):
    """Before: FileExistsError / NotADirectoryError tracebacks, or (out doubling as the store) 'is a file, not a
    relevance store'."""
    (tmp_path / "plain").write_text("keep me")
    line = _refused(capsys, _evaluate(tmp_path, monkeypatch, out=tmp_path / out), "evaluation.out: '")
    assert said in line and "is a file, not a folder" in line and "relevance store" not in line
    assert (tmp_path / "plain").read_text() == "keep me"


@pytest.mark.parametrize("flags, said", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-2"], "--epochs must be at least 1, got -2"),
    (["--train-per-class", "0"], "--train-per-class must be at least 1, got 0"),
    (["--train-per-class", "-5"], "--train-per-class must be at least 1, got -5"),
    (["--audit-per-class", "0"], "--audit-per-class must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
], ids=["epochs 0", "epochs -2", "train 0", "train -5", "audit 0", "seed -1"])
def test_demo_refuses_counts_below_one_and_a_negative_seed(tmp_path, monkeypatch, capsys, flags, said):
    """Before: 0 was silently the default (``args.x or default``); a negative count or seed a traceback after the
    folder was claimed and the data generation had begun."""
    import jobs.demo

    monkeypatch.setattr(jobs.demo, "generate_data", lambda *a: pytest.fail("the demo began its work"))
    _refused(capsys, jobs.demo.main(["--out", str(tmp_path / "d"), "--quick", *flags]), f"lrp-audit demo: {said}")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("out, said", [("plain", "plain' is a file, not a folder"),
                                       ("plain/d", "plain/d' cannot be used: '")], ids=["a file", "under a file"])
def test_demo_refuses_an_out_of_the_wrong_kind(tmp_path, monkeypatch, capsys, out, said):
    """Before: a NotADirectoryError traceback (under a file), or 'not empty and not a demo folder' for a file."""
    import jobs.demo

    monkeypatch.setattr(jobs.demo, "generate_data", lambda *a: pytest.fail("the demo began its work"))
    (tmp_path / "plain").write_text("keep me")
    line = _refused(capsys, jobs.demo.main(["--out", str(tmp_path / out), "--quick"]), said)
    assert "is a file, not a folder" in line and (tmp_path / "plain").read_text() == "keep me"


def test_demo_counts_that_are_given_are_used_not_replaced_by_defaults(tmp_path, monkeypatch):
    """``--epochs 1 --train-per-class 1 --audit-per-class 1`` reach the work as given (``is None`` for defaults)."""
    import jobs.demo

    seen = {}

    def generate_data(out, spec, compare, step):
        seen.update(train=spec.train_per_class, audit=spec.audit_per_class)
        return None

    def train_models(out, data, models, epochs, seed, step):
        seen["epochs"] = epochs
        raise SystemExit(0)

    monkeypatch.setattr(jobs.demo, "generate_data", generate_data)
    monkeypatch.setattr(jobs.demo, "train_models", train_models)
    with pytest.raises(SystemExit):
        jobs.demo.main(["--out", str(tmp_path / "d"), "--quick", "--epochs", "1", "--train-per-class", "1",
                        "--audit-per-class", "1"])
    assert seen == {"train": 1, "audit": 1, "epochs": 1}
