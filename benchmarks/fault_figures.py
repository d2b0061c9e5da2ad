"""The figures of issue 14's closing note, from the fault-injection and hostile-input tests themselves.

Runs ``tests/test_faults.py`` (real Ray, real Zarr, slow) ``--repeat`` times and ``tests/test_hostile_*.py``
once, with ``-s``: every fault test prints one ``FAULT <kind>: lost L, duplicated D, recovered in T s`` line (rows
lost, rows written twice, seconds from the fault to a whole store), which this script tallies per kind. The
hostile-input table's cases are the rows of docs/hostile-inputs.md; the documented result is a passing test.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fault_figures.py --repeat 1 [-k EXPR]
    PYTHONPATH=$PWD .venv/bin/python benchmarks/fault_figures.py --log run1.txt run2.txt   # tally saved output
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULT = re.compile(r"FAULT (?P<kind>.+?): lost (?P<lost>\d+), duplicated (?P<dup>\d+), recovered in (?P<s>[\d.]+) s")
SHORT_FAILURE = re.compile(r"^(?:FAILED|ERROR) (tests/\S+)", re.M)
RESULT = re.compile(r"^(tests/\S+::\S+(?:\[.*?\])?) (PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED)", re.M)


def pytest(*args: str, capture: bool = False) -> str:
    """pytest -v's output; ``-s`` (the fault tests' FAULT lines) unless ``capture``: with ``-s`` a test's own output
    can split its result line, which RESULT would then miss."""
    command = [sys.executable, "-m", "pytest", *([] if capture else ["-s"]), "-v", "-p", "no:cacheprovider", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def fault_table(outputs: list[str]) -> list[str]:
    runs: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for text in outputs:
        for match in FAULT.finditer(text):
            runs[match["kind"]].append((int(match["lost"]), int(match["dup"]), float(match["s"])))
    lines = ["| fault | runs | rows lost | rows duplicated | time to recover (s), min / max |",
             "| --- | ---: | ---: | ---: | --- |"]
    for kind, values in runs.items():
        seconds = [s for _, _, s in values]
        lines.append(f"| {kind} | {len(values)} | {sum(v[0] for v in values)} | {sum(v[1] for v in values)} | "
                     f"{min(seconds):.1f} / {max(seconds):.1f} |")
    failed = [name for text in outputs for name in SHORT_FAILURE.findall(text)]  # pytest -ra's summary lines
    lines.append(f"\nfault tests failed: {len(failed)} {failed if failed else ''}")
    return lines


def hostile_table(text: str) -> list[str]:
    doc = (REPO / "docs" / "hostile-inputs.md").read_text()
    cases = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith(("| input", "| ---"))]
    outcomes = RESULT.findall(text)
    passed = sum(outcome == "PASSED" for _, outcome in outcomes)
    return [f"hostile inputs: {len(cases)} cases in docs/hostile-inputs.md; {len(outcomes)} tests, {passed} give the "
            f"documented result, {len(outcomes) - passed} do not"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of the fault tests")
    parser.add_argument("-k", default=None, help="pytest -k expression for the fault tests")
    parser.add_argument("--log", nargs="*", help="tally these saved pytest -s outputs instead of running")
    parser.add_argument("--save", default=None, help="also write each pytest output to SAVE-<n>.txt")
    args = parser.parse_args()
    if args.log:
        outputs = [Path(name).read_text(errors="replace") for name in args.log]
        print("\n".join(fault_table(outputs)))
        return
    selection = ["-k", args.k] if args.k else []
    outputs = []
    for n in range(args.repeat):
        outputs.append(pytest("tests/test_faults.py", *selection))
        if args.save:
            Path(f"{args.save}-{n}.txt").write_text(outputs[-1])
    print("\n".join(fault_table(outputs)))
    hostile = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_hostile_*.py"))
    print("\n".join(hostile_table(pytest(*hostile, capture=True))))


if __name__ == "__main__":
    main()
