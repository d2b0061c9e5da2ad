"""One driver per store: the lease (pipeline/lease.py) on a local path and on memory://, and the aggregate flag."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jobs.aggregate import main as aggregate_main
from pipeline import lease as lease_module
from pipeline.config import ConfigError, config_from_dict
from pipeline.lease import LEASE, STALE_AFTER, LeaseHeld, StoreLease, active_lease, read_lease
from pipeline.run import run
from helpers.stores import make_store
from helpers.runs import manifest, values


def forge(url: str, **fields) -> None:
    """A lease as another driver left it."""
    info = {"owner": "someone", "host": "elsewhere", "pid": 1, "token": "theirs", "started": time.time(),
            "heartbeat": time.time(), **fields}
    folder = os.path.join(url, LEASE)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "zarr.json"), "w") as file:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": {"lease": info}}, file)


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    config = config_from_dict(values(tmp_path, manifest(tmp_path, 2)))
    with StoreLease(config.store, owner="first-run"):
        with pytest.raises(ConfigError, match=rf"being written by another driver: first-run \(pid {os.getpid()} on "
                                              rf"{socket.gethostname()}.*last heartbeat \d+s ago"):
            run(config)  # refused before any actor starts: no Ray needed
    assert read_lease(config.store) is None  # released on exit


def test_a_stale_lease_is_taken_over(tmp_path):
    url = str(tmp_path / "s.zarr")
    forge(url, heartbeat=time.time() - STALE_AFTER - 1)
    with StoreLease(url) as lease:
        assert read_lease(url).token == lease.info.token
    forge(url)  # fresh, on another host: refused
    with pytest.raises(LeaseHeld, match="someone .* on elsewhere"):
        StoreLease(url).acquire()


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    url = str(tmp_path / "s.zarr")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    forge(url, host=socket.gethostname(), pid=gone.pid)
    assert active_lease(url) is None
    with StoreLease(url) as lease:
        assert active_lease(url).token == lease.info.token


def test_lease_on_an_fsspec_url_and_a_lease_taken_over_is_noticed(monkeypatch):
    url = f"memory://lrp-audit-lease-{os.getpid()}/s.zarr"
    monkeypatch.setattr(lease_module, "HEARTBEAT", 3600.0)  # renewals by hand below
    first = StoreLease(url, owner="first")
    first.acquire()
    with pytest.raises(LeaseHeld, match="first"):
        StoreLease(url, owner="second").acquire()
    thief = StoreLease(url, owner="thief")
    thief._write()  # what a driver that found the first one stale would do
    first.renew()
    assert first.lost is not None and first.lost.owner == "thief"
    first.release()
    assert read_lease(url).owner == "thief"  # not removed: it is not ours any more


def test_aggregate_refuses_a_store_being_written_unless_asked(tmp_path, capsys):
    url = make_store(tmp_path / "s.zarr", np.ones((4, 6, 6)), target=[0, 1, 0, 1])
    with StoreLease(url, owner="explain-run"):
        assert aggregate_main([url, "--out", str(tmp_path / "agg")]) == 2
        assert "being written by explain-run" in capsys.readouterr().err and not (tmp_path / "agg").exists()
        assert aggregate_main([url, "--out", str(tmp_path / "agg"), "--while-writing"]) == 0
        out = capsys.readouterr().out
        assert out.count("note: aggregated while the store was being written by explain-run") == 2
    assert aggregate_main([url, "--out", str(tmp_path / "agg2")]) == 0
    assert "note:" not in capsys.readouterr().out
