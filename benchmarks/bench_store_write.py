"""Shard writes of relevance: zarr 3's own slicing against ``pipeline.store.write_shards``, side by side.

The explain actor's writer thread spends its time here; what it costs the actor is both its speed and how much it
slows the thread that drives the engine beside it (the GIL), so both are printed:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_store_write.py --shards 8 --size 224

Rows are random normal float32 (incompressible, the worst case) or smooth sparse maps (``--maps sparse``, closer to
real relevance). Both writers produce the same bytes (tests/test_shard_writer.py).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time

import numpy as np
import zarr

from pipeline.store import write_shards


def _rows(n: int, size: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "normal":
        return rng.normal(size=(n, size, size)).astype(np.float32)
    maps = np.zeros((n, size, size), np.float32)  # a few blobs a map, zero elsewhere
    y, x = np.mgrid[:size, :size]
    for i in range(n):
        for cy, cx in rng.integers(0, size, (3, 2)):
            maps[i] += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (size / 20) ** 2)).astype(np.float32)
    maps[maps < 1e-3] = 0
    return maps


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _python_loop() -> float:
    clock, total = time.perf_counter(), 0
    for i in range(2_000_000):
        total += i % 7
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--maps", choices=["normal", "sparse"], default="normal")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    s, size = args.rows_per_shard, args.size
    values = _rows(args.shards * s, size, args.maps)
    root = zarr.open_group(tempfile.mkdtemp(prefix="bench-write-"), mode="w", zarr_format=3)
    array = root.create_array("relevance", shape=values.shape, dtype="float32", fill_value=np.nan,
                              chunks=(1, size, size), shards=(s, size, size))
    writers = {"zarr slicing": lambda: array.__setitem__(slice(None), values),
               "write_shards": lambda: write_shards(array, 0, values)}
    alone = min(_python_loop() for _ in range(3))
    print(f"{len(values)} rows of {size}x{size} float32 ({args.maps}), shards of {s} rows, best of {args.repeats}\n")
    print("| writer | rows/s | CPU s / wall s | Python thread beside it, x its time alone |")
    print("| --- | ---: | ---: | ---: |")
    for name, write in writers.items():
        write()  # warm: files exist, pools started
        best, load, slowdown = 0.0, 0.0, []
        for _ in range(args.repeats):
            cpu, clock = _cpu(), time.perf_counter()
            write()
            wall = time.perf_counter() - clock
            if len(values) / wall > best:
                best, load = len(values) / wall, (_cpu() - cpu) / wall
            thread = threading.Thread(target=write)
            thread.start()
            slowdown.append(_python_loop() / alone)
            thread.join()
        print(f"| {name} | {best:.0f} | {load:.2f} | {np.median(slowdown):.2f} |")


if __name__ == "__main__":
    main()
