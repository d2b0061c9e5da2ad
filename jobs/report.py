"""``lrp-audit report STORE``: render the self-contained HTML audit report of a relevance store.

Reads the store's aggregates (``runs/voc.aggregates`` for ``runs/voc.zarr``, computed with Dask when missing) and
writes one HTML file with every image embedded::

    lrp-audit report runs/voc.zarr                                  # -> runs/voc.report.html
    lrp-audit report runs/caffenet.zarr --compare runs/googlenet.zarr --out compare.html
    lrp-audit report runs/voc.zarr --group epsilon_0.01             # another explanation setting first
    lrp-audit report runs/voc.zarr --evaluation runs/voc.evaluation # AOPC section (default: beside the store)

Exit status 0 on success, 2 when a store or its aggregates cannot be read, when the aggregates are another store's
or older than the store and cannot be recomputed, when a path is a file where a folder is needed (or the other way
round), or when an explain run is still writing the store (unless ``--while-writing``).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from jobs.store_access import preflight
from pipeline.paths import os_reason


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrp-audit report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="relevance store written by 'lrp-audit explain' (path or fsspec URL)")
    p.add_argument("--compare", metavar="STORE2",
                   help="a second store of the same dataset explained with another model: shown side by side")
    p.add_argument("--out", help="output HTML file (default: STORE without .zarr + .report.html)")
    p.add_argument("--group", help="the explanation group the report leads with (default: the store's first)")
    p.add_argument("--aggregates", help="aggregates folder of STORE (default: STORE without .zarr + .aggregates)")
    p.add_argument("--compare-aggregates",
                   help="aggregates folder of STORE2 (default: STORE2 without .zarr + .aggregates)")
    p.add_argument("--evaluation", metavar="DIR",
                   help="results of 'lrp-audit evaluate' to show "
                        "(default: STORE without .zarr + .evaluation, if present)")
    p.add_argument("--max-classes", type=int, default=40, help="classes shown in the galleries (default 40)")
    p.add_argument("--title", help="title of the report")
    p.add_argument("--scheduler", help="Dask scheduler when aggregates must be computed (see lrp-audit aggregate)")
    p.add_argument("--while-writing", action="store_true",
                   help="report a store that an explain run is still writing (only the rows ok so far; the output "
                        "says so); without it such a store is refused")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from aggregations.report import headline_text, render_report  # matplotlib, torch: after --help
    from pipeline.store import StoreError

    from aggregations.report.runs import AggregatesNote

    paths = [(args.store, "store"), (args.compare, "store"), (args.aggregates, "aggregates"),
             (args.compare_aggregates, "aggregates"), (args.evaluation, "folder"), (args.out, "report")]
    refused, note = preflight("lrp-audit report", paths, [args.store, args.compare], "report", "reported",
                              args.while_writing)
    if refused:
        return 2
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AggregatesNote)
            out = render_report(args.store, args.out, compare=args.compare, group=args.group,
                                aggregates_dir=args.aggregates, compare_aggregates_dir=args.compare_aggregates,
                                max_classes=args.max_classes, title=args.title, scheduler=args.scheduler,
                                evaluation=args.evaluation)
            headline = headline_text(args.store, args.aggregates, args.group)
    except (StoreError, FileNotFoundError, KeyError, ValueError) as error:
        failure = str(error)
    except OSError as error:  # a path the checks above could not foresee (permissions, a full disk)
        failure = os_reason(error)
    else:
        failure = None
    for warning in caught:  # the notes (aggregates recomputed, of unknown age) also when the report then failed
        if issubclass(warning.category, AggregatesNote):
            print(f"note: {warning.message}")
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if failure:
        print(f"lrp-audit report: {failure}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    print(headline)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
