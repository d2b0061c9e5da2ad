"""What the jobs that read a store (aggregate, report, spray) check before any work: paths of the wrong kind, and
an explain run that is writing the store now (its lease, pipeline/lease.py)."""
from __future__ import annotations

import sys
from collections.abc import Iterable


#: what a folder that a job writes into holds when an lrp-audit job wrote it before (one name is enough: an
#: aggregate cut short leaves heatmaps.zarr, and spray writes spray/ into the aggregates folder)
OUTPUT_MARKS = {"aggregates": ("summary.json", "heatmaps.zarr", "spray"), "virelay": ("label-map.json",)}
#: the first lines of every report (aggregations/report/templates/report.html.j2): a file without it is not one
REPORT_MARK = b"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:"


def path_refusal(paths: Iterable[tuple[str | None, str]], stores: Iterable[str | None] = ()) -> str | None:
    """The first of ``(url, kind)`` that cannot be its kind, in one sentence; unset urls are skipped.

    Kinds: "store", "folder", "file" to read; outputs to write, "aggregates" or "virelay" (a folder that is new,
    empty or written by that job before: not a dataset's folder) and "report" (a file that is new or a report).
    An output inside one of ``stores`` is refused too: its files would sit among the store's.
    """
    from pipeline.paths import path_problem

    stores = list(stores)
    for url, kind in paths:
        if not url:
            continue
        problem = path_problem(url, "file" if kind == "report" else "folder" if kind in OUTPUT_MARKS else kind)
        if problem is None and kind in (*OUTPUT_MARKS, "report"):
            problem = _inside_store(url, stores) or _foreign_output(url, kind)
        if problem:
            return problem
    return None


def _inside_store(url: str, stores: Iterable[str | None]) -> str | None:
    from pipeline.paths import local_path, normalise_url

    here = normalise_url(url)
    for store in stores:
        if store and local_path(store) is not None and local_path(url) is not None:
            root = normalise_url(store)
            if here == root or here.startswith(root.rstrip("/") + "/"):
                return f"{url!r} is inside the store {store!r}: write outputs outside it (the default is beside it)"
    return None


def _foreign_output(url: str, kind: str) -> str | None:
    """Why the local output ``url`` holds something lrp-audit did not write, or None."""
    import os

    from pipeline.paths import local_path

    path = local_path(url)
    if path is None or not os.path.exists(path):
        return None
    if kind == "report":
        with open(path, "rb") as handle:
            if REPORT_MARK in handle.read(4096):
                return None
        return f"{url!r} exists and is not an lrp-audit report: give a new file name (it would be overwritten)"
    entries = os.listdir(path)
    if not entries or any(mark in entries for mark in OUTPUT_MARKS[kind]):
        return None
    return (f"{url!r} holds other files ({', '.join(sorted(entries)[:5])}): write the "
            f"{'aggregates' if kind == 'aggregates' else 'ViRelAy project'} into a new or empty folder")


def writer_check(stores: Iterable[str | None], verb: str, past: str, while_writing: bool,
                 main_store: str | None = None) -> tuple[str | None, str | None]:
    """(a refusal, a note) about explain runs writing ``stores`` now: refused unless ``while_writing``, else noted.

    ``verb``/``past`` word what the job does ("aggregate"/"aggregated"); a store other than ``main_store`` (the first
    by default) is named, as a report's ``--compare`` store is.
    """
    from pipeline.lease import active_lease

    stores = [url for url in stores if url]
    main_store = main_store or (stores[0] if stores else None)
    held = [(url, lease) for url in stores for lease in [active_lease(url)] if lease]
    if not held:
        return None, None
    def writers(tense: str) -> str:
        return "; ".join(("the store" if url == main_store else f"the compared store {url!r}")
                         + f" {tense} being written by {lease.describe()}" for url, lease in held)
    if not while_writing:
        return (f"{writers('is')}: {verb} it once that run is done, or pass --while-writing to {verb} the rows ok so "
                "far"), None
    return None, f"note: {past} while {writers('was')}: only the rows ok at that time are in it"


def preflight(prog: str, paths: Iterable[tuple[str | None, str]], stores: Iterable[str | None], verb: str, past: str,
              while_writing: bool) -> tuple[bool, str | None]:
    """(refused, note): both checks above; a refusal is printed to stderr as ``prog: ...`` (the job exits 2), a note
    to stdout.

    Many parameters because: those of :func:`path_refusal` and :func:`writer_check`, and the job's name.
    """
    refusal, note = path_refusal(paths, stores), None
    if not refusal:
        refusal, note = writer_check(stores, verb, past, while_writing)
    if refusal:
        print(f"{prog}: {refusal}", file=sys.stderr)
    elif note:
        print(note)
    return bool(refusal), note
