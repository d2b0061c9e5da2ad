"""``lrp-audit export-virelay STORE OUT``: a store and its SpRAy results as a ViRelAy project.

Writes the dataset, attribution and analysis HDF5 files, the label map and one project YAML per explanation
group (layout in docs/spray.md), then prints how to open them::

    lrp-audit spray runs/voc.zarr
    lrp-audit export-virelay runs/voc.zarr runs/voc.virelay
    python -m virelay runs/voc.virelay/*.yaml          # ViRelAy is not a dependency: pip install virelay

Exit status 0 on success, 2 when the store or its SpRAy results cannot be read.
"""
from __future__ import annotations

import argparse
import sys

from jobs.store_access import preflight
from pipeline.paths import os_reason


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrp-audit export-virelay", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="the relevance store (path or fsspec URL)")
    p.add_argument("out", help="local output folder for the ViRelAy project")
    p.add_argument("--spray", metavar="DIR", help="folder holding spray/ (default: STORE without .zarr + .aggregates)")
    p.add_argument("--group", action="append", dest="groups", metavar="NAME",
                   help="explanation group (repeatable; default: every group SpRAy ran on)")
    p.add_argument("--classes", type=int, nargs="+", metavar="C", help="export only these target classes")
    p.add_argument("--name", help="project name shown by ViRelAy (default: lrp-audit)")
    p.add_argument("--while-writing", action="store_true",
                   help="export a store that an explain run is still writing (its SpRAy results must still match)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from aggregations.spray.virelay import export  # h5py, the image reader: after --help
    from pipeline.store import StoreError

    refused, _ = preflight("lrp-audit export-virelay", [(args.store, "store"), (args.out, "virelay"),
                                                         (args.spray, "folder")],
                           [args.store], "export", "exported", args.while_writing)
    if refused:
        return 2
    try:
        written = export(args.store, args.out, spray_dir=args.spray, groups=args.groups, classes=args.classes,
                         name=args.name)
    except (StoreError, ValueError, FileNotFoundError, KeyError) as error:
        print(f"lrp-audit export-virelay: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the checks above could not foresee (permissions, a full disk)
        print(f"lrp-audit export-virelay: {os_reason(error)}", file=sys.stderr)
        return 2
    print(f"wrote {written['rows']} dataset entries ({written['missing_images']} images unreadable, stored black)")
    for group, classes in written["classes"].items():
        print(f"  [{group}] {len(classes)} clustered classes in the analysis file")
    print("open with: python -m virelay " + " ".join(written["projects"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
