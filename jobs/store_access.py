"""What the jobs that read a store (aggregate, report, spray) check before any work: paths of the wrong kind, and
an explain run that is writing the store now (its lease, pipeline/lease.py)."""
from __future__ import annotations

import sys
from collections.abc import Iterable


def path_refusal(paths: Iterable[tuple[str | None, str]]) -> str | None:
    """The first of ``(url, kind)`` that cannot be its kind ("store", "folder", "file"), in one sentence; unset urls
    are skipped."""
    from pipeline.paths import path_problem

    return next((problem for url, kind in paths if url for problem in [path_problem(url, kind)] if problem), None)


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
    refusal, note = path_refusal(paths), None
    if not refusal:
        refusal, note = writer_check(stores, verb, past, while_writing)
    if refusal:
        print(f"{prog}: {refusal}", file=sys.stderr)
    elif note:
        print(note)
    return bool(refusal), note
