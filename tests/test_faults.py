"""Fault injection with real Ray and real Zarr: killed drivers and actors, a row that kills its actor, a lost node.

Every test ends with the store compared array by array with an uninterrupted run of the same data (same pixels,
same weights): relevance bit-identical on CPU, every per-row array equal, no row missing or written twice.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import config_from_dict
from pipeline.run import run
from pipeline.store import STATUS_FAILED, STATUS_OK, open_store
from helpers.runs import REPO, fifo_dataset, holders, manifest, save_image, save_weights, values, wait_for

N_IMAGES = 12
COLUMNS = ("sample_id", "target", "label", "prediction", "output", "relevance_sum", "residual", "status", "error")


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory) -> str:
    """An uninterrupted run of the data every fault test uses."""
    folder = tmp_path_factory.mktemp("reference")
    summary = run(config_from_dict(values(folder, manifest(folder, N_IMAGES))))
    assert summary.exit_code == 0
    return str(folder / "run.zarr")


def assert_same_store(reference: str, other: str, rows: slice | list = slice(None), rtol: float = 0.0) -> None:
    """Equal array by array on ``rows``: relevance bit-identical (``rtol`` 0), every per-row array equal, boxes equal.

    A row explained in a batch of another size differs in the last bits (CPU kernels depend on the batch size):
    bisected shards are compared with ``rtol``, and with an absolute tolerance of 1e-6 of the map's largest value:
    the kernels' rounding scales with the terms summed, not with a result that nearly cancels to zero."""
    a, b = open_store(reference), open_store(other)
    assert a.group_names == b.group_names and a.n_rows == b.n_rows
    for name in a.group_names:
        ga, gb = a.group(name), b.group(name)
        expected = ga.relevance.compute()[rows]
        atol = 1e-6 * float(np.abs(expected).max()) if rtol else 0.0
        np.testing.assert_allclose(expected, gb.relevance.compute()[rows], rtol=rtol, atol=atol)
        np.testing.assert_array_equal(ga.boxes[rows], gb.boxes[rows])
        ra, rb = ga.rows(), gb.rows()
        for column in COLUMNS:
            x, y = (r[column].to_numpy(zero_copy_only=False)[rows] for r in (ra, rb))
            if rtol and x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=rtol, err_msg=column)
            else:
                np.testing.assert_array_equal(x, y, err_msg=column)


class Killer:
    """Kills (SIGKILL) every process that opens ``path``, until stopped: a row whose image always kills its actor,
    as a decoder segfault or an out-of-memory image would."""

    def __init__(self, path: Path):
        self.path, self.kills, self.stop = path, 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            for pid in holders(self.path):
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.mark.slow
def test_a_row_that_kills_its_actor_is_found_by_bisection_and_only_it_fails(reference, tmp_path):
    source, fifo = fifo_dataset(tmp_path, N_IMAGES, blocked_row=4)  # shard 1 holds rows 3, 4, 5
    writer = os.open(fifo, os.O_RDWR)
    began = time.perf_counter()
    try:
        with Killer(fifo) as killer:
            summary = run(config_from_dict(values(tmp_path, source, max_attempts=2)))
    finally:
        os.close(writer)
    store = open_store(str(tmp_path / "run.zarr"))
    lost = sum(int((np.delete(g.status, 4) != STATUS_OK).sum()) for g in store.groups())
    duplicated = sum(N_IMAGES - len(set(g.rows()["path"].to_pylist())) for g in store.groups())
    print(f"\nFAULT a row that kills its actor: lost {lost}, duplicated {duplicated}, recovered in "
          f"{time.perf_counter() - began:.1f} s (the whole run; row 4 failed, {killer.kills} kills)")
    group = store.group("ab")
    status, errors = group.status, group.rows()["error"].to_pylist()
    assert status[4] == STATUS_FAILED and re.search("the actor (died|became unavailable) on this row", errors[4])
    assert "tried 2 times" in errors[4]
    assert (np.delete(status, 4) == STATUS_OK).all() and summary.groups["ab"]["failed"] == 1
    assert killer.kills >= 5 and summary.retries >= 4  # the shard twice, the half with row 4, row 4 alone twice
    assert_same_store(reference, str(tmp_path / "run.zarr"), [i for i in range(N_IMAGES) if i != 4], rtol=1e-4)


