"""Ray processes never outlive a ``kill -9``'d driver that started its own local cluster.

Ray ties its GCS server and raylet to the driver that started them (they die with it), but the dashboard and
runtime-env agents are left running when the driver is killed with SIGKILL (measured with Ray 2.60: still alive a
minute later). So a driver that starts a local cluster also starts this watchdog, a small process in its own
session: while the driver lives it notes the driver's Ray descendants once per :data:`POLL` second; once the
driver is gone it kills those still running (each checked by its start time, so a reused pid is never hit).
:func:`start` returns only once the watchdog has taken its first look, so a driver killed at once after
``ray.init`` is covered too (without that wait the watchdog, still starting, found no driver to note). Every
Ray process of the cluster is gone within :data:`LINGER` seconds of the driver's death. Linux only (``/proc``);
elsewhere no watchdog is started.

Run as ``python -m pipeline.watchdog PID``.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL = 1.0  # seconds between looks at the driver's process tree
READY_TIMEOUT = 10.0  # seconds start() waits for the first look (it takes milliseconds)
LINGER = 30.0  # documented bound: seconds after the driver's death by which no process of its local cluster is left


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[1]), int(fields[19])) if fields[0] != "Z" else None


def _ray_descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root`` that is a Ray process (its command line says ray)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        stat = _stat(int(name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(name))
            starts[int(name)] = stat[1]
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    is_ray = b"ray" in file.read()
            except OSError:
                continue
            if is_ray and pid != os.getpid():
                found[pid] = starts[pid]
    return found


def _kill_same(pids: dict[int, int]) -> None:
    """SIGKILL each pid that still runs the process noted (same start time), so a reused pid is never hit."""
    for pid, started in pids.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def watch(driver: int, ready=None) -> None:
    """Note the driver's Ray processes while it lives; kill those left once it is gone.

    ``ready`` (a file) gets one line after the first look, so the driver knows its cluster is noted: a driver
    killed right after :func:`start` returns would otherwise die before the watchdog looked, leaving it nothing to
    kill. After the death the noted processes that still run (a raylet outlives the driver for a moment) are looked
    under once more, for agents started after the last look."""
    seen: dict[int, int] = {}
    while _stat(driver) is not None:
        seen.update(_ray_descendants(driver))
        if ready is not None:
            ready.write("watching\n")
            ready.close()
            ready = None
        time.sleep(POLL)
    for pid, started in list(seen.items()):
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            seen.update(_ray_descendants(pid))
    _kill_same(seen)


def start(driver: int | None = None, timeout: float = READY_TIMEOUT) -> subprocess.Popen | None:
    """Start the watchdog of ``driver`` (this process by default) in its own session and wait (up to ``timeout``
    seconds) until it has noted the driver's Ray processes; None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    process = subprocess.Popen([sys.executable, "-m", "pipeline.watchdog", str(driver or os.getpid())],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               start_new_session=True, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if select.select([process.stdout], [], [], timeout)[0]:
        process.stdout.readline()
    process.stdout.close()
    _STARTED.append(process)  # kept: a Popen collected while its process runs warns
    return process


_STARTED: list[subprocess.Popen] = []

if __name__ == "__main__":
    watch(int(sys.argv[1]), ready=sys.stdout)
