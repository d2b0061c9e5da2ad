"""Joining store and output locations: local paths and fsspec URLs (``s3://bucket/run``) alike."""
from __future__ import annotations

import os


def join_url(base: str, *names: str) -> str:
    """``base`` with ``names`` appended, one ``/`` between each (``os.path.join`` would break URLs on Windows)."""
    out = str(base).rstrip("/")
    for name in names:
        out = f"{out}/{name}"
    return out


def beside(store_url: str, suffix: str) -> str:
    """``runs/voc.zarr`` -> ``runs/voc<suffix>``: where a store's aggregates, evaluation or report go by default."""
    base = str(store_url).rstrip("/")
    return base.removesuffix(".zarr") + suffix


def local_path(url: str) -> str | None:
    """The filesystem path of a local store or output (``runs/x``, ``~/x``, ``file:///x``), None for other URLs."""
    text = str(url)
    if text.startswith("file://"):
        return text[len("file://"):] or "/"
    if "://" in text or "::" in text:
        return None
    return os.path.expanduser(text)


def normalise_url(url: str) -> str:
    """One spelling per location, to compare two: local paths (relative, ``file://``, trailing ``/``, symlinks)
    become absolute real paths; other URLs lose their trailing ``/``."""
    path = local_path(url)
    if path is not None:
        return os.path.realpath(path)
    return str(url).rstrip("/")


def os_reason(error: OSError) -> str:
    """``Not a directory: '/data/file/run.zarr/zarr.json'``: the reason and the path the system refused, in one line."""
    return f"{error.strerror}: {error.filename!r}" if error.strerror and error.filename else str(error)


def path_problem(url: str, expect: str) -> str | None:
    """Why the local ``url`` cannot be the ``expect`` ("store", "folder" or "file") a job reads or writes, in one
    sentence; None when it can, or when it is not local (other filesystems report their own errors)."""
    path = local_path(url)
    if path is None:
        return None
    if expect == "file" and os.path.isdir(path):
        return f"{url!r} is a folder, not a file: give a file name"
    if expect != "file" and os.path.exists(path) and not os.path.isdir(path):
        return f"{url!r} is a file, not {'a relevance store' if expect == 'store' else 'a folder'}"
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        return f"{url!r} cannot be used: {parent!r} is a file, not a folder"
    return None
