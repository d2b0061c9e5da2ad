"""``lrp-audit aggregate STORE``: class heatmaps, region pools, context usage and bias flags over a store.

Thin entry point over :func:`aggregations.run.aggregate`; the outputs are described in docs/aggregates.md.
``--spray`` chains ``lrp-audit spray`` (docs/spray.md) into the same folder.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from aggregations.bias import BiasSettings
from aggregations.run import aggregate, default_out_dir
from aggregations.views import DEFAULT_MEMORY_BUDGET
from jobs.store_access import preflight
from pipeline.paths import os_reason
from pipeline.store import StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrp-audit aggregate",
        description="Aggregate a relevance store: class-average heatmaps, conserving region pools, "
                    "context usage and bias flags (Parquet tables + a Zarr group of heatmaps).")
    parser.add_argument("store", help="the relevance store (local path or fsspec URL) written by 'lrp-audit explain'")
    parser.add_argument("--out", help="output directory (default: STORE without .zarr + .aggregates)")
    parser.add_argument("--group", action="append", dest="groups", metavar="NAME",
                        help="explanation group to aggregate (repeatable; default: all)")
    parser.add_argument("--grid", default="3x1", help="region pools as ROWSxCOLS (default 3x1: top/middle/bottom)")
    parser.add_argument("--masks", metavar="FILE.npz",
                        help="region pools from named (H, W) boolean masks in an .npz file instead of a grid")
    parser.add_argument("--scheduler", default=None,
                        help="threads (default), sync, processes, ray, or a distributed address like tcp://host:8786")
    parser.add_argument("--workers", type=int, default=None, help="threads/processes of the local scheduler")
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_BUDGET / 2**30,
                        help="GiB of heatmaps held at once; more (target, label, prediction) groups than fit take "
                             "more passes over the store (default 2; 0: one pass, no bound)")
    parser.add_argument("--while-writing", action="store_true",
                        help="aggregate a store that an explain run is still writing (only the rows ok so far; "
                             "the output says so); without it such a store is refused")
    parser.add_argument("--spray", action="store_true",
                        help="then run SpRAy with its default settings on the same groups into the same folder "
                             "(docs/spray.md; 'lrp-audit spray' for its options)")
    defaults = BiasSettings()
    bias = parser.add_argument_group("bias flags (see docs/aggregates.md)")
    for name, value in defaults.as_dict().items():
        bias.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, dest=name,
                          help=f"default {value}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = BiasSettings(**{name: getattr(args, name) for name in BiasSettings().as_dict()})
    except ValueError as error:
        print(f"lrp-audit aggregate: {error}", file=sys.stderr)
        return 2
    paths = [(args.store, "store"), (args.out, "aggregates"), (args.masks, "file")]
    refused, note = preflight("lrp-audit aggregate", paths, [args.store], "aggregate", "aggregated", args.while_writing)
    if refused:
        return 2
    try:
        masks = None
        if args.masks:
            with np.load(args.masks) as archive:
                masks = {name: archive[name] for name in archive.files}
        result = aggregate(args.store, args.out, groups=args.groups, grid=args.grid, masks=masks,
                           scheduler=args.scheduler, num_workers=args.workers, settings=settings,
                           memory_budget=int(args.memory_gb * 2**30) if args.memory_gb > 0 else None)
    except (StoreError, ValueError, FileNotFoundError, KeyError) as error:
        print(f"lrp-audit aggregate: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the checks above could not foresee (permissions, a full disk)
        print(f"lrp-audit aggregate: {os_reason(error)}", file=sys.stderr)
        return 2

    for group, counts in result.summary["groups"].items():
        excluded = counts["rows"] - counts["ok"]
        if not counts["ok"]:
            print(f"{group}: nothing could be audited: 0 ok rows of {counts['rows']} ({counts['failed']} failed, "
                  f"{counts['nonfinite']} nonfinite, {counts['pending']} pending)")
            continue
        print(f"{group}: {counts['ok']} of {counts['rows']} rows aggregated in {result.seconds[group]['total']:.1f}s "
              f"({excluded} excluded: {counts['failed']} failed, {counts['nonfinite']} nonfinite, "
              f"{counts['pending']} pending); {counts['not_conserved']} rows whose regions do not add up")
    for row in result.classes.to_pylist():
        if row["flagged"]:
            print(f"  [{row['group']}] class {row['class']} ({row['class_name']}), bias rank {row['bias_rank']}: "
                  f"{row['reason']}")
    if not any(result.classes["flagged"].to_pylist()) and any(c["ok"] for c in result.summary["groups"].values()):
        print("  no class flagged")
    print(f"wrote {result.out_dir or default_out_dir(args.store)}")
    if note:
        print(note)
    if args.spray:
        return _spray(args, result.out_dir)
    return 0


def _spray(args, out_dir: str) -> int:
    """``lrp-audit spray`` on the same store, groups, folder and scheduler: its own entry point, its own output."""
    from jobs import spray

    argv = [args.store, "--out", out_dir, *[f"--group={g}" for g in args.groups or []]]
    argv += [f"--scheduler={args.scheduler}"] if args.scheduler else []
    argv += [f"--workers={args.workers}"] if args.workers else []
    argv += ["--while-writing"] if args.while_writing else []
    return spray.main(argv)


if __name__ == "__main__":
    sys.exit(main())
