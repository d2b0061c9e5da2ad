"""Cluster submission: a real ``ray start --head`` on loopback, then ``ray job submit -- python -m jobs.explain``."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.store import STATUS_OK, open_store

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}: {head.stdout.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (e.g. 401 without Ray's auth token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up in {timeout}s")


def stop_head(head: subprocess.Popen) -> None:
    """Stop only the head this test started: its own process group (never `ray stop`, which stops every cluster)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_ray_job_submit_explains_into_the_store(tmp_path):
    for label in range(2):
        for i in range(3):
            path = tmp_path / "data" / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(10 * label + i).integers(0, 256, (18, 22, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    store = tmp_path / "job.zarr"

    gcs, dashboard, agent, agent_grpc, node_manager, objects, metrics, env_agent, workers = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))  # this cluster's own token
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
         f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={objects}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
         f"--min-worker-port={workers}", f"--max-worker-port={workers + 40}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(address, head)
        job = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--",
             sys.executable, "-m", "jobs.explain", "--dataset", str(tmp_path / "data"),
             "--factory", "tests.helpers.models:tiny_cnn", "--model-kwargs", '{"num_classes": 2}',
             "--resize", "16", "--pad-to-square", "--composite", "epsilon:epsilon=0.01", "--composite", "z",
             "--store", str(store), "--rows-per-shard", "2", "--batch-size", "2", "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

    result = open_store(str(store))
    assert result.group_names == ["epsilon_epsilon=0.01", "z"] and result.class_names == ["class0", "class1"]
    for group in result.groups():
        rows = group.rows()
        assert rows.num_rows == 6 and set(rows["status"].to_pylist()) == {STATUS_OK}
        assert rows["label"].to_pylist() == [0, 0, 0, 1, 1, 1]
        assert np.isfinite(group.relevance.compute()).all()


def test_cluster_yaml_is_a_valid_launcher_config_with_cpu_head_and_gpu_workers():
    import yaml
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema for `ray up`
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m5", "c5", "m6", "c6"))  # CPU head
    assert head["resources"] == {"CPU": 0}  # that runs no actor
    import ray

    assert any(f"ray[default,data]=={ray.__version__}" in command for command in config["setup_commands"])
    assert any(w["node_config"]["InstanceType"].startswith(("g4", "g5", "g6", "p3", "p4", "p5"))
               and w["min_workers"] == 0 < w["max_workers"] for w in workers)  # autoscaling GPU workers
    assert any("pip install" in command and "~/lrp-audit" in command for command in config["setup_commands"])
    assert config["file_mounts"]["~/lrp-audit"] == "."
