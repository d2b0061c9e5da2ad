"""``lrp-audit spray STORE``: SpRAy (spectral relevance analysis) per target class of a relevance store.

Thin entry point over :func:`aggregations.spray.spray`; the outputs are described in docs/spray.md.
"""
from __future__ import annotations

import argparse
import sys

from aggregations.run import default_out_dir
from aggregations.spray import RunOptions, SpraySettings, spray
from aggregations.spray.settings import EMBEDDINGS, METHODS, NORMALISATIONS, PCA_METHODS, parse_clusters
from jobs.store_access import preflight
from pipeline.paths import os_reason
from pipeline.store import StoreError


def _parser() -> argparse.ArgumentParser:
    d = SpraySettings()
    p = argparse.ArgumentParser(prog="lrp-audit spray", description=(
        "Cluster the relevance maps of each class (SpRAy, Lapuschkin et al. 2019) to find distinct "
        "prediction strategies, e.g. a watermark in any corner. Writes OUT/spray/*.parquet and "
        "OUT/spray/arrays.zarr (docs/spray.md)."))
    p.add_argument("store", help="the relevance store (local path or fsspec URL) written by 'lrp-audit explain'")
    p.add_argument("--out", help="output directory (default: STORE without .zarr + .aggregates)")
    p.add_argument("--group", action="append", dest="groups", metavar="NAME",
                   help="explanation group (repeatable; default: all)")
    p.add_argument("--classes", type=int, nargs="+", metavar="C", help="target classes to analyse (default: all)")
    p.add_argument("--size", type=int, default=d.size, help=f"pooled grid size (default {d.size}: {d.size}x{d.size})")
    p.add_argument("--normalise", choices=NORMALISATIONS, default=d.normalise, help=f"default {d.normalise}")
    p.add_argument("--pca", type=int, default=d.pca, help="PCA dimensions before the kNN search (default 0: off)")
    p.add_argument("--pca-method", choices=PCA_METHODS, default=d.pca_method, help=f"default {d.pca_method}")
    p.add_argument("--neighbors", type=int, default=d.neighbors, help=f"k of the kNN graph (default {d.neighbors})")
    p.add_argument("--approximate-above", type=int, default=d.approximate_above,
                   help="rows of a class above which pynndescent replaces the exact search "
                        f"(default {d.approximate_above})")
    p.add_argument("--eigenvalues", type=int, default=d.n_eigenvalues, dest="n_eigenvalues",
                   help=f"eigenvalues kept (default {d.n_eigenvalues})")
    p.add_argument("--clusters", type=parse_clusters, default=d.clusters, help="'auto' (eigengap, default) or K")
    p.add_argument("--max-clusters", type=int, default=d.max_clusters,
                   help=f"largest K for auto (default {d.max_clusters})")
    p.add_argument("--method", choices=METHODS, default=d.method, help=f"clustering (default {d.method})")
    p.add_argument("--embedding", choices=EMBEDDINGS, default=d.embedding,
                   help=f"2-D embedding (default {d.embedding})")
    p.add_argument("--min-rows", type=int, default=d.min_rows, help=f"smallest class clustered (default {d.min_rows})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--scheduler", default=None,
                   help="threads (default), sync, processes, ray, or a distributed address like tcp://host:8786")
    p.add_argument("--workers", type=int, default=None, help="threads/processes of the local scheduler")
    p.add_argument("--scratch-dir", help="local folder for the pooled maps while it runs (default: the system's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--while-writing", action="store_true",
                   help="analyse a store that an explain run is still writing (only the rows ok so far; the output "
                        "says so); without it such a store is refused")
    return p


SETTING_NAMES = ("size", "normalise", "pca", "pca_method", "neighbors", "approximate_above", "n_eigenvalues",
                 "clusters", "max_clusters", "method", "embedding", "min_rows", "seed")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    refused, note = preflight("lrp-audit spray", [(args.store, "store"), (args.out, "aggregates")], [args.store],
                              "analyse", "analysed", args.while_writing)
    if refused:
        return 2
    try:
        settings = SpraySettings(**{name: getattr(args, name) for name in SETTING_NAMES})
        options = RunOptions(scheduler=args.scheduler, num_workers=args.workers, progress=not args.quiet,
                             scratch_dir=args.scratch_dir)
        result = spray(args.store, args.out, groups=args.groups, classes=args.classes, settings=settings,
                       options=options)
    except (StoreError, ValueError, FileNotFoundError, KeyError) as error:
        print(f"lrp-audit spray: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the checks above could not foresee (permissions, a full disk)
        print(f"lrp-audit spray: {os_reason(error)}", file=sys.stderr)
        return 2
    for row in sorted(result.classes.to_pylist(), key=lambda r: (r["group"], r["split_rank"] < 0, r["split_rank"])):
        if row["status"] != "clustered":
            print(f"[{row['group']}] class {row['target']} ({row['class_name']}): {row['status']} "
                  f"({row['n_ok']} ok rows of {row['n_rows']}; at least {settings.min_rows} needed)")
            continue
        print(f"[{row['group']}] class {row['target']} ({row['class_name']}): split rank {row['split_rank']}, "
              f"{row['n_clusters']} clusters, eigengap {row['eigengap']:.3f}, split score {row['split_score']:.3f}, "
              f"{row['n_ok']} ok rows ({row['n_rows'] - row['n_ok']} excluded)")
    for row in result.clusters.to_pylist():
        if row["flagged"]:
            print(f"  flagged [{row['group']}] class {row['target']} cluster {row['cluster']} "
                  f"({row['size']} rows): {row['reason']}")
    for row in result.classes.to_pylist():
        if row["status"] == "clustered" and row["chosen_by"].startswith("given") and row["chosen_by"] != "given":
            print(f"  note: [{row['group']}] class {row['target']}: --clusters {settings.clusters} is more than its "
                  f"{row['n_ok']} ok rows and {settings.n_eigenvalues} eigenvalues allow (K <= min(eigenvalues, "
                  f"rows - 1) - 1): {row['n_clusters']} clusters made")
    print(f"wrote {result.out_dir or default_out_dir(args.store)}/spray")
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