def lost_and_duplicated(store: str) -> tuple[int, int]:
    """(rows lost, rows written twice) of a store that should hold every image once, ok, in order: a lost row is
    one not ok or not in its place, a duplicate an image whose path is stored in more than one row."""
    lost = duplicated = 0
    for group in open_store(store).groups():
        rows = group.rows()
        in_place = rows["sample_id"].to_numpy() == np.arange(N_IMAGES)
        lost += int((~((rows["status"].to_numpy() == STATUS_OK) & in_place)).sum())
        paths = rows["path"].to_pylist()
        duplicated += len(paths) - len(set(paths))
    return lost, duplicated


def assert_whole(store: str, fault: str, recovered_in: float) -> None:
    """Every row there once: ok, in order, each image's row in its place (no row lost or written twice); prints the
    line ``benchmarks/fault_figures.py`` tallies."""
    lost, duplicated = lost_and_duplicated(store)
    print(f"\nFAULT {fault}: lost {lost}, duplicated {duplicated}, recovered in {recovered_in:.1f} s")
    assert (lost, duplicated) == (0, 0)


def start_driver(folder: Path, settings: dict, address: str) -> subprocess.Popen:
    (folder / "run.yaml").write_text(yaml.safe_dump(settings))
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.explain", "--config", str(folder / "run.yaml"), "--address", address],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


#: where the driver is killed: the file that holds the run there (a FIFO), and the rows ok by then
KILL_POINTS = {
    "planning": ("weights", 0),  # the driver reads the weights file to fingerprint it
    "first shard": (1, 0),  # an actor decodes row 1 (shard 0)
    "middle": (6, 6),  # shard 2 of 4
    "last shard": (11, 9),  # the last image of the last shard
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_driver_sigkill_then_rerun_equals_an_uninterrupted_run(reference, ray_cluster, tmp_path, point):
    held, ok_before = KILL_POINTS[point]
    if held == "weights":
        source = manifest(tmp_path, N_IMAGES)
        settings = values(tmp_path, source)
        fifo = tmp_path / "w.pt"
        fifo.unlink()
        os.mkfifo(fifo)
    else:
        source, fifo = fifo_dataset(tmp_path, N_IMAGES, blocked_row=held)
        settings = values(tmp_path, source)
    writer = os.open(fifo, os.O_RDWR)
    driver = start_driver(tmp_path, settings, ray_cluster.get_runtime_context().gcs_address)
    try:
        wait_for(lambda: holders(fifo) or driver.poll() is not None, timeout=180)
        assert driver.poll() is None, driver.stdout.read().decode()
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        wait_for(lambda: not holders(fifo), timeout=120)  # Ray ends the dead job's actors
    finally:
        os.close(writer)
        if driver.poll() is None:
            driver.kill()
    fifo.unlink()
    save_weights(fifo) if held == "weights" else save_image(fifo, held)
    store = tmp_path / "run.zarr"
    if ok_before:
        assert (open_store(str(store)).group("ab").status == STATUS_OK).sum() == ok_before

    began = time.perf_counter()
    summary = run(config_from_dict(settings))  # the same command again
    assert summary.exit_code == 0 and summary.computed_rows == N_IMAGES - ok_before
    assert_whole(str(store), f"driver SIGKILL ({point})", time.perf_counter() - began)
    assert_same_store(reference, str(store))


@pytest.mark.slow
def test_actor_sigkill_mid_shard_is_retried_and_the_store_equals_an_uninterrupted_run(reference, tmp_path):
    source, fifo = fifo_dataset(tmp_path, N_IMAGES, blocked_row=4)
    writer = os.open(fifo, os.O_RDWR)
    killed = []

    def kill_the_reader():
        pid = wait_for(lambda: holders(fifo), timeout=180)[0]
        fifo.unlink()
        save_image(fifo, 4)  # the retry reads a real image
        os.kill(pid, signal.SIGKILL)
        killed.append(time.perf_counter())

    thread = threading.Thread(target=kill_the_reader, daemon=True)
    thread.start()
    try:
        summary = run(config_from_dict(values(tmp_path, source)))
    finally:
        thread.join(timeout=5)
        os.close(writer)
    assert killed and summary.retries >= 1 and summary.exit_code == 0
    assert_whole(str(tmp_path / "run.zarr"), "actor SIGKILL mid-shard", time.perf_counter() - killed[0])
    assert_same_store(reference, str(tmp_path / "run.zarr"))


def live_descendants(root: int) -> dict[int, str]:
    """pid -> command line of the live (not zombie) descendants of ``root``."""
    parents = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(name)] = int(fields[1])
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                todo.append(pid)
                try:
                    found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                except OSError:
                    pass
    return found


