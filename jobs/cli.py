"""The ``lrp-audit`` console script: ``lrp-audit <command> ...`` runs ``python -m jobs.<command> ...``
(a dash in a command is an underscore in its module: ``export-virelay`` is ``jobs/export_virelay.py``).

Each command lives in its own module ``jobs/<command>.py`` exposing ``main(argv) -> int``, so that the
console script and ``ray job submit -- python -m jobs.<command>`` run exactly the same code.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

COMMANDS = {
    "demo": "generate a dataset with a planted cue, train, explain, aggregate and report",
    "explain": "explain every image of a dataset on a Ray cluster into a Zarr store",
    "aggregate": "class heatmaps, region pools, context usage and bias flags over a store",
    "report": "render the self-contained HTML audit report",
    "evaluate": "region-perturbation evaluation (AOPC) of explanation methods",
    "spray": "SpRAy: cluster each class's relevance maps into prediction strategies",
    "export-virelay": "write a store and its SpRAy results as a ViRelAy project",
}


#: what an interrupted command left, for the message
RESUMABLE = {
    "explain": "; the shards written so far are kept: run the same command again to resume",
    "evaluate": "; the shards written so far are kept: run the same command again to resume",
}


def _version() -> str:
    try:
        return importlib.metadata.version("lrp-audit")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _usage() -> str:
    lines = ["usage: lrp-audit <command> [options]   (lrp-audit --version)", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run 'lrp-audit <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if argv else 2
    if argv[0] in {"-V", "--version"}:
        print(f"lrp-audit {_version()}")
        return 0
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as for python -m jobs.<command>: a --factory module beside the user
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lrp-audit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"jobs.{command.replace('-', '_')}")
    except ModuleNotFoundError as error:
        if error.name == f"jobs.{command.replace('-', '_')}":
            print(f"lrp-audit: command {command!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"\nlrp-audit {command}: interrupted{RESUMABLE.get(command, '')}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT


if __name__ == "__main__":
    sys.exit(main())
