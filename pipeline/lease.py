"""One driver per store: a lease object inside the store, with a heartbeat.

The lease is a tiny Zarr group ``<store>/lrp_audit_lease`` whose ``zarr.json`` attributes say who writes the
store (owner, host, pid, a random token, when it started, its last heartbeat, as Unix times). It is a plain
object written with fsspec, so it works on every fsspec filesystem (local, ``file://``, ``s3://``, ``memory://``),
and it is a valid Zarr node, so ``zarr``/``xarray`` readers see a small extra group and nothing else.

A driver takes the lease before it creates or reopens the store and renews it every :data:`HEARTBEAT` seconds in a
background thread. A second driver is refused while the lease is fresh, with a message naming the holder. A lease
is *stale*, and taken over, when its last heartbeat is older than :data:`STALE_AFTER` seconds, or at once when its
holder ran on this host and its pid is gone (a ``kill -9``'d driver on the same machine). Clocks of the machines
that share a store must agree to well within :data:`STALE_AFTER`. Object stores without compare-and-swap give no
atomic "create if absent": after writing its lease a driver reads it back once after :data:`SETTLE` seconds, and
the one whose token is there holds it (two drivers starting within the same fraction of a second are the race left).
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

LEASE = "lrp_audit_lease"  # the lease group's name at the store root
HEARTBEAT = 10.0  # seconds between renewals
STALE_AFTER = 60.0  # seconds without a heartbeat after which a lease is taken over
SETTLE = 0.2  # seconds between writing a lease and reading it back


_RELEASED: set[str] = set()  # tokens of leases this process released but could not remove (a read-only store)


class LeaseHeld(RuntimeError):
    """Another driver holds the store's lease; the message names it and says what to do."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def stale(self, now: float | None = None) -> bool:
        """No heartbeat for STALE_AFTER seconds, or a holder on this host whose process is gone."""
        return (self.age(now) > STALE_AFTER or self.token in _RELEASED
                or (self.host == socket.gethostname() and not _alive(self.pid)))

    def describe(self) -> str:
        return (f"{self.owner} (pid {self.pid} on {self.host}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))}, "
                f"last heartbeat {self.age():.0f}s ago)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _location(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(str(url), **dict(storage_options or {}))
    return fs, f"{root.rstrip('/')}/{LEASE}/zarr.json"


def read_lease(url: str, storage_options: Mapping[str, Any] | None = None) -> LeaseInfo | None:
    """The store's lease, or None when there is none (or it is unreadable: a torn write reads as no lease)."""
    fs, path = _location(url, storage_options)
    try:
        with fs.open(path, "rb") as file:
            return LeaseInfo(**json.loads(file.read())["attributes"]["lease"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def active_lease(url: str, storage_options: Mapping[str, Any] | None = None) -> LeaseInfo | None:
    """The lease of a driver that is writing the store now, or None (no lease, or a stale one)."""
    lease = read_lease(url, storage_options)
    return None if lease is None or lease.stale() else lease


class StoreLease:
    """The lease of this driver on one store: ``with StoreLease(url): ...`` holds it and keeps it fresh."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, owner: str | None = None):
        self.url, self.storage_options = str(url), dict(storage_options or {})
        now = time.time()
        self.info = LeaseInfo(owner or _owner(), socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self.lost: LeaseInfo | None = None  # set when another driver took the lease over (this one looked stale)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the driver that holds it."""
        held = read_lease(self.url, self.storage_options)
        if held is not None and held.token != self.info.token and not held.stale():
            raise LeaseHeld(_refusal(self.url, held))
        self._write()
        time.sleep(SETTLE)
        held = read_lease(self.url, self.storage_options)
        if held is None or held.token != self.info.token:
            raise LeaseHeld(_refusal(self.url, held) if held else f"store {self.url!r}: the lease could not be taken")
        self._thread = threading.Thread(target=self._beat, name="lrp-audit-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Write a fresh heartbeat, unless another driver took the lease over; rewrites a lease that vanished (a
        store laid out anew clears its folder)."""
        held = read_lease(self.url, self.storage_options)
        if held is not None and held.token != self.info.token:
            self.lost = held
            self._stop.set()
            return
        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
        self._write()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT)
        held = read_lease(self.url, self.storage_options)
        if held is not None and held.token == self.info.token:
            fs, path = _location(self.url, self.storage_options)
            try:
                fs.rm(path.rsplit("/", 1)[0], recursive=True)
            except OSError:  # a read-only or full store: the lease is left, known here as released
                _RELEASED.add(self.info.token)

    def _write(self) -> None:
        fs, path = _location(self.url, self.storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        document = {"zarr_format": 3, "node_type": "group", "attributes": {"lease": asdict(self.info)}}
        with fs.open(path, "wb") as file:
            file.write(json.dumps(document).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self.renew()
            except OSError:  # a storage hiccup: the next beat tries again, well before the lease goes stale
                continue

    def __enter__(self) -> StoreLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _owner() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _refusal(url: str, held: LeaseInfo) -> str:
    return (f"store {url!r} is being written by another driver: {held.describe()}. Wait for it to finish or stop it; "
            f"a driver that is gone loses its lease {STALE_AFTER:.0f}s after its last heartbeat (at once on the same "
            f"host once its process has ended)")
