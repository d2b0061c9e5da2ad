"""The explain pipeline end to end on the real local Ray cluster: a tiny random-init CNN, generated images."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers.runs import (
    FACTORY, REPO, engine_relevance, fifo_dataset, holders, manifest, save_image, save_weights, values, wait_for,
)
from pipeline.config import ConfigError, config_from_dict
from pipeline.preprocess import Preprocess, PreprocessSpec
from pipeline.run import plan_run, run
from pipeline.store import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, open_store


def test_explain_stores_engine_relevance_and_records_bad_images(ray_cluster, tmp_path):
    corrupt = tmp_path / "img" / "corrupt.png"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = manifest(tmp_path, 8, extra=[(str(corrupt), "1"), (str(tmp_path / "gone.png"), "2")])
    summary = run(config_from_dict(values(tmp_path, source, num_actors=2)))  # two writers, one store

    assert summary.exit_code == 1 and summary.computed_rows == 10
    assert summary.groups["ab"] == {"ok": 8, "failed": 2, "nonfinite": 0, "pending": 0}
    reasons = dict(summary.failures)
    assert "cannot decode image" in reasons[str(corrupt)] and "missing file" in reasons[str(tmp_path / "gone.png")]
    text = summary.format()
    assert "failed images (2)" in text and "residual" in text and "gone.png" in text
    again = run(config_from_dict(values(tmp_path, source, num_actors=2)))  # before: "every row ... is computed"
    assert again.computed_rows == 0 and again.exit_code == 1
    assert "4 failed or nonfinite rows are kept as they are: rerun with --retry-failed" in again.format()

    store = open_store(str(tmp_path / "run.zarr"))
    assert store.group_names == ["epsilon_epsilon=0.01", "ab"] and store.class_names == ["0", "1", "2"]
    assert store.config["weights_digest"].startswith("sha256:") and len(store.config["dataset_fingerprint"]) == 64
    assert store.config["explanations"]["ab"] == {"composite": "alpha_beta", "alpha": 1, "beta": 0}
    for name, setting in (("epsilon_epsilon=0.01", dict(composite="epsilon", epsilon=0.01)),
                          ("ab", dict(composite="alpha_beta", alpha=1, beta=0))):
        group = store.group(name)
        rows = group.rows().to_pylist()
        relevance = group.relevance.compute()
        assert [r["status"] for r in rows] == [STATUS_OK] * 8 + [STATUS_FAILED] * 2
        assert np.isnan(relevance[8:]).all()
        for row in (rows[0], rows[5]):
            expected, output = engine_relevance(tmp_path, row["path"], row["target"], **setting)
            np.testing.assert_allclose(relevance[row["row"]], expected, rtol=1e-5, atol=1e-6)
            assert row["output"] == pytest.approx(output, rel=1e-5)
            assert row["residual"] == pytest.approx(row["relevance_sum"] - row["output"])
            assert row["label"] == row["target"] == row["sample_id"] % 3
        # boxes follow the geometry: (2, 2, 10, 9) on 28x20 padded to 28x28 (+4 rows) then scaled by 16/28
        np.testing.assert_allclose(group.boxes[0, 0], np.array([2, 6, 10, 13]) * 16 / 28, rtol=1e-5)


def test_target_modes_and_multi_label_rows(ray_cluster, tmp_path):
    mask = np.zeros((20, 28), np.uint8)
    mask[5:15, 3:10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    lines = ["path,label,labels,mask_path"]
    for i in range(4):
        labels = "0;2" if i % 2 else "1"
        lines.append(f"{save_image(tmp_path / f'{i}.png', i)},,{labels},{'mask.png' if i == 1 else ''}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    config = config_from_dict(values(tmp_path, str(tmp_path / "m.csv"), explanations=["epsilon"], per_channel=True))
    plan = plan_run(config)
    assert plan.target_mode == "labels" and plan.rows.num_rows == 6  # every label of every image
    assert run(config).exit_code == 0
    group = open_store(config.store).group("epsilon")
    rows = group.rows()
    assert rows["sample_id"].to_pylist() == [0, 1, 1, 2, 3, 3] and rows["target"].to_pylist() == [1, 0, 2, 1, 0, 2]
    assert group.labels[1].tolist() == [True, False, True]
    np.testing.assert_allclose(group.relevance_channels.sum(axis=1).compute(), group.relevance.compute(), atol=1e-6)
    expected_mask = Preprocess(PreprocessSpec(resize=16, pad_to_square=True))(
        torch.zeros(3, 20, 28, dtype=torch.uint8), None, torch.from_numpy(mask > 0))[2].numpy()
    masks = group.mask.compute()
    assert expected_mask.any() and (masks[1] == expected_mask).all() and (masks[2] == expected_mask).all()
    assert not masks[0].any()

    config = config_from_dict(values(tmp_path, str(tmp_path / "m.csv"), targets="prediction",
                                     explanations=["epsilon"], store=str(tmp_path / "p.zarr")))
    assert run(config).exit_code == 0
    rows = open_store(config.store).group("epsilon").rows()
    assert rows.num_rows == 4 and rows["target"].to_pylist() == rows["prediction"].to_pylist()

    config = config_from_dict(values(tmp_path, str(tmp_path / "m.csv"), targets="classes", classes="2,0",
                                     explanations=["epsilon"], store=str(tmp_path / "c.zarr")))
    assert plan_run(config).rows["target"].to_pylist() == [2, 0] * 4


def test_nonfinite_relevance_is_flagged(ray_cluster, tmp_path):
    source = manifest(tmp_path, 6)
    config = config_from_dict(values(tmp_path, source, explanations=["epsilon"]))
    save_weights(tmp_path / "w.pt", nan_class=0)  # class 0's logit is NaN, and the backward pass spreads it
    summary = run(config)
    group = open_store(config.store).group("epsilon")
    assert group.status.tolist() == [STATUS_NONFINITE] * 6
    assert np.isnan(group.relevance.compute()).any(axis=(1, 2)).all()  # kept for inspection, flagged
    assert summary.exit_code == 1 and summary.groups["epsilon"]["nonfinite"] == 6


# ---- failures of processes: a FIFO in the dataset holds an actor at a known row (helpers.runs) ------------
def test_killed_actor_is_restarted_and_its_shard_retried(ray_cluster, tmp_path):
    import threading

    source, fifo = fifo_dataset(tmp_path, 9, blocked_row=3)
    config = config_from_dict(values(tmp_path, source, explanations=["epsilon"]))
    writer = os.open(fifo, os.O_RDWR)  # so the actor's open() returns and its read() blocks
    killed = []

    def kill_the_reader():
        pid = wait_for(lambda: holders(fifo))[0]
        fifo.unlink()
        save_image(fifo, 3)  # the retry reads a real image
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=kill_the_reader, daemon=True)
    thread.start()
    try:
        summary = run(config)
    finally:
        thread.join(timeout=5)
        os.close(writer)
    assert killed and summary.retries >= 1  # the killed shard (and the one queued behind it)
    assert summary.exit_code == 0 and summary.groups["epsilon"]["ok"] == 9


@pytest.mark.slow
def test_resume_after_kill_9_equals_an_uninterrupted_run(ray_cluster, tmp_path):
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    source = manifest(reference_dir, 12)
    run(config_from_dict(values(reference_dir, source, store=str(reference_dir / "run.zarr"))))

    interrupted_dir.mkdir()
    source, fifo = fifo_dataset(interrupted_dir, 12, blocked_row=6)
    settings = values(interrupted_dir, source, store=str(interrupted_dir / "run.zarr"))
    (interrupted_dir / "run.yaml").write_text(yaml.safe_dump(settings))
    writer = os.open(fifo, os.O_RDWR)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.explain", "--config", str(interrupted_dir / "run.yaml"),
         "--address", ray_cluster.get_runtime_context().gcs_address],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: holders(fifo) or driver.poll() is not None, timeout=120)
        assert driver.poll() is None, driver.stdout.read().decode()
        driver.send_signal(signal.SIGKILL)  # kill -9 of the driver, mid-run
        driver.wait()
        wait_for(lambda: not holders(fifo))  # Ray ends the dead job's actors
    finally:
        os.close(writer)
        if driver.poll() is None:
            driver.kill()
    fifo.unlink()
    save_image(fifo, 6)
    partial = open_store(str(interrupted_dir / "run.zarr")).group("ab").status
    # an actor runs two shard tasks at once, so the shard after the blocked one may be done as well: each shard is
    # all ok or all pending (whole-shard writes), the blocked shard is pending, and the rerun computes only those
    shards = partial.reshape(4, 3)
    assert ((shards == STATUS_OK).all(1) | (shards != STATUS_OK).all(1)).all(), partial
    assert (shards[:2] == STATUS_OK).all(1).any() and (shards[2] != STATUS_OK).all(), partial  # shard 2 came third

    summary = run(config_from_dict(settings))
    assert summary.exit_code == 0 and summary.computed_rows == int((partial != STATUS_OK).sum())
    reference, resumed = open_store(str(reference_dir / "run.zarr")), open_store(str(interrupted_dir / "run.zarr"))
    for name in reference.group_names:
        a, b = reference.group(name), resumed.group(name)
        np.testing.assert_array_equal(a.relevance.compute(), b.relevance.compute())
        for column in ("target", "label", "prediction", "output", "relevance_sum", "status", "sample_id"):
            np.testing.assert_array_equal(a.rows()[column].to_numpy(), b.rows()[column].to_numpy())
    assert resumed.config["dataset_fingerprint"] != reference.config["dataset_fingerprint"]  # other paths


# ---- configuration errors: all before any work --------------------------------------------------------
def test_config_errors_name_the_fix(tmp_path):
    source = manifest(tmp_path, 3)
    with pytest.raises(ConfigError, match=r"unknown torchvision model 'resnet5'; did you mean one of \['resnet50'"):
        config_from_dict(values(tmp_path, source, model={"name": "resnet5"}))
    with pytest.raises(ConfigError, match=r"did you mean one of \['efficientnet_b0'"):
        config_from_dict(values(tmp_path, source, model={"name": "efficientnetb0"}))
    with pytest.raises(ConfigError, match="is not an existing file"):
        plan_run(config_from_dict(values(tmp_path, source, model={"factory": FACTORY, "weights": "nope.pt"})))
    with pytest.raises(ConfigError, match="class count mismatch: the model has 5 outputs .* 3 classes"):
        save_weights(tmp_path / "w5.pt", num_classes=5)
        plan_run(config_from_dict(values(tmp_path, source, model={
            "factory": FACTORY, "weights": str(tmp_path / "w5.pt"), "kwargs": {"num_classes": 5},
            "class_names": ["a", "b", "c"]})))
    with pytest.raises(ConfigError, match="outside the model's classes 0..2"):
        plan_run(config_from_dict(values(tmp_path, source, targets="classes", classes=[7])))
    with pytest.raises(ConfigError, match="unknown composite 'epsilonn'"):
        plan_run(config_from_dict(values(tmp_path, source, explanations=["epsilonn"])))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batchsize'\]"):
        config_from_dict(values(tmp_path, source, batchsize=3))
    with pytest.raises(ConfigError, match="actors_per_gpu must be at least 1, got 0"):
        config_from_dict(values(tmp_path, source, actors_per_gpu=0))
    (tmp_path / "labels.csv").write_text(f"path,label\n{tmp_path / 'img' / '0.png'},4\n")
    with pytest.raises(ConfigError, match="label outside the model's 3 classes"):
        plan_run(config_from_dict(values(tmp_path, str(tmp_path / "labels.csv"))))
    folder = tmp_path / "folder"
    for name in ("cat", "dog", "zebra"):
        save_image(folder / name / "0.png", 0)
    named = {"factory": FACTORY, "weights": str(tmp_path / "w.pt"), "class_names": ["cat", "dog", "horse"]}
    with pytest.raises(ConfigError, match="classes do not match the model's class names \\('zebra' are not"):
        plan_run(config_from_dict(values(tmp_path, str(folder), model=named)))
    (folder / "zebra" / "0.png").rename(folder / "dog" / "1.png")
    (folder / "zebra").rmdir()
    plan = plan_run(config_from_dict(values(tmp_path, str(folder), model=named)))  # a subset maps by name
    assert plan.rows["label"].to_pylist() == [0, 1, 1]


def test_an_interrupted_command_exits_130_saying_how_to_resume(monkeypatch, capsys):
    """Before: Ctrl-C ended explain with a KeyboardInterrupt traceback and exit status 1 (which means failed rows)."""
    import jobs.explain
    from jobs import cli

    def interrupted(argv):
        raise KeyboardInterrupt  # what Python raises in the driver at a SIGINT

    monkeypatch.setattr(jobs.explain, "main", interrupted)
    assert cli.main(["explain", "--config", "run.yaml"]) == 130
    assert "lrp-audit explain: interrupted; the shards written so far are kept: run the same command again to " \
           "resume" in capsys.readouterr().err


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    from jobs.explain import main

    code = main(["--dataset", manifest(tmp_path, 2), "--model", "resnet18", "--weights", "missing.pt",
                 "--store", str(tmp_path / "s.zarr"), "--resize", "16", "16"])
    assert code == 2
    error = capsys.readouterr().err
    assert "configuration error" in error and "neither" not in error and "DEFAULT" in error
    assert not (tmp_path / "s.zarr").exists()


def test_gpu_flags_reach_the_config_and_tf32_is_part_of_the_store_identity(tmp_path):
    from jobs.explain import config_values, parser

    args = parser().parse_args(["--dataset", manifest(tmp_path, 2), "--model", "resnet18", "--store", "s.zarr",
                                "--tf32", "--actors-per-gpu", "3"])
    config = config_from_dict(config_values(args))
    assert config.tf32 and config.actors_per_gpu == 3
    assert config.identity()["tf32"] is True  # a resume with other arithmetic is refused, not mixed into the store
    arguments = ["--dataset", "d", "--model", "resnet18", "--store", "s"]
    default = config_from_dict(config_values(parser().parse_args(arguments)))
    assert not default.tf32 and default.actors_per_gpu == 1 and default.identity()["tf32"] is False


def test_torchvision_weights_by_name_load_through_torchvision(tmp_path, monkeypatch):
    """The real torchvision path up to the network: a file already in the hub cache is what it loads."""
    from torchvision.models import SqueezeNet1_1_Weights

    from pipeline.models import ModelSpec, build_model, model_class_names, weights_digest, weights_enum

    spec = ModelSpec(name="squeezenet1_1", weights="DEFAULT")
    enum = weights_enum(spec)
    assert enum is SqueezeNet1_1_Weights.IMAGENET1K_V1
    assert model_class_names(spec)[:2] == ["tench", "goldfish"] and len(model_class_names(spec)) == 1000
    assert weights_digest(spec) == f"torchvision:SqueezeNet1_1_Weights.IMAGENET1K_V1:{enum.url}"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    state = build_model(ModelSpec(name="squeezenet1_1")).state_dict()
    torch.save(state, cache / os.path.basename(enum.url))
    model = build_model(spec)
    torch.testing.assert_close(model.state_dict()["classifier.1.weight"], state["classifier.1.weight"])