def alive(pids) -> list[int]:
    result = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                result.append(pid)
        except OSError:
            continue
    return result


@pytest.mark.slow
def test_no_ray_process_outlives_a_kill_9_of_a_driver_with_its_own_cluster(tmp_path):
    from pipeline.watchdog import LINGER

    code = "from pipeline.dispatch import connect; import time; connect(); print('READY', flush=True); time.sleep(600)"
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    cluster: dict[int, str] = {}
    try:
        assert driver.stdout.readline().strip() == "READY"
        cluster = wait_for(lambda: (found := live_descendants(driver.pid)) and
                           any("watchdog" in line for line in found.values()) and
                           any("raylet" in line for line in found.values()) and found, timeout=60)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        try:
            wait_for(lambda: not alive(cluster), timeout=LINGER)
        except TimeoutError:
            pytest.fail(f"left {LINGER:.0f} s after the kill: {[cluster[pid] for pid in alive(cluster)]}")
        print(f"\nFAULT driver SIGKILL, own Ray cluster: lost 0, duplicated 0, recovered in "
              f"{time.monotonic() - killed:.1f} s ({len(cluster)} Ray processes all gone)")
    finally:
        for pid in alive(cluster):  # only when the test failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs of this test's own (needs the right to mount, as root in CI); unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]
    if subprocess.run(command, capture_output=True, check=False).returncode:
        pytest.skip("no right to mount a tmpfs here")
    yield mount
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True, check=False)
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "ballast", "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_a_full_or_read_only_store_stops_the_run_clearly_and_resumes(reference, tmp_path, small_disk, fault):
    source, fifo = fifo_dataset(tmp_path, N_IMAGES, blocked_row=6)  # shard 2 of 4
    image = Path(save_image(tmp_path / "row6.png", 6)).read_bytes()
    settings = values(tmp_path, source, store=str(small_disk / "run.zarr"))
    writer = os.open(fifo, os.O_RDWR)

    def break_the_disk():
        wait_for(lambda: holders(fifo), timeout=180)
        if fault == "disk full":
            fill(small_disk)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        os.write(writer, image)  # the held actor reads a real image, then writes its shard
        os.close(writer)

    thread = threading.Thread(target=break_the_disk, daemon=True)
    thread.start()
    summary = run(config_from_dict(settings))
    thread.join(timeout=10)
    text = summary.format()
    assert summary.exit_code == 1 and "the store cannot be written" in text and "run the same command" in text
    assert ("No space left on device" if fault == "disk full" else "Read-only file system") in text
    status = open_store(settings["store"]).group("ab").status
    assert (status[:6] == STATUS_OK).all() and not (status[6:] == STATUS_OK).any()  # nothing ok that is not stored

    if fault == "disk full":
        (small_disk / "ballast").unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    fifo.unlink()
    save_image(fifo, 6)
    began = time.perf_counter()
    summary = run(config_from_dict(settings))
    assert summary.exit_code == 0 and summary.computed_rows == 6
    assert_whole(settings["store"], f"store {fault}", time.perf_counter() - began)
    assert_same_store(reference, settings["store"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


@pytest.fixture
def second_node(ray_cluster):
    """A second Ray node on this machine (loopback), joined to the test cluster with its own 2 CPUs and a resource
    of its own: ``ray start --address ... --block``, whose SIGTERM stops that node alone (``ray stop`` would stop
    every Ray process of the machine). Its own ``--temp-dir``: ``ray start`` writes the cluster's address to
    ``<temp dir>/ray_current_cluster``, and a plain ``ray.init()`` anywhere on the machine would then join this
    test's cluster (or fail on it once it is gone) instead of starting its own."""
    before = {n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]}
    temp = tempfile.mkdtemp(prefix="ray-node-")  # short: Ray's socket paths live under it
    command = [str(Path(sys.executable).with_name("ray")), "start", "--address",
               ray_cluster.get_runtime_context().gcs_address, "--num-cpus", "2", "--num-gpus", "0",
               "--resources", '{"second_node": 1}', "--dashboard-agent-listen-port", str(free_port()),
               "--temp-dir", temp, "--disable-usage-stats", "--block"]
    # no drain wait on SIGTERM: the node stops at once, its task cut mid-shard
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    node = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: [n for n in ray_cluster.nodes() if n["Alive"] and n["NodeID"] not in before]
                 or node.poll() is not None, timeout=120)
        assert node.poll() is None, "the second node did not start"
        assert not os.path.exists("/tmp/ray/ray_current_cluster") or \
            Path("/tmp/ray/ray_current_cluster").read_text() != ray_cluster.get_runtime_context().gcs_address
        yield node
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        wait_for(lambda: {n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]} <= before, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_node_stopped_mid_run_the_job_finishes_on_the_other_and_the_store_equals_an_uninterrupted_run(
        reference, ray_cluster, second_node, tmp_path):
    # two actors of 2 CPUs: one on each node; actor 0 takes shards 0 and 1, actor 1 shards 2 and 3
    source, first = fifo_dataset(tmp_path, N_IMAGES, blocked_row=1)
    second = first.with_name("7.png")
    second.unlink()
    os.mkfifo(second)
    writers = {fifo: os.open(fifo, os.O_RDWR) for fifo in (first, second)}
    stopped = []

    def stop_the_node_mid_shard():
        held = {fifo: wait_for(lambda f=fifo: holders(f), timeout=180)[0] for fifo in writers}
        on_node = [fifo for fifo, pid in held.items() if descends_from(pid, second_node.pid)]
        stopped.append(on_node)
        for fifo in writers:
            fifo.unlink()
            save_image(fifo, int(fifo.stem))  # a retry reads a real image
        second_node.send_signal(signal.SIGTERM)
        stopped.append(time.perf_counter())
        second_node.wait(timeout=60)
        for fifo, writer in writers.items():  # the actor on this node reads its image and goes on
            if fifo not in on_node:
                os.write(writer, fifo.read_bytes())
            os.close(writer)

    thread = threading.Thread(target=stop_the_node_mid_shard, daemon=True)
    thread.start()
    summary = run(config_from_dict(values(tmp_path, source, num_actors=None, cpus_per_actor=2)))
    thread.join(timeout=90)
    assert len(stopped) == 2 and len(stopped[0]) == 1, f"not one actor on each node: {stopped}"
    assert summary.exit_code == 0 and summary.retries >= 1 and second_node.poll() is not None
    assert_whole(str(tmp_path / "run.zarr"), "a node stopped mid-run", time.perf_counter() - stopped[1])
    assert_same_store(reference, str(tmp_path / "run.zarr"))
