"""Hostile and odd inputs (docs/hostile-inputs.md): each row of that table is one test here.

Every case gets a recorded failed row with its reason, an ok row with a documented reading, or a clear
configuration error before any work; never a crash of the run or a silent wrong value.
"""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.run import plan_run
from tests.test_pipeline import manifest, values


def test_a_setting_that_fails_on_the_first_batch_fails_in_planning(tmp_path):
    """epsilon_gamma_box with a 2-channel box on 3-channel images builds, and fails only when it runs."""
    source = manifest(tmp_path, 2)
    config = config_from_dict(values(tmp_path, source, explanations=[
        {"name": "box", "composite": "epsilon_gamma_box", "low": [-1, -1], "high": [1, 1]}]))
    with pytest.raises(ConfigError, match=r"explanation 'box' fails on a 2x3x16x16 zero batch .*before any actor"):
        plan_run(config)
    assert not (tmp_path / "run.zarr").exists()
